"""Training precision that fits the hardware: `--precision auto|fp32|bf16|fp16`.

bf16 autocast is a win only where the CPU computes bf16 natively. Without bf16 units PyTorch emulates it
and a training step becomes several times slower: AMD EPYC Zen 3 (AVX2 + FMA only), a 3-layer conv stack,
batch 32 at 224 px, forward + backward, 1 thread: fp32 5.4 s, bf16 autocast 44 s (shared FACTS.md). So
`auto` means bf16 on CPUs with AVX512_BF16 or AMX, fp32 on every other CPU; on CUDA bf16 where the GPU
supports it (Ampere and newer), fp16 otherwise. fp16 autocast on a CPU has no fast kernels anywhere: it
is refused rather than silently slow.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeretina.cpu import has_native_bf16
from edgeretina.choices import TRAINING_PRECISIONS
from edgeretina.errors import ConfigError

PRECISIONS = TRAINING_PRECISIONS


@dataclass(frozen=True)
class ResolvedPrecision:
    name: str        # "fp32" | "bf16" | "fp16": what the loop autocasts to
    reason: str      # why, for the log and the checkpoint

    @property
    def autocast_dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)


def resolve_precision(requested: str, device: str = "cpu", flags: list[str] | tuple[str, ...] | None = None,
                      cuda_bf16: bool | None = None) -> ResolvedPrecision:
    """The autocast precision for `requested` on `device` ("cpu" or "cuda"). flags: the CPU's ISA flags
    (default: this CPU's); cuda_bf16: whether the GPU has bf16 (default: ask torch)."""
    if requested not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if device.startswith("cuda"):
        return _resolve_cuda(requested, cuda_bf16)
    if requested == "fp16":
        raise ConfigError("fp16 training is for CUDA; on a CPU use bf16 (where the CPU has bf16 units) or fp32")
    native = has_native_bf16(flags)
    if requested == "auto":
        return (ResolvedPrecision("bf16", "auto: the CPU computes bf16 natively (AVX512_BF16/AMX)") if native else
                ResolvedPrecision("fp32", "auto: no bf16 units on this CPU (bf16 would be emulated, ~8x slower)"))
    if requested == "bf16" and not native:
        return ResolvedPrecision("bf16", "requested; warning: this CPU has no bf16 units, expect a slow run")
    return ResolvedPrecision(requested, "requested")


def _resolve_cuda(requested: str, cuda_bf16: bool | None) -> ResolvedPrecision:
    if cuda_bf16 is None:
        import torch

        cuda_bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if requested == "auto":
        return (ResolvedPrecision("bf16", "auto: the GPU supports bf16") if cuda_bf16 else
                ResolvedPrecision("fp16", "auto: the GPU has no bf16; fp16 with loss scaling"))
    if requested == "bf16" and not cuda_bf16:
        raise ConfigError("this GPU has no bf16 support: use --precision fp16 or auto")
    return ResolvedPrecision(requested, "requested")
