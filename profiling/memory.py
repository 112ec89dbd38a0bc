"""The memory objective's layout: what each gene costs at each qtype, and what everything else costs.

- :class:`QuantizerLayout` ("memory model"): the quantiser's own storage layout per weight, and every
  non-gene parameter at 16 bits. What the RTN packed checkpoint stores, byte for byte.
- :class:`GgufFileLayout` ("gguf file"): the exact bytes of the GGUF file llama.cpp loads (header,
  metadata and tokenizer, tensor infos, alignment padding, every tensor), so ``--max-mib`` bounds the
  file size a user sees. Non-gene matrices are written in F16, norms in F32.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)


class MemoryLayout(Protocol):
    basis: str

    def cost_table(self, inventory, quantizer, qtypes) -> np.ndarray:
        """(genes, qtypes) bytes; -1 where a qtype does not fit a gene."""

    def fixed_bytes(self, inventory) -> int:
        """Bytes of everything that is not a gene."""


class QuantizerLayout:
    basis = "memory model"

    def cost_table(self, inventory, quantizer, qtypes) -> np.ndarray:
        return inventory.cost_table(quantizer, qtypes)

    def fixed_bytes(self, inventory) -> int:
        return inventory.fixed_bytes


class GgufFileLayout:
    basis = "gguf file"

    def __init__(self, layout):
        self.layout = layout  # profiling.deploy.gguf_layout.GgufLayout

    def cost_table(self, inventory, quantizer, qtypes) -> np.ndarray:
        valid = inventory.valid_table(quantizer, qtypes)
        table = np.full(valid.shape, -1, dtype=np.int64)
        for i, gene in enumerate(inventory.genes):
            for j, q in enumerate(qtypes):
                if valid[i, j]:
                    table[i, j] = sum(self.layout.tensor_bytes(w.path, q) for w in gene.weights)
        return table

    def fixed_bytes(self, inventory) -> int:
        from .deploy.gguf_layout import pad

        genes = {self.layout.tensor(w.path).name for w in inventory.weights}
        rest = sum(self.layout.tensor_bytes(t.name, "f16" if t.is_matrix else "f32")
                   for t in self.layout.tensors if t.name not in genes)
        return pad(self.layout.metadata_bytes, self.layout.alignment) + rest


def memory_layout(loaded, inventory, quantizer) -> MemoryLayout:
    """The layout of what this quantiser ships: the GGUF file for ggml, the packed checkpoint for RTN.

    A model whose GGUF cannot be described (an architecture llama.cpp's Llama writer does not cover, a
    tokenizer it cannot store) falls back to the quantiser's memory model, labelled so; exporting it
    as GGUF then fails with the reason."""
    if getattr(quantizer, "name", "") != "ggml":
        return QuantizerLayout()
    from .deploy.gguf_layout import GgufExportError
    from .deploy.gguf_writer import gguf_layout_for

    try:
        return GgufFileLayout(gguf_layout_for(loaded.model, loaded.tokenizer, loaded.gguf_path))
    except (GgufExportError, ImportError, OSError) as exc:
        log.warning("memory objective: the quantiser's memory model, not the GGUF file (%s)",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return QuantizerLayout()
