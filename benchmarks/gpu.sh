#!/usr/bin/env bash
# GPU benchmarks in one command: SimpleBEV decomposition overhead (cpu and paper configs, batch 1
# and 8, eager and inductor), the modality / batch / resolution scaling, and the model zoo (base
# sizes; float32 eager and inductor, bfloat16 autocast eager), as JSON in OUTDIR.
#   benchmarks/gpu.sh [--device cuda|cpu] [--quick] [OUTDIR]     (default: cuda, benchmarks/results/gpu)
# --quick runs the tiny configs once (a smoke test, e.g. on a CPU). The zoo's timm models need a
# torchvision matched to torch; without one they are listed as skipped.
set -euo pipefail
device=cuda quick=0 out=benchmarks/results/gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    *) out="$1"; shift ;;
  esac
done
mkdir -p "$out"
cd "$(dirname "$0")/.."
if [ "$quick" = 1 ]; then
  python -m benchmarks.overhead --config tiny --device "$device" --repeats 1 --no-compiled --json "$out/overhead_tiny.json"
  python -m benchmarks.scaling --quick --device "$device" --repeats 1 --json "$out/scaling.json"
  python -m benchmarks.zoo --size tiny --models transformers-visualbert --device "$device" --repeats 1 \
    --json "$out/zoo_tiny.json"
  exit 0
fi
for config in cpu paper; do
  for batch in 1 8; do
    python -m benchmarks.overhead --config "$config" --batch "$batch" --device "$device" --repeats 5 \
      --json "$out/overhead_${config}_b${batch}.json"
  done
done
python -m benchmarks.scaling --device "$device" --repeats 5 --json "$out/scaling.json"
python -m benchmarks.zoo --size base --device "$device" --repeats 5 --inductor --json "$out/zoo_base.json"
python -m benchmarks.zoo --size base --device "$device" --repeats 5 --autocast bf16 --json "$out/zoo_base_bf16.json"
