#!/usr/bin/env bash
# One-shot GPU check for the training core: ~1B GPT, nemoc runtime vs a bare Megatron-Core loop built
# from the same Megatron settings, flash (SDPA) vs unfused attention on both sides, measured vs
# `nemoc plan`'s predictions (bench/gpu_1b.py; its docstring says what is measured and how).
#
#   OUT=$OUT bash bench/gpu_run.sh      # on the lent machine, from the repository root: ~4 min of work
#   BUDGET=150 bash bench/gpu_run.sh    # shorter: the flash pair first, later sub-runs skipped if no time
#
# From a nemoc session: the `run` tool with carry [".wheels"] (the wheels are git-ignored) and
# timeout_s 480; the script stops starting sub-runs after BUDGET s and is killed at BUDGET + 90 s.
# Check it first on the CPU: `.venv/bin/python bench/gpu_1b.py --cpu-smoke --out /tmp/gpu_1b_smoke`.
#
# The machine has python3.12 + a CUDA torch, no megatron-core and no network: missing packages are
# unpacked from the carried wheels in .wheels/ (a wheel is a zip; no pip, setuptools or index
# needed) into a private site dir, and `nemoc.*` is mapped onto the repository folders by symlinks
# (no `pip install -e .`). Results: $OUT/gpu_1b.json, $OUT/gpu_1b_table.md (+ per-run logs and
# metrics in $OUT/<backend>_<runtime|bare>[_repeat]/); OUT defaults to bench/results/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/bench/results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
SITE=$(mktemp -d /tmp/nemoc_site.XXXX)

# 1. packages: unpack a carried wheel for each module that does not import
need_wheel() {  # module wheel-glob
  if "$PY" -c "import $1" 2>/dev/null; then echo "have $1"; return; fi
  local whl
  whl=$(ls .wheels/$2 2>/dev/null | head -n1)
  if [ -z "$whl" ]; then echo "MISSING $1 (no .wheels/$2)"; return; fi
  "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$whl" "$SITE"
  echo "unpacked $whl"
}
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
need_wheel numpy 'numpy-*cp312*.whl'
need_wheel packaging 'packaging-*.whl'
need_wheel psutil 'psutil-*.whl'
need_wheel megatron.core 'megatron_core-0.16.1-cp312-*.whl'

# 2. nemoc without installing it: nemoc/<folder> -> repository folder (namespace package)
mkdir -p "$SITE/nemoc"
for pkg in grammar dsl compiler runtime; do ln -sfn "$REPO/$pkg" "$SITE/nemoc/$pkg"; done

gpu_state() {  # clocks, temperature, power and throttling: a slow sub-run may be the GPU's, not the code's
  nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit,clocks_event_reasons.active \
    --format=csv 2>&1 | tail -n 2
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  echo "host: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "GPU before:"; gpu_state
  "$PY" -c "import sys, torch, megatron.core as m; print(sys.version.split()[0], torch.__version__, torch.version.cuda, 'megatron-core', m.__version__)" 2>&1
  "$PY" -c "import nemoc.runtime.train" 2>&1 | tail -n 3 && echo "nemoc.runtime.train imports"
} | tee "$OUT/environment.txt"

# 3. the measurements (the script keeps its own budget and rewrites its JSON after every sub-run)
BUDGET=${BUDGET:-270}  # seconds for the sub-runs (six expected to take ~200 s on an H100/H200)
# GPU1B_ARGS: extra arguments, e.g. "--cpu-smoke" to try this whole script on a CPU-only machine
# (PYTHON=.venv/bin/python GPU1B_ARGS=--cpu-smoke OUT=/tmp/gpu_run_smoke bash bench/gpu_run.sh)
# shellcheck disable=SC2086
timeout $((BUDGET + 90)) "$PY" bench/gpu_1b.py --out "$OUT" --budget "$BUDGET" ${GPU1B_ARGS:-} 2>&1 | grep -v -i "warn" | tail -n 60 | tee "$OUT/gpu_1b.log"
status=${PIPESTATUS[0]}
{ echo "GPU after:"; gpu_state; } | tee -a "$OUT/environment.txt"
rm -rf "$OUT/data" "$OUT"/*/dataset_cache  # synthetic tokens and their index: not worth carrying back
echo "gpu_1b.py exit status $status; results in $OUT"
exit "$status"
