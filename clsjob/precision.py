"""Which floating-point type a model runs in, chosen by what the hardware does natively.

bf16 halves the bytes every weight and activation moves and, where the hardware multiplies
bf16 natively, doubles or triples the arithmetic rate: on GPUs with bf16 tensor cores, and on
x86 CPUs with AVX-512 BF16 or AMX. On a 2-core Xeon with AMX (bench/RESULTS.md, CPU
precision) fine-tuned all-MiniLM-L6-v2 models labelled 2.1-2.5x the rows/s in bf16, with
99.8-100% of rows keeping their label. Elsewhere bf16 is emulated and slower than fp32, so
those CPUs stay in fp32."""
from __future__ import annotations

from pathlib import Path

# x86 feature flags (as /proc/cpuinfo spells them) of native bf16 arithmetic.
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags; empty where the kernel does not list them (not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))


def resolve_dtype(setting: str, device: str, flags: set[str] | None = None) -> str:
    """The dtype name a model runs in on `device` ("cpu" or "cuda[:n]") for `backend.dtype`:
    an explicit setting as given, "auto" by the hardware."""
    if setting != "auto":
        return setting
    if device.startswith("cuda"):
        import torch
        # GPUs before Ampere (V100, T4) have fp16 tensor cores but emulate bf16.
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bf16(flags) else "float32"
