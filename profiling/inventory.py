"""Inventory of a model's quantisable weights, grouped into *genes*.

A gene is the unit the search assigns one quantisation type (qtype) to:

- ``block`` granularity: one gene per decoder block (all its linears share a qtype), named
  ``block.11``;
- ``linear`` granularity: one gene per linear inside the blocks, named after its module path relative to
  the model's block list's parent, e.g. ``layers.11.mlp.down_proj`` (Llama) or ``h.3.attn.c_attn`` (GPT-2);
- with ``include_embeddings``, at either granularity: the token embedding (``embed_tokens``) and, when it
  is not tied to it, the output head (``lm_head``) are genes too. A tied embedding is one gene: one
  tensor serves both ends of the model (and llama.cpp stores it once, as ``token_embd``).

Everything that is not a gene (norms, biases, and the embeddings unless they are genes) stays at 16
bits and is counted as *fixed* memory. Works for Llama-family (``model.layers``), GPT-2
(``transformer.h``, whose ``Conv1D`` stores weights transposed) and GPT-NeoX (``gpt_neox.layers``)
names, and any model whose decoder blocks are the largest ``nn.ModuleList`` of identical modules.

A gene's ``block`` says where the model first reads it, which is what the profiler's prefix reuse
needs: the embedding is read before block 0 (``block = -1``), an untied head after the last block
(``block = n_blocks``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .settings import GRANULARITIES

FIXED_BYTES_PER_PARAM = 2  # non-gene parameters ship in fp16/bf16
EMBEDDING_GENE, OUTPUT_GENE = "embed_tokens", "lm_head"


class InventoryError(ValueError):
    pass


@dataclass(frozen=True)
class WeightRef:
    """One quantisable weight: its module path in the model and its (out, in) shape.

    An embedding's (vocab, hidden) matrix is handled like a linear's (out, in): rows of ``hidden``
    values, quantised along them, exactly as llama.cpp stores ``token_embd``."""

    path: str
    block: int
    out_features: int
    in_features: int
    transposed: bool = False  # GPT-2 Conv1D keeps weight as (in, out)
    kind: str = "linear"  # "linear", "embedding" or "output"

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class Gene:
    name: str
    block: int
    weights: tuple[WeightRef, ...]

    @property
    def params(self) -> int:
        return sum(w.params for w in self.weights)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(w.out_features, w.in_features) for w in self.weights]


@dataclass
class Inventory:
    granularity: str
    blocks_path: str  # e.g. "model.layers"
    genes: list[Gene]
    total_params: int  # unique parameters of the whole model (tied weights once)
    n_blocks: int = 0
    fixed_params: int = field(init=False)

    def __post_init__(self) -> None:
        self.fixed_params = self.total_params - sum(g.params for g in self.genes)

    @property
    def weights(self) -> tuple[WeightRef, ...]:
        """Every gene weight, in gene order."""
        return tuple(w for g in self.genes for w in g.weights)

    @property
    def fixed_bytes(self) -> int:
        return self.fixed_params * FIXED_BYTES_PER_PARAM

    def gene_names(self) -> list[str]:
        return [g.name for g in self.genes]

    def valid_table(self, quantizer, qtypes) -> np.ndarray:
        """(n_genes, n_qtypes) bool: which qtype fits every weight of each gene (ggml K-quants need
        rows that are a multiple of 256)."""
        return np.array([[all(quantizer.valid_for(q, w.out_features, w.in_features) for w in g.weights)
                          for q in qtypes] for g in self.genes], dtype=bool)

    def cost_table(self, quantizer, qtypes) -> np.ndarray:
        """Bytes of each gene at each qtype, shape (n_genes, n_qtypes), from the quantiser's layout;
        -1 where the qtype does not fit the gene."""
        valid = self.valid_table(quantizer, qtypes)
        return np.array(
            [[sum(quantizer.weight_bytes(q, w.out_features, w.in_features) for w in g.weights) if valid[i, j] else -1
              for j, q in enumerate(qtypes)] for i, g in enumerate(self.genes)],
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


def build_inventory(model: nn.Module, granularity: str = "block", include_embeddings: bool = False) -> Inventory:
    if granularity not in GRANULARITIES:
        raise InventoryError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    blocks_path, blocks = find_blocks(model)
    short_prefix = blocks_path.rsplit(".", 1)[-1]  # "layers" of "model.layers"
    genes: list[Gene] = []
    if include_embeddings:
        genes.extend(_embedding_genes(model, len(blocks))[:1])
    for index, block in enumerate(blocks):
        linears = []
        for sub_path, module in block.named_modules():
            shape = _weight_shape(module)
            if shape is None or not sub_path:
                continue
            out_f, in_f, transposed = shape
            linears.append(WeightRef(f"{blocks_path}.{index}.{sub_path}", index, out_f, in_f, transposed))
        if not linears:
            raise InventoryError(f"block {index} has no linear layers: unsupported architecture")
        if granularity == "block":
            genes.append(Gene(f"block.{index}", index, tuple(linears)))
        else:
            for lin in linears:
                genes.append(Gene(f"{short_prefix}.{index}.{lin.path.split(f'{blocks_path}.{index}.', 1)[1]}",
                                  index, (lin,)))
    if include_embeddings:
        genes.extend(_embedding_genes(model, len(blocks))[1:])
    total = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    return Inventory(granularity=granularity, blocks_path=blocks_path, genes=genes, total_params=total,
                     n_blocks=len(blocks))


def _embedding_genes(model: nn.Module, n_blocks: int) -> list[Gene]:
    """[embedding gene, output gene if untied]: the input embedding and the LM head as genes."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise InventoryError("this model has no nn.Embedding input embedding: leave out --include-embeddings")
    emb_path = _module_path(model, emb)
    vocab, hidden = emb.weight.shape
    out = [Gene(EMBEDDING_GENE, -1, (WeightRef(emb_path, -1, vocab, hidden, kind="embedding"),))]
    if head is not None and head.weight is not emb.weight:
        shape = _weight_shape(head)
        if shape is None:
            raise InventoryError("the output head is not a linear layer: leave out --include-embeddings")
        out.append(Gene(OUTPUT_GENE, n_blocks, (WeightRef(_module_path(model, head), n_blocks, shape[0], shape[1],
                                                          shape[2], kind="output"),)))
    return out


def _module_path(model: nn.Module, target: nn.Module) -> str:
    for path, module in model.named_modules():
        if module is target:
            return path
    raise InventoryError("embedding module not found in the model")  # pragma: no cover


def tied_embeddings(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    return head is not None and emb is not None and head.weight is emb.weight


def get_weight(model: nn.Module, ref: WeightRef) -> torch.Tensor:
    """The weight of ``ref`` as an (out, in) tensor view."""
    w = model.get_submodule(ref.path).weight
    return w.t() if ref.transposed else w


def set_weight(model: nn.Module, ref: WeightRef, weight_out_in: torch.Tensor) -> None:
    """Overwrite the weight of ``ref`` in place from an (out, in) tensor."""
    w = model.get_submodule(ref.path).weight
    with torch.no_grad():
        w.copy_(weight_out_in.t() if ref.transposed else weight_out_in)
