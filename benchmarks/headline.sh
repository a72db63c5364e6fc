#!/usr/bin/env bash
# Reproduce the headline table (benchmarks/results/) from a clean checkout:
#   benchmarks/headline.sh OUT [DEMO_DIR]
# OUT: scratch folder for bundles (~1.5 GB); results go to OUT/results/<model>/ (bench.json, bench.png, table.txt).
# DEMO_DIR: a finished `edgeretina demo --workdir DEMO_DIR` (checkpoint.pt, train/ and test/labels.csv); without it the
# trained demo model (fidelity on real grades) is skipped.
# 16 minutes on the project machine (2 cores): reference bundles ~10, benches and demo exports ~6.
set -euo pipefail
out=${1:?usage: benchmarks/headline.sh OUT [DEMO_DIR]}
demo=${2:-}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}
edgeretina=${EDGERETINA:-edgeretina}

"$python" "$here/reference.py" --out "$out/reference"

bench() {   # bench NAME REFERENCE CANDIDATE... : 1 and 2 threads, batch 1, both CPU backends
  local name=$1 reference=$2; shift 2
  mkdir -p "$out/results/$name"
  "$edgeretina" bench "$reference" "$@" --reference "$reference" --backend onnxruntime,openvino \
    --threads 1,2 --batch 1 --out "$out/results/$name" | tee "$out/results/$name/table.txt"
}

for arch in ViT-B-16 ViT-S-16; do
  root="$out/reference/$arch"
  bench "$arch" "$root/reference-fp32" "$root/candidates/cpu" "$root/candidates/openvino"
done

if [[ -n "$demo" ]]; then
  for target in onnx cpu openvino; do
    "$edgeretina" export "$demo/checkpoint.pt" --target "$target" --out "$out/demo/$target" --overwrite \
      --reference "$demo/test/labels.csv" --calibration "$demo/train/labels.csv"
  done
  mkdir -p "$out/results/demo"
  "$edgeretina" bench "$out/demo/onnx" "$out/demo/cpu" "$out/demo/openvino" --reference "$out/demo/onnx" \
    --backend onnxruntime,openvino --threads 1,2 --batch 1,8 --images "$demo/test/labels.csv" \
    --out "$out/results/demo" | tee "$out/results/demo/table.txt"
fi
