"""EMPAS's own quantiser: group-wise asymmetric round-to-nearest (RTN), shipped as a packed checkpoint.

One function family serves profiling, evaluation and packing, so that what was measured is exactly
what gets shipped: :meth:`RTNQuantizer.quantize` returns integer codes plus fp16 scales and
zero-points, :meth:`RTNQuantizer.dequantize` turns them back into weights, and
:meth:`RTNQuantizer.fake_quantize` is the composition of the two. Along the input dimension:

    w  ~=  code * scale + zero,      code in [0, 2**bits - 1]

with one fp16 ``scale`` and one fp16 ``zero`` per group of ``group_size`` input columns of each
output row. The last group of a row may be shorter (ragged) when the input width is not a multiple of
``group_size`` (SmolLM2's 576 with groups of 128, say). Qtypes are the bit-widths as strings, "2" to
"8", and "16" meaning "leave the weight as it is".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..settings import DEFAULT_GROUP_SIZE, RTN_UNQUANTIZED, QuantizerError, QuantizerSettings, parse_rtn_bits

UNQUANTIZED_BITS = 16
#: Bits of per-group metadata: one fp16 scale and one fp16 zero-point.
GROUP_METADATA_BITS = 32


def qtype_bits(qtype: str) -> int:
    """The bit-width of an RTN qtype ("4" -> 4), or a one-line error for anything else."""
    (checked,) = parse_rtn_bits([qtype])
    return int(checked)


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
    """Group-wise asymmetric round-to-nearest; implements :class:`profiling.quantizers.Quantizer`."""

    group_size: int = DEFAULT_GROUP_SIZE
    qtypes: tuple[str, ...] = ("2", "4", "8", "16")
    name: str = "rtn"
    unquantized: str = RTN_UNQUANTIZED

    def __post_init__(self) -> None:
        QuantizerSettings(name="rtn", qtypes=tuple(self.qtypes), group_size=self.group_size, imatrix=None).validate()

    @classmethod
    def from_settings(cls, settings: QuantizerSettings) -> "RTNQuantizer":
        return cls(group_size=settings.group_size, qtypes=tuple(settings.qtypes))

    # -- the protocol ------------------------------------------------------------------------------
    def settings(self) -> dict:
        """What identifies this quantiser in a profile key, a study and an artifact."""
        return {"name": self.name, "group_size": self.group_size}

    def valid_for(self, qtype: str, out_features: int, in_features: int) -> bool:
        qtype_bits(qtype)
        return out_features > 0 and in_features > 0  # ragged last groups make every width fit

    def bits_per_weight(self, qtype: str) -> float:
        """The nominal bit-width (metadata not included), as EMPAS's tables have always shown it."""
        return float(qtype_bits(qtype))

    def n_groups(self, in_features: int) -> int:
        return math.ceil(in_features / self.group_size)

    def weight_bytes(self, qtype: str, out_features: int, in_features: int) -> int:
        """Bytes one weight takes at ``qtype`` (codes bit-packed per row + fp16 scale/zero per group).

        This is the memory model the search optimises and the packed checkpoint must match.
        """
        bits = qtype_bits(qtype)
        if bits == UNQUANTIZED_BITS:
            return out_features * in_features * 2
        code_bytes_per_row = math.ceil(in_features * bits / 8)
        meta_bytes_per_row = self.n_groups(in_features) * GROUP_METADATA_BITS // 8
        return out_features * (code_bytes_per_row + meta_bytes_per_row)

    def fake_quantize(self, weight: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as the quantised model will see it (same dtype and shape as ``weight``).

        RTN has no use for an importance matrix: ``importance`` is accepted and ignored."""
        if qtype_bits(qtype) == UNQUANTIZED_BITS:
            return weight
        return self.dequantize(self.quantize(weight, qtype), dtype=weight.dtype)

    # -- the maths (also what the packed checkpoint stores) ----------------------------------------
    def quantize(self, weight: torch.Tensor, qtype: str) -> QuantizedTensor:
        bits = qtype_bits(qtype)
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


def _pad_to_groups(weight: torch.Tensor, padded_width: int) -> torch.Tensor:
    """Pad columns by repeating the last one, so a ragged group's min/max see only real values."""
    missing = padded_width - weight.shape[1]
    if missing == 0:
        return weight
    return torch.cat([weight, weight[:, -1:].expand(-1, missing)], dim=1)
