"""What this machine can run fast, and the one place that decides device and precision.

``auto`` (the default everywhere) picks CUDA when present, else the CPU, and always starts in fp32 with
a reduced precision as the *candidate*: bf16 on GPUs that support it (else fp16), bf16 on CPUs with
native bf16 (AVX512-BF16 or AMX: oneDNN's fused bf16 kernels), else the int8 path
(``kernels.int8.Int8Tower``); on CPUs with AVX512-BF16 but no AMX, int8 first and bf16 if int8 fails. A
candidate is switched on only after it has passed its self-check against fp32 with the weights actually
loaded (``winclip.precision_check``): it must agree with fp32 and, on the CPU, be faster than fp32 there
(the flags do not tell: with the same AVX512-BF16, a bf16 query took 0.52x an fp32 one's time on a Zen 4
CPU and 1.66x on an Intel Xeon whose AMX was hidden). MuSc, whose scores are relative to its set, keeps
fp32 under ``auto``. Without native bf16, CPU bf16 runs emulated kernels about 8x slower than fp32, so
an explicit ``bf16`` request there is refused with the missing instruction set named. An explicit
precision is used as asked, unchecked.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")  # what the app, the CLI and the library accept

# /proc/cpuinfo flag -> the name people know; in the order they are printed
ISA_FLAGS = (("avx2", "AVX2"), ("fma", "FMA"), ("avx_vnni", "AVX-VNNI"), ("avx512f", "AVX-512"),
             ("avx512_vnni", "AVX512-VNNI"), ("avx512_bf16", "AVX512-BF16"), ("avx512_fp16", "AVX512-FP16"),
             ("amx_bf16", "AMX-BF16"), ("amx_int8", "AMX-INT8"))


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    cores: int

    @property
    def isa(self) -> tuple[str, ...]:
        return tuple(name for flag, name in ISA_FLAGS if flag in self.flags)

    @property
    def native_bf16(self) -> bool:
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
    except OSError:  # not Linux: the model string only
        pass
    return CpuInfo(model, flags, os.cpu_count() or 1)


def torch_cpu_kernels() -> str:
    """The vectorised kernel set torch dispatches to on this CPU (e.g. AVX2, AVX512)."""
    import torch

    getter = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return getter() if getter else "unknown"


def describe_cpu(info: CpuInfo | None = None) -> str:
    """'AMD EPYC (2 cores): AVX2, FMA; no AVX-512, no native bf16; torch kernels AVX2' — printed with every figure."""
    info = info or cpu_info()
    missing = [name for name, present in (("AVX-512", "avx512f" in info.flags),
                                          ("native bf16 (AVX512-BF16/AMX)", info.native_bf16)) if not present]
    isa = ", ".join(info.isa) or "no AVX2"
    return (f"CPU {info.model} ({info.cores} cores): {isa}" + (f"; no {', no '.join(missing)}" if missing else "")
            + f"; torch kernels {torch_cpu_kernels()}")


@dataclass(frozen=True)
class Runtime:
    device: str  # "cpu" | "cuda" | "cuda:N"
    precision: str  # "fp32" | "bf16" | "fp16" | "int8"
    reason: str  # one line, shown in the app's Advanced panel and the CLI's --json
    candidate: str = ""  # "int8", "bf16" or "fp16": auto uses it once its self-check against fp32 passes
    fallback: str = ""  # checked next when the candidate fails its check or is unavailable (int8 -> bf16)


def int8_available() -> str:
    """'' when this torch build has the oneDNN int8 linear the CPU int8 path uses, else why not."""
    import torch

    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i686"):
        return f"the int8 path uses x86 int8 kernels; this is {platform.machine()}"
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")):
        return "this torch build has no oneDNN int8 linear (onednn::qlinear_pointwise)"
    return ""


def choose_runtime(device: str = "auto", precision: str = "auto", info: CpuInfo | None = None,
                   cuda_available: bool | None = None, cuda_bf16: bool | None = None, strict: bool = True) -> Runtime:
    """Resolve ``auto`` device/precision. CPU bf16 without native support: refused (``strict``, the app and
    CLI) or kept with a warning (the library: an explicit request, e.g. to test that path). Raises ValueError."""
    import torch

    device = (device or "auto").strip().lower()
    precision = (precision or "auto").strip().lower()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, got {precision!r}")
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
        why_device = "CUDA is available" if cuda_available else "no CUDA device"
    else:
        why_device = "asked for"
        if device.startswith("cuda") and not cuda_available:
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; use cpu or auto")
        if not (device == "cpu" or device.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda"):
        if cuda_bf16 is None:
            cuda_bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if precision == "auto":
            candidate = "bf16" if cuda_bf16 else "fp16"
            return Runtime(device, "fp32", f"{device} ({why_device}); fp32 until {candidate} passes its check against "
                           "fp32 (" + ("the GPU supports bf16)" if cuda_bf16 else "the GPU has no bf16, fp16 instead)"),
                           candidate=candidate)
        if precision == "int8":
            raise ValueError("precision 'int8' is a CPU path; on CUDA use auto, bf16 or fp16")
        return Runtime(device, precision, f"{device} ({why_device}); {precision} asked for")
    info = info or cpu_info()
    if precision == "int8":
        missing = int8_available()
        if missing:
            raise ValueError(f"precision 'int8' is not available: {missing}. Use auto or fp32.")
        return Runtime("cpu", "int8", f"cpu ({why_device}); int8 asked for (linear layers of the image tower)")
    if precision == "fp16":
        raise ValueError("precision 'fp16' needs a CUDA device; on CPU use auto, fp32 (reference) or bf16 "
                         "(CPUs with AVX512-BF16/AMX)")
    if precision == "bf16" and not info.native_bf16:
        message = (f"precision 'bf16' on this CPU ({info.model}: {', '.join(info.isa) or 'no AVX2'}) would run "
                   "emulated kernels, about 8x slower than fp32: it lacks AVX512-BF16 and AMX. Use precision auto "
                   "or fp32 here.")
        if strict:
            raise ValueError(message)
        import warnings

        warnings.warn(message, stacklevel=3)
        return Runtime("cpu", "bf16", f"cpu ({why_device}); bf16 asked for, emulated on this CPU (slow)")
    if precision == "auto":
        no_int8 = int8_available()
        if info.native_bf16 and ("amx_bf16" in info.flags or no_int8):
            return Runtime("cpu", "fp32", f"cpu ({why_device}); fp32 until bf16 passes its check against fp32 (the "
                           f"CPU has native bf16: {'AMX-BF16' if 'amx_bf16' in info.flags else 'AVX512-BF16'})",
                           candidate="bf16")
        if info.native_bf16:  # AVX512-BF16 without AMX (AMD Zen 4/5, Intel Cooper Lake, Xeons with AMX hidden)
            return Runtime("cpu", "fp32", f"cpu ({why_device}); fp32 until int8 passes its check against fp32, "
                           "else bf16, each only if faster than fp32 here (AVX512-BF16 without AMX: int8 with VNNI "
                           "measured 1.75x faster than bf16)",
                           candidate="int8", fallback="bf16")
        no_bf16 = "the CPU has no native bf16 (AVX512-BF16/AMX), where bf16 would be ~8x slower"
        if no_int8:
            return Runtime("cpu", "fp32", f"cpu ({why_device}); fp32: {no_bf16}, and {no_int8}")
        return Runtime("cpu", "fp32", f"cpu ({why_device}); fp32 until int8 passes its check against fp32: {no_bf16}",
                       candidate="int8")
    return Runtime("cpu", precision, f"cpu ({why_device}); {precision} asked for")
