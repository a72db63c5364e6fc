#!/usr/bin/env bash
# Build the TensorRT engine for this bundle ON THE DEVICE (engines are tied to the TensorRT version and
# GPU that build them), check it against the torch reference outputs, and record what built it.
#
#   ./build_engine.sh [--sparsity] [--trtexec PATH]
#   SPARSITY=1 ./build_engine.sh
#
# Written by `edgeretina export --target jetson` for TensorRT @TRT_VERSION@, precision @PRECISION@.
set -euo pipefail

cd "$(dirname "$0")"

PRECISION="@PRECISION@"
EXPORTED_FOR_TRT="@TRT_VERSION@"
MIN_SHAPE="image:@MIN_SHAPE@"
OPT_SHAPE="image:@OPT_SHAPE@"
MAX_SHAPE="image:@MAX_SHAPE@"
FLOAT_LAYERS="@FLOAT_LAYERS@"
SPARSITY="${SPARSITY:-@SPARSITY@}"
TRTEXEC="${TRTEXEC:-}"

while [ "$#" -gt 0 ]; do
    case "$1" in
        --sparsity) SPARSITY=1 ;;
        --trtexec) TRTEXEC="$2"; shift ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
    shift
done

if [ -z "$TRTEXEC" ]; then
    if command -v trtexec >/dev/null 2>&1; then
        TRTEXEC="$(command -v trtexec)"
    elif [ -x /usr/src/tensorrt/bin/trtexec ]; then   # where JetPack installs it
        TRTEXEC=/usr/src/tensorrt/bin/trtexec
    else
        echo "trtexec not found: install TensorRT (JetPack) or pass --trtexec PATH" >&2
        exit 1
    fi
fi

args=(--onnx=model.onnx --saveEngine=model.plan --timingCacheFile=timing.cache
      --minShapes="$MIN_SHAPE" --optShapes="$OPT_SHAPE" --maxShapes="$MAX_SHAPE")
if [ "$PRECISION" = "int8" ]; then
    # Explicit quantization: the Q/DQ nodes in model.onnx carry the scales; no calibration cache.
    # FP16 too, so the layers between Q/DQ pairs do not fall back to FP32.
    args+=(--int8 --fp16)
else
    args+=(--fp16)
    if [ -n "$FLOAT_LAYERS" ]; then
        # Keep LayerNorm/Softmax in FP32; layers fused away lose the constraint with a warning.
        args+=(--precisionConstraints=prefer --layerPrecisions="$FLOAT_LAYERS")
    fi
fi
if [ "$SPARSITY" = "1" ]; then
    args+=(--sparsity=enable)
fi

echo "building model.plan with $TRTEXEC ${args[*]}" >&2
"$TRTEXEC" "${args[@]}"

# Compare the engine with the torch outputs and write engine.json (TensorRT version, device name).
python3 -c 'from edgeretina.cli import main; main()' check-engine model.plan reference_inputs.npy \
    reference_outputs.npz --precision "$PRECISION" --exported-for "$EXPORTED_FOR_TRT" --write-info engine.json
