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
#: Flags that mean bf16 matmuls run in hardware (AVX-512 BF16 dot products, AMX tiles); without them bf16 is
#: emulated (training) or unavailable (OpenVINO computes f32).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


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


def has_native_bf16(flags: list[str] | tuple[str, ...] | None = None) -> bool:
    """Whether `flags` (default: this CPU's) include a bf16 unit."""
    present = cpu_flags() if flags is None else flags
    return any(flag in present for flag in NATIVE_BF16_FLAGS)


def precision_class(flags: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The subset of `flags` (default: this CPU's) that decides OpenVINO's fastest inference precision."""
    present = cpu_flags() if flags is None else flags
    return [f for f in PRECISION_CLASS_FLAGS if f in present]


def cpu_class(flags: list[str] | tuple[str, ...] | None = None, machine: str | None = None) -> str:
    """The class of CPU whose integer kernels an INT8 artifact meets: the best 8-bit dot-product unit present.

    x86: amx (AMX tiles) > avx512-vnni > avx-vnni > avx512 (no VNNI: vpmaddubsw, saturating int16 sums) >
    avx2 (the same saturating path) ; Arm: i8mm > dotprod > plain NEON."""
    present = set(cpu_flags() if flags is None else flags)
    arch = (machine or platform.machine()).lower()
    if arch in ("aarch64", "arm64") or "asimd" in present:
        return "arm64-i8mm" if "i8mm" in present else "arm64-dotprod" if "asimddp" in present else "arm64"
    for flag, name in (("amx_int8", "x86-amx"), ("avx512_vnni", "x86-avx512-vnni"), ("avx_vnni", "x86-avx-vnni"),
                       ("avx512f", "x86-avx512"), ("avx2", "x86-avx2")):
        if flag in present:
            return name
    return "x86" if arch in ("x86_64", "amd64") else arch or "unknown"


def cpu_fingerprint() -> dict[str, object]:
    """What identifies this CPU for caches of per-device results (verification, re-measured settings)."""
    model, flags = cpu_info()
    return {"class": cpu_class(), "model": model, "machine": platform.machine(), "flags": list(flags)}


#: Every CPU class an INT8 graph with 7-bit weights computes the same integers on (see int8_validity).
ALL_CPU_CLASSES = ("x86-avx2", "x86-avx512", "x86-avx-vnni", "x86-avx512-vnni", "x86-amx",
                   "arm64", "arm64-dotprod", "arm64-i8mm")
#: Classes whose u8 x s8 kernels sum pairs of products in saturating int16 (vpmaddubsw): full 8-bit weights
#: can clip there, and only there.
SATURATING_CPU_CLASSES = ("x86-avx2", "x86-avx512")


def int8_validity(weight_bits: int, signed_weights: bool = True) -> dict[str, object]:
    """Which CPU classes an INT8 artifact with u8 activations and `weight_bits`-bit weights is valid for.

    x86 without VNNI multiplies u8 x s8 with vpmaddubsw, which adds each pair of products in int16 and
    saturates: 2 * 255 * 127 = 64,770 does not fit, so full 8-bit signed weights give different (clipped)
    sums on AVX2/AVX-512 than on VNNI/AMX, which accumulate in int32. With 7-bit weights (-64..64) a pair is
    at most 2 * 255 * 64 = 32,640 < 32,767: every class computes the same integers. Unsigned weights (u8 x
    u8) take another path, widened to int16 before vpmaddwd, which never saturates at any width."""
    if not signed_weights:
        return {"weight_bits": weight_bits, "weights": "uint8", "valid_cpu_classes": list(ALL_CPU_CLASSES),
                "why": "u8 x u8: MLAS widens both operands to int16 before vpmaddwd (int32 sums) on x86 without "
                       "VNNI, and VNNI/AMX/Arm accumulate in int32, so every class computes the same integers",
                "measured_on": [cpu_class()]}
    exact_everywhere = weight_bits <= 7
    valid = ALL_CPU_CLASSES if exact_everywhere else tuple(c for c in ALL_CPU_CLASSES
                                                           if c not in SATURATING_CPU_CLASSES)
    why = ("7-bit weights: u8 x s7 pair sums (at most 32,640) fit the int16 of AVX2/AVX-512 vpmaddubsw, and "
           "VNNI/AMX/Arm accumulate in int32, so every class computes the same integers" if exact_everywhere else
           "8-bit weights: u8 x s8 pair sums can saturate int16 on x86 without VNNI (AVX2, AVX-512F)")
    return {"weight_bits": weight_bits, "valid_cpu_classes": list(valid), "why": why,
            "measured_on": [cpu_class()]}
