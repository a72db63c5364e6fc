"""The CPU's instruction-set features that decide which INT8/BF16 kernels the backends can use.

One reader for export (which scheme and settings are fast here, recorded in the manifest), the runtime
(whether the device is the same kind of CPU as the one those settings were measured on) and `bench`.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

#: Flags that change INT8/BF16 speed: x86 VNNI / BF16 / AMX, Arm dot-product and int8 matmul.
FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8",
                     "amx_bf16", "asimd", "asimddp", "i8mm")
#: The flags whose presence changes which OpenVINO runtime precision is fastest (bf16 units, AMX tiles).
PRECISION_CLASS_FLAGS = ("avx512_bf16", "amx_bf16", "amx_int8")


@lru_cache(maxsize=1)
def cpu_info() -> tuple[str, tuple[str, ...]]:
    """(model name, flags of interest present) from /proc/cpuinfo; without it, platform.processor() and ()."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor(), tuple(f for f in FLAGS_OF_INTEREST if f in flags)


def cpu_flags() -> list[str]:
    return list(cpu_info()[1])


def precision_class(flags: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The subset of `flags` (default: this CPU's) that decides OpenVINO's fastest inference precision."""
    present = cpu_flags() if flags is None else flags
    return [f for f in PRECISION_CLASS_FLAGS if f in present]
