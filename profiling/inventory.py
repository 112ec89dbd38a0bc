"""Inventory of a model's quantisable layers, grouped into *genes*.

A gene is the unit the search assigns one bit-width to:

- ``block`` granularity: one gene per decoder block (all its linears share a bit-width), named
  ``block.11``;
- ``linear`` granularity: one gene per linear inside the blocks, named after its module path relative to
  the model's block list's parent, e.g. ``layers.11.mlp.down_proj`` (Llama) or ``h.3.attn.c_attn`` (GPT-2).

Everything that is not a gene (embeddings, norms, LM head, biases) stays at 16 bits and is counted as
*fixed* memory. Works for Llama-family (``model.layers``), GPT-2 (``transformer.h``, whose ``Conv1D``
stores weights transposed) and GPT-NeoX (``gpt_neox.layers``) names, and any model whose decoder blocks
are the largest ``nn.ModuleList`` of identical modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

GRANULARITIES = ("block", "linear")
FIXED_BYTES_PER_PARAM = 2  # non-gene parameters ship in fp16/bf16


class InventoryError(ValueError):
    pass


@dataclass(frozen=True)
class LinearRef:
    """One quantisable weight: its module path in the model and its (out, in) shape."""

    path: str
    block: int
    out_features: int
    in_features: int
    transposed: bool = False  # GPT-2 Conv1D keeps weight as (in, out)

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class Gene:
    name: str
    block: int
    linears: tuple[LinearRef, ...]

    @property
    def params(self) -> int:
        return sum(lin.params for lin in self.linears)


@dataclass
class Inventory:
    granularity: str
    blocks_path: str  # e.g. "model.layers"
    genes: list[Gene]
    total_params: int  # unique parameters of the whole model (tied weights once)
    fixed_params: int = field(init=False)

    def __post_init__(self) -> None:
        self.fixed_params = self.total_params - sum(g.params for g in self.genes)

    @property
    def n_blocks(self) -> int:
        return 1 + max(g.block for g in self.genes)

    @property
    def fixed_bytes(self) -> int:
        return self.fixed_params * FIXED_BYTES_PER_PARAM

    def gene_names(self) -> list[str]:
        return [g.name for g in self.genes]

    def cost_table(self, quantizer, bits: list[int]) -> np.ndarray:
        """Bytes of each gene at each bit-width, shape (n_genes, n_bits), from the quantiser's layout."""
        return np.array(
            [[sum(quantizer.weight_bytes(lin.out_features, lin.in_features, b) for lin in g.linears)
              for b in bits] for g in self.genes],
            dtype=np.int64,
        )


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList of identical modules holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        n = sum(p.numel() for p in module.parameters())
        if best is None or n > best[0]:
            best = (n, path, module)
    if best is None:
        raise InventoryError("no decoder blocks found (no nn.ModuleList of layers): unsupported architecture")
    return best[1], best[2]


def _weight_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    """(out, in, transposed) for quantisable linear-like modules, else None."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, False
    # transformers' GPT-2 style Conv1D: a linear whose weight is stored as (in, out).
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        w = module.weight
        if w.dim() == 2:
            return w.shape[1], w.shape[0], True
    return None


def build_inventory(model: nn.Module, granularity: str = "block") -> Inventory:
    if granularity not in GRANULARITIES:
        raise InventoryError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    blocks_path, blocks = find_blocks(model)
    short_prefix = blocks_path.rsplit(".", 1)[-1]  # "layers" of "model.layers"
    genes: list[Gene] = []
    for index, block in enumerate(blocks):
        linears = []
        for sub_path, module in block.named_modules():
            shape = _weight_shape(module)
            if shape is None or not sub_path:
                continue
            out_f, in_f, transposed = shape
            linears.append(LinearRef(f"{blocks_path}.{index}.{sub_path}", index, out_f, in_f, transposed))
        if not linears:
            raise InventoryError(f"block {index} has no linear layers: unsupported architecture")
        if granularity == "block":
            genes.append(Gene(f"block.{index}", index, tuple(linears)))
        else:
            for lin in linears:
                genes.append(Gene(f"{short_prefix}.{index}.{lin.path.split(f'{blocks_path}.{index}.', 1)[1]}",
                                  index, (lin,)))
    total = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    return Inventory(granularity=granularity, blocks_path=blocks_path, genes=genes, total_params=total)


def get_weight(model: nn.Module, lin: LinearRef) -> torch.Tensor:
    """The weight of ``lin`` as an (out, in) tensor view."""
    w = model.get_submodule(lin.path).weight
    return w.t() if lin.transposed else w


def set_weight(model: nn.Module, lin: LinearRef, weight_out_in: torch.Tensor) -> None:
    """Overwrite the weight of ``lin`` in place from an (out, in) tensor."""
    w = model.get_submodule(lin.path).weight
    with torch.no_grad():
        w.copy_(weight_out_in.t() if lin.transposed else weight_out_in)
