"""Where the model runs and in which dtype: ``--device`` / ``--dtype`` resolved once, checked before loading.

``auto`` picks the first CUDA GPU in bfloat16 (float16 on a GPU without bf16), else Apple's MPS in
float16, else the CPU in float32. float16 on the CPU is refused: PyTorch's CPU kernels for it are slow and
some are missing; bfloat16 on the CPU runs (slowly) and is allowed. Whatever the compute dtype, the
dense reference, the KL and the quantisers work in float32 (see :mod:`profiling.runner`), so 8-bit
sensitivities do not vanish in bf16 rounding.

:func:`resolve_device` is pure: the hardware it may use is passed in as a :class:`Hardware`, which
:func:`detect_hardware` measures, so the rules are tested without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .settings import DEVICES, DTYPES, SettingsError

DTYPE_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Hardware:
    cuda_devices: int = 0
    cuda_bf16: bool = False
    mps: bool = False


@dataclass(frozen=True)
class Placement:
    """A resolved device and compute dtype."""

    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> str:
        return f"{self.device} {self.dtype_name}"


def detect_hardware() -> Hardware:
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    bf16 = bool(cuda) and torch.cuda.is_bf16_supported()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return Hardware(cuda_devices=cuda, cuda_bf16=bf16, mps=mps)


def resolve_device(device: str = "auto", dtype: str = "auto", hardware: Hardware | None = None) -> Placement:
    """``device``/``dtype`` as typed (auto, cpu, cuda[:N], mps / auto, float32, bfloat16, float16) -> a
    :class:`Placement`, or a one-line :class:`SettingsError` naming the fix."""
    hw = hardware if hardware is not None else detect_hardware()
    text = (device or "auto").strip().lower()
    kind, _, index_text = text.partition(":")
    if kind not in DEVICES:
        raise SettingsError(f"device {device!r} is not one of {', '.join(DEVICES)} (cuda:N for a GPU)")
    if index_text and kind != "cuda":
        raise SettingsError(f"device {device!r} takes no index: pass --device {kind}")
    if dtype not in DTYPES:
        raise SettingsError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if kind == "auto":
        kind = "cuda" if hw.cuda_devices else ("mps" if hw.mps else "cpu")
    if kind == "cuda":
        if not hw.cuda_devices:
            raise SettingsError(f"device {device} needs a CUDA GPU and torch sees none: pass --device cpu (or auto)")
        try:
            index = int(index_text) if index_text else 0
        except ValueError:
            raise SettingsError(f"device {device!r} is not cuda:N with N a GPU number: "
                                f"pass e.g. --device cuda:0") from None
        if not 0 <= index < hw.cuda_devices:
            raise SettingsError(f"device {device} does not exist ({hw.cuda_devices} GPU(s)): pass --device "
                                f"cuda:0{'' if hw.cuda_devices == 1 else f'..{hw.cuda_devices - 1}'}")
        target = torch.device("cuda", index)
        default = "bfloat16" if hw.cuda_bf16 else "float16"
        if dtype == "bfloat16" and not hw.cuda_bf16:
            raise SettingsError("this GPU cannot compute in bfloat16: pass --dtype float16 or float32")
    elif kind == "mps":
        if not hw.mps:
            raise SettingsError("device mps needs Apple's Metal backend and torch sees none: pass --device cpu")
        target, default = torch.device("mps"), "float16"
    else:
        target, default = torch.device("cpu"), "float32"
        if dtype == "float16":
            raise SettingsError("float16 on the CPU is slow and lacks kernels: pass --dtype bfloat16 or float32")
    return Placement(target, DTYPE_BY_NAME[default if dtype == "auto" else dtype])
