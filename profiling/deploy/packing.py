"""Model surgery: a genome applied for real, its quantised linears swapped for :class:`PackedLinear`."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..inventory import Gene, Inventory, WeightRef
from ..quantizers.rtn import UNQUANTIZED_BITS, RTNQuantizer, qtype_bits
from ..runner import quantized_weights
from .packed_modules import PackedLinear, PackingError, compute_dtype_of, store_in_16bit, storage_dtype_for


def _genome(inventory: Inventory, bits_per_gene) -> list[tuple[Gene, int]]:
    """[(gene, bits)] from a list aligned with the genes or a {gene name: qtype} dict."""
    if isinstance(bits_per_gene, dict):
        names = inventory.gene_names()
        missing = [n for n in names if n not in bits_per_gene]
        extra = [n for n in bits_per_gene if n not in set(names)]
        if missing or extra:
            what = f"missing {missing[0]!r}" if missing else f"unknown gene {extra[0]!r}"
            raise PackingError(f"genome does not fit this model's {inventory.granularity} genes ({what}; "
                               f"{len(names)} genes expected): export it for this model and granularity")
        bits = [bits_per_gene[n] for n in names]
    else:
        bits = list(bits_per_gene)
        if len(bits) != len(inventory.genes):
            raise PackingError(f"genome has {len(bits)} bit-widths for {len(inventory.genes)} genes")
    return [(g, qtype_bits(str(b))) for g, b in zip(inventory.genes, bits)]


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def pack_model(model: nn.Module, inventory: Inventory, bits_per_gene, quantizer: RTNQuantizer,
               storage_dtype: torch.dtype | str | None = "auto") -> dict[str, dict]:
    """Replace each quantised gene's linears with :class:`PackedLinear`, in place.

    ``bits_per_gene``: a list aligned with ``inventory.genes`` or a {gene name: bits} dict. 16-bit
    genes stay dense linears. ``storage_dtype`` "auto" (fp16, bf16 for a bf16 model) also gives every
    other module its shipped 16-bit form (:func:`store_in_16bit`); ``None`` leaves them untouched (a
    pure drop-in swap whose outputs equal ``quantized_weights`` on the same model).
    Returns the packed modules' layout {path: {bits, out_features, in_features, transposed}}.
    """
    genome = _genome(inventory, bits_per_gene)
    compute = compute_dtype_of(model)
    if storage_dtype == "auto":
        storage_dtype = storage_dtype_for(model)
    layout: dict[str, dict] = {}
    packed: list[nn.Module] = []
    for gene, bits in genome:
        if bits == UNQUANTIZED_BITS:
            continue
        for lin in gene.weights:
            layout[lin.path] = _pack_one(model, lin, bits, quantizer, packed)
    if storage_dtype is not None:
        store_in_16bit(model, storage_dtype, compute)
    return layout


def _pack_one(model: nn.Module, lin: WeightRef, bits: int, quantizer, packed: list) -> dict:
    old = model.get_submodule(lin.path)
    weight = old.weight.t() if lin.transposed else old.weight
    new = PackedLinear.from_weight(weight, getattr(old, "bias", None), bits, quantizer, lin.transposed)
    set_submodule(model, lin.path, new)
    packed.append(new)
    return {"bits": bits, "out_features": lin.out_features, "in_features": lin.in_features,
            "transposed": lin.transposed, "bias": new.bias is not None}


def skeleton_packed_module(spec: dict, group_size: int, bias_dtype: torch.dtype) -> PackedLinear:
    """An empty :class:`PackedLinear` (on the meta device) ready for ``load_state_dict(assign=True)``."""
    return PackedLinear(spec["in_features"], spec["out_features"], spec["bits"], group_size,
                        bias=bool(spec.get("bias")), transposed=bool(spec.get("transposed")),
                        device="meta", bias_dtype=bias_dtype)


@contextlib.contextmanager
def as_shipped(model: nn.Module, inventory: Inventory, bits_per_gene, quantizer,
               storage_dtype: torch.dtype | None = torch.float16) -> Iterator[None]:
    """The fake-quantised model *as shipped*: genes fake-quantised and every other floating parameter
    (and 16-bit gene) rounded to ``storage_dtype``, restored afterwards. A packed model's outputs equal
    this reference to float tolerance; ``quantized_weights`` alone differs from it by the fp16
    rounding of embeddings and norms."""
    genome = _genome(inventory, bits_per_gene)
    quantised = {id(model.get_submodule(lin.path).weight) for g, b in genome if b != UNQUANTIZED_BITS
                 for lin in g.weights}
    saved = []
    try:
        with torch.no_grad():
            if storage_dtype is not None:
                for p in model.parameters():
                    if p.is_floating_point() and id(p) not in quantised:
                        saved.append((p, p.data.clone()))
                        p.data.copy_(p.data.to(storage_dtype))
        with quantized_weights(model, [g for g, _ in genome], [str(b) for _, b in genome], quantizer):
            yield
    finally:
        with torch.no_grad():
            for p, data in saved:
                p.data.copy_(data)


def packed_summary(model: nn.Module) -> dict:
    """Counts for a packed model: packed modules, weights per bit-width, bytes resident."""
    per_bits: dict[int, int] = {}
    modules = 0
    for m in model.modules():
        if isinstance(m, PackedLinear):
            modules += 1
            per_bits[m.bits] = per_bits.get(m.bits, 0) + m.in_features * m.out_features
    return {"packed_modules": modules, "params_by_bits": dict(sorted(per_bits.items())),
            "resident_bytes": resident_bytes(model)}


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers actually held in memory (shared storages counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total
