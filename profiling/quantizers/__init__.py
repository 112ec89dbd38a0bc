"""Quantisers: what a weight becomes at each quantisation type (*qtype*) a gene may take.

A quantiser is built once from its :class:`QuantizerSettings` (:func:`make_quantizer`), and that one
object serves profiling, the measured search, validation and export, so what was measured is what
ships. Two backends implement the :class:`Quantizer` protocol:

- ``rtn`` (:mod:`.rtn`): EMPAS's group-wise asymmetric round-to-nearest. Qtypes are bit-widths, "2" to
  "8", and "16" for "leave the weight as it is". It ships as a packed PyTorch checkpoint.
- ``ggml`` (:mod:`.ggml`): llama.cpp's own quantisers, called in the packaged ``libggml-base`` that
  ``pip install llama-cpp-python`` builds, dequantised with ``gguf``. Qtypes are ggml type names in
  lower case ("q4_k", "q6_k", "q8_0", "iq4_nl", ..., "f16"). It ships as a GGUF file.

A qtype is always a ``str``: it is what the profile's columns, the Optuna parameters, the stored
genomes and the artifacts hold. Not every qtype fits every weight (ggml's K-quants need an input
width that is a multiple of 256): :meth:`Quantizer.valid_for` says which, and each gene is offered
only the qtypes valid for all of its weights.

Weights are always handled as ``(out_features, in_features)`` matrices, quantised along the input
dimension (rows of ``in_features`` values), which is how both llama.cpp and EMPAS's RTN lay out blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..settings import QUANTIZER_NAMES, QuantizerError, QuantizerSettings

if TYPE_CHECKING:  # annotations only: `empas front`, `studies` and option parsing need no torch
    import torch


@runtime_checkable
class Quantizer(Protocol):
    """What every backend provides. Implementations are immutable after construction."""

    #: "rtn" or "ggml"
    name: str
    #: the qtype that leaves a weight untouched (stored in 16 bits): "16" for rtn, "f16" for ggml
    unquantized: str
    #: the qtypes this quantiser offers, in the settings' order
    qtypes: tuple[str, ...]

    def settings(self) -> dict:
        """JSON identity of the quantiser: part of a profile's key, stored in studies and artifacts.

        It holds what changes the quantised *values* (group size, importance matrix), not which
        qtypes are offered: profile entries are kept per qtype, so asking for more qtypes later
        reuses what was measured."""

    def valid_for(self, qtype: str, out_features: int, in_features: int) -> bool:
        """Whether ``qtype`` can store an ``(out_features, in_features)`` weight as it is."""

    def bits_per_weight(self, qtype: str) -> float:
        """Nominal bits per weight of ``qtype``, for the parameter-weighted average bits shown to users."""

    def weight_bytes(self, qtype: str, out_features: int, in_features: int) -> int:
        """Bytes one weight takes when stored at ``qtype``: what the memory objective sums."""

    def fake_quantize(self, weight: "torch.Tensor", qtype: str, importance: "torch.Tensor | None" = None) -> "torch.Tensor":
        """The ``(out, in)`` weight exactly as the shipped model will see it, same dtype and shape.

        ``importance`` (``in_features`` values, the mean of x^2 per input column on calibration text)
        weights the rounding error where the backend supports it (ggml); others ignore it."""


def make_quantizer(settings: QuantizerSettings) -> Quantizer:
    """The quantiser for ``settings`` (validated). Built once per job and passed to everything."""
    settings.validate()
    if settings.name == "rtn":
        from .rtn import RTNQuantizer

        return RTNQuantizer.from_settings(settings)
    from .ggml import GgmlQuantizer

    return GgmlQuantizer.from_settings(settings)


def gene_qtypes(quantizer: Quantizer, shapes: list[tuple[int, int]]) -> list[str]:
    """The qtypes valid for every ``(out, in)`` weight of one gene, in the quantiser's order."""
    return [q for q in quantizer.qtypes if all(quantizer.valid_for(q, o, i) for o, i in shapes)]


__all__ = ["Quantizer", "QuantizerError", "QuantizerSettings", "QUANTIZER_NAMES", "make_quantizer", "gene_qtypes"]
