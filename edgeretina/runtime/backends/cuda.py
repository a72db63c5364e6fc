"""The CUDA runtime through cuda-python (`cuda.bindings`, or the older `cuda.cudart`): NVIDIA's torch-free
binding, which the TensorRT runner moves tensors with. Imported lazily, so this module loads anywhere."""

from __future__ import annotations

from edgeretina.errors import BackendError, MissingDependencyError


def cudart():
    try:
        from cuda.bindings import runtime                     # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime                # older cuda-python
        except ImportError:
            raise MissingDependencyError("cuda-python", "jetson", "moving tensors to the GPU") from None
    return runtime


def check(result):
    """cuda-python returns (error, *values); raise on error, return the values."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise BackendError(f"CUDA call failed: {error}")
    return values[0] if len(values) == 1 else values


def device_name() -> str:
    props = check(cudart().cudaGetDeviceProperties(0))
    name = props.name
    return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00").strip()
