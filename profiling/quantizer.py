"""Weight quantisers.

One function family serves profiling, evaluation and packing, so that what was measured is exactly
what gets shipped: :func:`quantize` returns integer codes plus fp16 scales and zero-points,
:func:`dequantize` turns them back into weights, and :func:`fake_quantize` is the composition of the
two. The quantiser is group-wise asymmetric round-to-nearest (RTN) along the input dimension:

    w  ~=  code * scale + zero,      code in [0, 2**bits - 1]

with one fp16 ``scale`` and one fp16 ``zero`` per group of ``group_size`` input columns of each
output row. The last group of a row may be shorter (ragged) when the input width is not a multiple of
``group_size`` (SmolLM2's 576 with groups of 128, say). ``bits == 16`` means "leave the weight as it is".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

UNQUANTIZED_BITS = 16
MIN_BITS, MAX_BITS = 2, 8
#: Bits of per-group metadata: one fp16 scale and one fp16 zero-point.
GROUP_METADATA_BITS = 32


class QuantizerError(ValueError):
    """Raised for impossible quantiser settings (bad bit-width, bad group size)."""


def validate_bits(bits: int) -> int:
    """Return ``bits`` if the quantiser supports it (2..8 or 16), else raise a one-line error."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise QuantizerError(f"bit-width {bits!r} is not an integer: use whole numbers from 2 to 8, or 16")
    if bits != UNQUANTIZED_BITS and not (MIN_BITS <= bits <= MAX_BITS):
        raise QuantizerError(f"bit-width {bits} is not supported: use 2 to 8, or 16 for unquantised")
    return bits


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes and per-group parameters of one 2-D weight (``out_features x in_features``)."""

    codes: torch.Tensor  # uint8, (out, in)
    scales: torch.Tensor  # float16, (out, n_groups)
    zeros: torch.Tensor  # float16, (out, n_groups)
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class RTNQuantizer:
    """Group-wise asymmetric round-to-nearest. Pluggable: anything with the same methods will do."""

    group_size: int = 64
    name: str = "rtn"

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
            raise QuantizerError(f"group size {self.group_size!r} must be a positive integer (e.g. 64)")

    # -- settings --------------------------------------------------------------------------------
    def settings(self) -> dict:
        """What identifies this quantiser in a profile key, a study and an artifact."""
        return {"name": self.name, "group_size": self.group_size}

    def n_groups(self, in_features: int) -> int:
        return math.ceil(in_features / self.group_size)

    def weight_bytes(self, out_features: int, in_features: int, bits: int) -> int:
        """Bytes one weight takes when stored at ``bits`` (codes bit-packed per row + fp16 scale/zero).

        This is the memory model the search optimises and the packed checkpoint must match.
        """
        validate_bits(bits)
        if bits == UNQUANTIZED_BITS:
            return out_features * in_features * 2
        code_bytes_per_row = math.ceil(in_features * bits / 8)
        meta_bytes_per_row = self.n_groups(in_features) * GROUP_METADATA_BITS // 8
        return out_features * (code_bytes_per_row + meta_bytes_per_row)

    # -- the maths -------------------------------------------------------------------------------
    def quantize(self, weight: torch.Tensor, bits: int) -> QuantizedTensor:
        validate_bits(bits)
        if bits == UNQUANTIZED_BITS:
            raise QuantizerError("16 bits means unquantised: keep the weight as it is")
        if weight.dim() != 2:
            raise QuantizerError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        groups = self.n_groups(in_features)
        padded = _pad_to_groups(weight.detach().float(), groups * self.group_size)
        grouped = padded.reshape(out_features, groups, self.group_size)
        w_min = grouped.amin(dim=-1)
        w_max = grouped.amax(dim=-1)
        q_max = (1 << bits) - 1
        # Scales and zeros are rounded to fp16 *before* computing codes, so dequantising the stored
        # fp16 values reproduces the fake-quantised weight exactly.
        scales = ((w_max - w_min) / q_max).clamp_min(1e-8).half()
        zeros = w_min.half()
        codes = torch.round((grouped - zeros.float()[..., None]) / scales.float()[..., None])
        codes = codes.clamp_(0, q_max).to(torch.uint8).reshape(out_features, -1)[:, :in_features]
        return QuantizedTensor(codes=codes.contiguous(), scales=scales, zeros=zeros, bits=bits,
                               group_size=self.group_size)

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out_features, in_features = q.codes.shape
        # Expand per-group parameters to per-column, then drop the padding of a ragged last group.
        scales = q.scales.float().repeat_interleave(q.group_size, dim=1)[:, :in_features]
        zeros = q.zeros.float().repeat_interleave(q.group_size, dim=1)[:, :in_features]
        return (q.codes.float() * scales + zeros).to(dtype)

    def fake_quantize(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
        """The weight as the quantised model will see it (same dtype and shape as ``weight``)."""
        if validate_bits(bits) == UNQUANTIZED_BITS:
            return weight
        return self.dequantize(self.quantize(weight, bits), dtype=weight.dtype)


def _pad_to_groups(weight: torch.Tensor, padded_width: int) -> torch.Tensor:
    """Pad columns by repeating the last one, so a ragged group's min/max see only real values."""
    missing = padded_width - weight.shape[1]
    if missing == 0:
        return weight
    return torch.cat([weight, weight[:, -1:].expand(-1, missing)], dim=1)


QUANTIZERS = {"rtn": RTNQuantizer}


def make_quantizer(name: str = "rtn", group_size: int = 64) -> RTNQuantizer:
    try:
        cls = QUANTIZERS[name]
    except KeyError:
        raise QuantizerError(f"unknown quantiser {name!r}: choose one of {sorted(QUANTIZERS)}") from None
    return cls(group_size=group_size)
