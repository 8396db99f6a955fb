#!/usr/bin/env bash
# One-shot GPU check for the training core: ~1B GPT, nemoc runtime vs bare Megatron-Core loop,
# flash (SDPA) vs unfused attention, measured vs `nemoc plan`'s predictions.
#
#   bash bench/gpu_run.sh            # on the lent machine, from the repository root (<= ~6 min)
#   BUDGET=150 bash bench/gpu_run.sh # shorter: the flash runs first, later sub-runs skipped if no time
#
# The machine has python3.12 + a CUDA torch, no megatron-core and no network: missing packages are
# unpacked from the carried wheels in .wheels/ (a wheel is a zip; no pip, setuptools or index
# needed) into a private site dir, and `nemoc.*` is mapped onto the repository folders by symlinks
# (no `pip install -e .`). Results: $OUT/gpu_1b.json (+ per-run logs); OUT defaults to
# bench/results/gpu.
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

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import sys, torch, megatron.core as m; print(sys.version.split()[0], torch.__version__, torch.version.cuda, 'megatron-core', m.__version__)" 2>&1
  "$PY" -c "import nemoc.runtime.train" 2>&1 | tail -n 3 && echo "nemoc.runtime.train imports"
} | tee "$OUT/environment.txt"

# 3. the measurements (the script keeps its own 330 s budget and writes partial results as it goes)
BUDGET=${BUDGET:-330}  # seconds for the sub-runs; e.g. BUDGET=150 for flash only when device time is short
timeout $((BUDGET + 90)) "$PY" bench/gpu_1b.py --out "$OUT" --budget "$BUDGET" 2>&1 | tail -n 80 | tee "$OUT/gpu_1b.log"
status=${PIPESTATUS[0]}
rm -rf "$OUT/data"  # synthetic tokens: not worth carrying back
echo "gpu_1b.py exit status $status; results in $OUT"
exit "$status"
