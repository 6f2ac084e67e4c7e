"""Device choice, in one place: every command and library entry point asks here.

Order of preference for ``"auto"``: CUDA (NVIDIA, and AMD through ROCm builds of torch), Intel XPU,
Ascend NPU (only when the ``torch_npu`` plug-in imports), Apple MPS, then the CPU.
"""

from __future__ import annotations

import platform

import torch

from .config import PRECISIONS
from .errors import NanoseekError

KNOWN_DEVICE_TYPES = ("cuda", "xpu", "npu", "mps", "cpu")


def _npu_module():
    """``torch.npu`` when the Ascend plug-in is installed and sees a device, else ``None``."""
    try:
        import torch_npu  # noqa: F401  (registers torch.npu and the "npu" device type)
    except Exception:  # ImportError, or a broken driver install raising at import
        return None
    npu = getattr(torch, "npu", None)
    return npu


def _available(device_type: str) -> bool:
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return torch.cuda.is_available()
    if device_type == "xpu":
        xpu = getattr(torch, "xpu", None)
        return bool(xpu is not None and xpu.is_available())
    if device_type == "npu":
        npu = _npu_module()
        return bool(npu is not None and npu.is_available())
    if device_type == "mps":
        mps = getattr(torch.backends, "mps", None)
        return bool(mps is not None and mps.is_available())
    return False


def _device_count(device_type: str) -> int:
    if device_type == "cuda":
        return torch.cuda.device_count()
    if device_type == "xpu":
        return torch.xpu.device_count()
    if device_type == "npu":
        return torch.npu.device_count()
    return 1


def pick_device(preference: str | None = None) -> torch.device:
    """The device to run on.

    ``None`` or ``"auto"`` picks the best available one; an explicit name (``"cuda"``, ``"cuda:1"``,
    ``"xpu"``, ``"npu"``, ``"mps"``, ``"cpu"``) is checked and raises :class:`NanoseekError` naming it
    when this machine does not have it.
    """
    if preference is None or preference.strip().lower() in ("", "auto"):
        for device_type in KNOWN_DEVICE_TYPES:
            if _available(device_type):
                return torch.device(device_type)
        return torch.device("cpu")

    text = preference.strip().lower()
    device_type, _, index_text = text.partition(":")
    if device_type not in KNOWN_DEVICE_TYPES:
        raise NanoseekError(f"unknown device {preference!r} (choose from auto, "
                            f"{', '.join(KNOWN_DEVICE_TYPES)}, optionally with ':<index>')")
    index = None
    if index_text:
        if not index_text.isdigit():
            raise NanoseekError(f"bad device index in {preference!r}")
        index = int(index_text)
    if not _available(device_type):
        hint = " (install the torch_npu plug-in)" if device_type == "npu" else ""
        raise NanoseekError(f"device {preference!r} was requested but is not available on this "
                            f"machine{hint}")
    if index is not None:
        count = _device_count(device_type)
        if index >= count:
            raise NanoseekError(f"device {preference!r} was requested but this machine has only "
                                f"{count} {device_type} device(s)")
        return torch.device(device_type, index)
    return torch.device(device_type)


def cpu_computes_bf16_natively() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX) and torch's kernels
    use it (ATen dispatches to its AVX-512 kernels, i.e. ``ATEN_CPU_CAPABILITY`` does not cap it lower).

    There, bfloat16 GEMMs run 3-4x faster than float32 ones (benchmarks/RESULTS.md, "bfloat16 autocast
    on the CPU"); elsewhere the CPU emulates bfloat16 and autocast only slows training down.
    """
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    has_bf16 = any(probe() for probe in probes if probe is not None)
    return has_bf16 and torch.backends.cpu.get_cpu_capability() == "AVX512"


def autocast_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for mixed precision on ``device``, or ``None`` for plain float32.

    ``precision`` is a training config's setting: ``"float32"`` (no autocast), ``"bfloat16"``
    (autocast to bfloat16 wherever asked), or ``"auto"``: bfloat16 where the chip computes in it
    natively -- CUDA devices that support it (Ampere and newer, recent ROCm), Intel XPU, Ascend NPU
    and CPUs for which :func:`cpu_computes_bf16_natively` holds -- else float32 (MPS, older CUDA cards:
    float16 would need loss scaling; CPUs without bfloat16 instructions). The weights, gradients and
    optimizer state stay float32 either way.
    """
    if precision not in PRECISIONS:
        raise NanoseekError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if precision != "auto":
        return torch.bfloat16 if precision == "bfloat16" else None
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    if device.type in ("xpu", "npu"):
        return torch.bfloat16
    if device.type == "cpu" and cpu_computes_bf16_natively():
        return torch.bfloat16
    return None


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    """A human-readable name of the chip behind ``device``, for logs and report cards."""
    device = torch.device(device)
    index = device.index if device.index is not None else 0
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_name(index)
        if device.type == "xpu":
            return torch.xpu.get_device_name(index)
        if device.type == "npu":
            return torch.npu.get_device_name(index)
    except Exception:  # a name is cosmetic; never fail a run over it
        return device.type
    if device.type == "mps":
        return f"Apple MPS ({platform.processor() or platform.machine() or 'arm'})"
    return _cpu_model_name()


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (for honest timings); a no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
