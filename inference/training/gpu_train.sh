#!/usr/bin/env bash
# One GPU run (#17): train the nodule model on the varied generator at the physical input scale (0.85 mm per
# model pixel, 435 mm across 512 px), then evaluate it on the phantom families.
#
#   inference/training/gpu_train.sh OUT [MINUTES]      # on the GPU machine: OUT=$OUT, MINUTES of training (default 5.5)
#   TINY=1 inference/training/gpu_train.sh OUT         # CPU smoke test of the same steps with tiny settings
#
# Phantoms are generated on the fly in parallel CPU DataLoader workers (all cores but two); on CUDA a replay
# buffer keeps the GPU busy between fresh batches (inference/training/train.py). The GPU image has torch, timm,
# OpenCV, numpy and safetensors but no pydicom: download its wheel here first and carry the folder, e.g.
#   /work/main/.venv/bin/pip download --no-deps -d .gpu-wheels pydicom==3.0.2   (and .git/info/exclude it)
# then run with carry [".gpu-wheels"]; this script installs it into a temporary folder (no network needed).
# Writes OUT/train.log, OUT/card.json, OUT/*.safetensors, OUT/eval.txt, OUT/eval/ and OUT/command.txt.
set -euo pipefail
out=${1:?usage: gpu_train.sh OUT [MINUTES]}
minutes=${2:-5.5}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$py" -c "import pydicom" 2>/dev/null; then
  [ -d .gpu-wheels ] || { echo "pydicom missing and no .gpu-wheels folder to install it from" >&2; exit 2; }
  site=$(mktemp -d)
  "$py" -m pip install -q --no-index --no-deps --find-links .gpu-wheels --target "$site" pydicom
  export PYTHONPATH="$PYTHONPATH:$site"
fi

if [ "${TINY:-0}" = 1 ]; then
  train=(--device cpu --minutes 0.3 --input-size 128 --mm-per-px 3.4 --batch 4 --workers 1 --threads 1 --calib-n 8 --test-n 8)
  evaluate=(--device cpu --threads 1 --n 8 --size 256 --robust-n 0 --ood-n 0 --latency-images 0)  # 256: the node skips smaller
else
  workers=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
  train=(--device cuda --minutes "$minutes" --mm-per-px 0.85 --workers "$workers" --threads 2 --calib-n 1000 --test-n 1000)
  evaluate=(--device cuda --threads 2 --n 400 --robust-n 60 --ood-n 40 --latency-images 0)
fi
cmd=("$py" -m inference.training.train --out "$out" --generator varied "${train[@]}")
echo "${cmd[*]}" > "$out/command.txt"
"${cmd[@]}"
"$py" -m inference.training.evaluate --card "$out/card.json" --out "$out/eval" "${evaluate[@]}" 2>&1 | tee "$out/eval.txt"
