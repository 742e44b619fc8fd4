"""Which torch device a command runs on: `--device auto|cpu|cuda|cuda:N|mps`.

auto is CUDA when torch sees a GPU, else Apple's MPS, else the CPU. A device that is not there is one
line naming it, before any work. Results do not depend on the device beyond floating-point rounding.
"""

from __future__ import annotations

import torch

from retrocli.errors import RetroError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
PRECISIONS = ("fp32", "bf16")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    if isinstance(name, torch.device):
        return name
    text = (name or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise RetroError(f"--device {name}: not a device (use {DEVICE_CHOICES})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RetroError(f"--device {name}: no CUDA GPU is visible to torch here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RetroError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not _mps_available():
            raise RetroError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    elif device.type != "cpu":
        raise RetroError(f"--device {name}: not supported (use {DEVICE_CHOICES})")
    return device


def cpu_features() -> dict[str, bool | str]:
    """What torch's own CPU feature queries report. get_cpu_capability() names the vector ISA torch
    dispatches to ("AVX512" on a Sapphire Rapids that also has AMX-BF16), not the bf16 units, so those
    are asked for one by one."""
    import torch.cpu as cpu

    def ask(name: str) -> bool:
        query = getattr(cpu, name, None)
        return bool(query()) if query is not None else False

    return {"capability": torch.backends.cpu.get_cpu_capability(), "amx_tile": ask("_is_amx_tile_supported"),
            "avx512_bf16": ask("_is_avx512_bf16_supported"), "avx512": ask("_is_avx512_supported"),
            "avx2": ask("_is_avx2_supported")}


def native_bf16(device: str | torch.device | None = None) -> bool:
    """Whether `device` (default: the CPU) runs bf16 matmuls in hardware: AMX tiles or AVX512-BF16 on x86,
    SVE on Arm, or a CUDA GPU that supports bf16. Without it bf16 is emulated and slower than fp32."""
    if device is not None and torch.device(device).type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device is not None and torch.device(device).type == "mps":
        return False
    features = cpu_features()
    return bool(features["amx_tile"] or features["avx512_bf16"] or "SVE" in str(features["capability"]))


def resolve_precision(precision: str, recorded: str | None = None, device: str | torch.device | None = None) -> str:
    """'auto' is bf16 where `device` runs it natively, else fp32; a DB already (partly) embedded keeps the
    precision it records, so a rerun or resume never mixes the two."""
    if precision not in PRECISIONS + ("auto",):
        raise RetroError(f"--precision: must be auto, fp32 or bf16, got '{precision}'")
    if precision != "auto":
        return precision
    if recorded is not None:
        return recorded
    return "bf16" if native_bf16(device) else "fp32"


# Dense peak FLOP/s (bf16 tensor cores; fp32 without TF32, torch's default) of GPUs by the name torch
# reports, from the vendors' data sheets: the denominator of MFU. Other devices (CPUs included) have no
# entry, and their MFU is not reported.
_PEAK_FLOPS = (  # (name contains, bf16, fp32); first match wins
    ("H200", 989.4e12, 66.9e12),
    ("H100 PCIe", 756.0e12, 51.2e12),
    ("H100", 989.4e12, 66.9e12),
    ("A100", 312.0e12, 19.5e12),
    ("L40S", 362.1e12, 91.6e12),
    ("L4", 121.0e12, 30.3e12),
)


def peak_flops(device: str | torch.device, precision: str) -> float | None:
    """The device's dense peak FLOP/s at `precision`, or None where not known."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for part, bf16, fp32 in _PEAK_FLOPS:
        if part in name:
            return bf16 if precision == "bf16" else fp32
    return None


def resolve_devices(spec: str) -> list[torch.device]:
    """`--devices`: 'all' (every CUDA GPU torch sees) or a comma-separated list such as cuda:0,cuda:1
    (cpu,cpu runs that many CPU processes). All of one type, so that one precision serves them all."""
    text = spec.strip().lower()
    if text == "all":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise RetroError("--devices all: no CUDA GPU is visible to torch here; list devices, e.g. cpu,cpu")
        return [torch.device("cuda", i) for i in range(count)]
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise RetroError(f"--devices '{spec}': expected 'all' or a list such as cuda:0,cuda:1")
    devices = []
    for name in names:
        try:
            devices.append(resolve_device(name))
        except RetroError as err:  # "--device X: why" becomes "--devices LIST: X: why"
            raise RetroError(f"--devices {spec}: {str(err).removeprefix('--device ')}") from None
    devices = [torch.device("cuda", 0) if d.type == "cuda" and d.index is None else d for d in devices]
    if len({d.type for d in devices}) > 1:
        raise RetroError(f"--devices {spec}: all devices must be of one type")
    if len({str(d) for d in devices if d.type != "cpu"}) < len([d for d in devices if d.type != "cpu"]):
        raise RetroError(f"--devices {spec}: a GPU is listed twice")
    return devices
