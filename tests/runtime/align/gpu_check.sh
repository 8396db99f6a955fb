#!/usr/bin/env bash
# One-shot GPU run of the alignment tests (CUDA + nccl): `bash tests/runtime/align/gpu_check.sh` from the
# repository root of the lent machine (python3.12 + CUDA torch, no megatron-core: unpacked from the
# carried .wheels/, nemoc mapped onto the repository folders by symlinks, as bench/gpu_run.sh does).
set -uo pipefail
cd "$(dirname "$0")/../../.."
REPO=$PWD
OUT=${OUT:-/tmp/align_gpu}
mkdir -p "$OUT"
SITE=$(mktemp -d /tmp/align_site.XXXX)
for spec in "numpy:numpy-*cp312*.whl" "packaging:packaging-*.whl" "psutil:psutil-*.whl" \
            "megatron.core:megatron_core-0.16.1-cp312-*.whl" "networkx:networkx-*.whl" "lark:lark-*.whl" \
            "click:click-*.whl"; do
  mod=${spec%%:*}; glob=${spec#*:}
  if python3 -c "import $mod" 2>/dev/null; then continue; fi
  whl=$(ls .wheels/$glob 2>/dev/null | head -n1)
  [ -n "$whl" ] && python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$whl" "$SITE"
done
mkdir -p "$SITE/nemoc"
for pkg in grammar dsl compiler runtime; do ln -sfn "$REPO/$pkg" "$SITE/nemoc/$pkg"; done
export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'mcore', m.__version__)"
timeout 420 python3 -m pytest -q -p no:warnings -p no:cacheprovider -m "not slow" -s --durations=8 \
  -o addopts="" --timeout 400 tests/runtime/align 2>&1 | grep -v -i "warn" | tee "$OUT/pytest.log" | tail -n 60
