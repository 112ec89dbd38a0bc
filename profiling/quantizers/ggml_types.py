"""The catalogue of llama.cpp's tensor types that EMPAS offers: sizes, shape rules and fallbacks.

Data only, no llama.cpp code and no ctypes: block sizes and bytes per block come from
``gguf.constants.GGML_QUANT_SIZES`` (llama.cpp's own Python package), so this module imports quickly
and settings can be validated before any native library is loaded.

A type stores a row of ``n`` weights as ``n / block_size`` blocks of ``type_size`` bytes, so it fits a
weight only when the row length (``in_features``) is a multiple of its block size: 256 for the
K-quants, IQ4_XS and IQ3_S, 32 for the others. :data:`SHAPE_FALLBACK` is what ``llama-quantize`` silently
uses instead when a row does not fit (``tensor_type_fallback`` in llama.cpp's ``llama-quant.cpp``):
EMPAS offers each gene only the types valid for it, and the preset baselines reproduce the fallbacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class GgmlType:
    label: str  # the qtype label EMPAS uses: lower-case ggml name ("q4_k")
    name: str  # llama.cpp's own spelling ("Q4_K"), for tables and --tensor-type files
    type_id: int  # the ggml_type enum value
    block_size: int  # weights per block
    type_size: int  # bytes per block

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def fits(self, in_features: int) -> bool:
        return in_features > 0 and in_features % self.block_size == 0

    def row_bytes(self, in_features: int) -> int:
        return in_features // self.block_size * self.type_size


#: The types EMPAS can quantise to (by ggml's name) and, by default, offers. ``f16`` means unquantised.
#: IQ3_S is the one sub-4-bit IQ type llama.cpp quantises without an importance matrix; the IQ2/IQ1
#: types and IQ3_XXS need one (``llama-quantize`` refuses them without it) and are not offered.
SUPPORTED = ("F16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_NL", "IQ4_XS",
             "Q3_K", "IQ3_S", "Q2_K")
DEFAULT_TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_NL", "Q3_K",
                 "Q2_K")
UNQUANTIZED = "f16"

#: llama.cpp's replacement for a type whose block does not divide the row (then F16 if that fails too).
SHAPE_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
                  "IQ4_XS": "IQ4_NL", "IQ3_S": "IQ4_NL"}


@lru_cache(maxsize=None)
def catalogue() -> dict[str, GgmlType]:
    """label -> :class:`GgmlType` for every supported type."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    out = {}
    for name in SUPPORTED:
        enum = GGMLQuantizationType[name]
        block, size = GGML_QUANT_SIZES[enum]
        out[name.lower()] = GgmlType(label=name.lower(), name=name, type_id=int(enum.value), block_size=block,
                                     type_size=size)
    return out


def ggml_type(label: str) -> GgmlType:
    """The type for a label (any case: "Q4_K", "q4_k"); ``KeyError`` if unsupported."""
    return catalogue()[label.strip().lower()]


def fallback_for(label: str, in_features: int) -> str:
    """The label llama.cpp ends up with for ``label`` on rows of ``in_features`` weights."""
    t = ggml_type(label)
    if t.fits(in_features):
        return t.label
    replacement = SHAPE_FALLBACK.get(t.name)
    if replacement is not None and ggml_type(replacement).fits(in_features):
        return replacement.lower()
    return UNQUANTIZED
