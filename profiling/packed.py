"""Packed mixed-precision models: the genome applied for real, not simulated.

A quantised gene's linears become :class:`PackedLinear` modules holding what
:meth:`RTNQuantizer.quantize` returned -- the very function profiling fake-quantises with -- so the
shipped model computes exactly what was measured:

- ``qweight``: the integer codes bit-packed densely per output row, ``ceil(in * bits / 8)`` bytes a row
  (the layout :meth:`RTNQuantizer.weight_bytes` counts). Within a row, code *i* occupies bits
  ``[i*bits, (i+1)*bits)`` of a little-endian bit stream (LSB of byte 0 first); the unused tail bits of
  the last byte are zero. 8-bit codes are the plain uint8 codes.
- ``scales`` and ``zeros``: fp16, one per group of ``group_size`` input columns (the last group of a row
  may be ragged).

``forward`` unpacks and dequantises the weight with torch ops, a few thousand rows at a time, and
drops it again: nothing weight-sized is cached.

Everything that is not a quantised gene (embeddings, LM head, norms, biases, 16-bit genes) is *stored*
in 16 bits (fp16, or bf16 for a bf16 model) -- as the memory model counts it -- while the model
*computes* in its own dtype: the large 16-bit matrices keep their storage and are upcast chunk by
chunk in ``forward`` (:class:`StoredLinear`, :class:`StoredEmbedding`), the tiny vectors (norm weights,
biases) are upcast once. On a CPU that keeps fp32 arithmetic (fast and equal to the fake-quantised
measurement) at 16-bit memory.

:func:`measure_checkpoint` measures a packed checkpoint (or a dense model) in a fresh child process --
resident bytes, peak RSS, held-out perplexity, greedy generation speed -- so one measurement cannot
inflate the next one's RSS.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .inventory import Gene, Inventory, LinearRef
from .quantizer import UNQUANTIZED_BITS, QuantizedTensor, RTNQuantizer, make_quantizer, validate_bits

#: Upper bound on the elements of a weight slice materialised at once in ``forward`` (4 MiB in fp32: larger chunks ran slower and left tens of MiB in the allocator).
CHUNK_ELEMENTS = 1 << 20


class PackingError(ValueError):
    """A genome or checkpoint that cannot be packed/loaded; the message names the fix."""


# -- bit packing -----------------------------------------------------------------------------------

def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes of one packed row: exactly what :meth:`RTNQuantizer.weight_bytes` counts for the codes."""
    return math.ceil(in_features * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, in) uint8 codes in [0, 2**bits) -> (rows, ceil(in*bits/8)) uint8, densely bit-packed."""
    validate_bits(bits)
    if bits == UNQUANTIZED_BITS:
        raise PackingError("16-bit weights are stored as they are, not packed")
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise PackingError(f"codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    rows, n = codes.shape
    out_bytes = packed_row_bytes(n, bits)
    if bits == 8:
        return codes.contiguous().clone()
    # A unit is 1 byte (2, 4 bits) or `bits` bytes holding 8 codes (3, 5, 6, 7 bits). Loop over the
    # code positions inside a unit (at most 8); each step is vectorised over all units of all rows.
    codes_per_unit, unit_bytes = (8 // bits, 1) if 8 % bits == 0 else (8, bits)
    units = math.ceil(n / codes_per_unit)
    c = F.pad(codes, (0, units * codes_per_unit - n)).view(rows, units, codes_per_unit)
    out = torch.zeros(rows, units, unit_bytes, dtype=torch.uint8, device=codes.device)
    for k in range(codes_per_unit):
        lo, off = divmod(k * bits, 8)
        out[..., lo] |= c[..., k] << off  # uint8: bits shifted past the byte belong to the next one
        if off + bits > 8:
            out[..., lo + 1] |= c[..., k] >> (8 - off)
    return out.view(rows, units * unit_bytes)[:, :out_bytes].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (rows, ceil(in*bits/8)) uint8 -> (rows, in) uint8 codes."""
    if bits == 8:
        _check_packed(packed, bits, in_features)
        return packed
    return _unpack_to(packed, bits, in_features, torch.uint8, in_features).contiguous()


def _check_packed(packed: torch.Tensor, bits: int, in_features: int) -> None:
    if packed.dim() != 2 or packed.shape[1] != packed_row_bytes(in_features, bits):
        raise PackingError(f"packed rows have shape {tuple(packed.shape)}, expected "
                           f"{packed_row_bytes(in_features, bits)} bytes a row for {in_features} columns at {bits} bits")


def _unpack_to(packed: torch.Tensor, bits: int, in_features: int, dtype: torch.dtype, width: int) -> torch.Tensor:
    """Codes written straight into a (rows, width >= in_features) tensor of ``dtype``; columns past
    ``in_features`` are 0. A *unit* is 1 byte (2 and 4 bits) or ``bits`` bytes holding 8 codes (3, 5, 6,
    7 bits); the loop runs over the code positions inside a unit (at most 8), each step vectorised over
    every unit of every row, in uint8 arithmetic (a code spans at most two bytes)."""
    _check_packed(packed, bits, in_features)
    rows, nbytes = packed.shape
    if bits == 8:
        return F.pad(packed, (0, width - in_features)).to(dtype)
    codes_per_unit, unit_bytes = (8 // bits, 1) if 8 % bits == 0 else (8, bits)
    units = math.ceil(in_features / codes_per_unit)
    need = units * codes_per_unit
    u = packed if units * unit_bytes == nbytes else F.pad(packed, (0, units * unit_bytes - nbytes))
    u = u.view(rows, units, unit_bytes)
    full = torch.empty(rows, max(need, width), dtype=dtype, device=packed.device)
    slots = full[:, :need].view(rows, units, codes_per_unit)  # splits the unit-stride dim: a view
    mask = (1 << bits) - 1
    for k in range(codes_per_unit):
        lo, off = divmod(k * bits, 8)
        v = u[..., lo] >> off if off else u[..., lo]
        if off + bits > 8:
            v = v | (u[..., lo + 1] << (8 - off))  # uint8: the shifted-out high bits just drop
        if off + bits != 8:
            v = v & mask
        slots[..., k] = v
    if width > need:
        full[:, need:].zero_()
    return full[:, :width]


def dequantize_rtn(packed: torch.Tensor, bits: int, in_features: int, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``RTNQuantizer.dequantize`` of packed codes, computed group-wise by broadcasting (no per-column
    copies of the scales, codes unpacked straight into the float buffer): the same fp32
    ``code * scale + zero`` per element, so bit-for-bit the same weight (tested)."""
    rows = packed.shape[0]
    groups = scales.shape[1]
    w = _unpack_to(packed, bits, in_features, torch.float32, groups * group_size)
    w = w.reshape(rows, groups, group_size)
    w.mul_(scales.to(torch.float32)[..., None]).add_(zeros.to(torch.float32)[..., None])
    w = w.view(rows, groups * group_size)
    if groups * group_size != in_features:
        w = w[:, :in_features]
    return w if dtype == torch.float32 else w.to(dtype)


# -- modules ---------------------------------------------------------------------------------------

def _row_chunk(out_features: int, in_features: int) -> int:
    return max(1, min(out_features, CHUNK_ELEMENTS // max(in_features, 1)))


class PackedLinear(nn.Module):
    """Drop-in for ``nn.Linear`` (and GPT-2 ``Conv1D``) with a bit-packed RTN weight.

    ``y = x @ W^T + b`` with ``W = dequantize(codes, scales, zeros)`` in the input's dtype, computed in
    row chunks so at most :data:`CHUNK_ELEMENTS` weights exist at a time. ``transposed`` only records
    that the original module was a ``Conv1D``; the maths is the same.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 quantizer: str = "rtn", transposed: bool = False, device=None, bias_dtype=torch.float32):
        super().__init__()
        validate_bits(bits)
        if bits == UNQUANTIZED_BITS:
            raise PackingError("PackedLinear needs 2-8 bits; keep 16-bit genes as dense linears")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.quantizer_name, self.transposed = bits, group_size, quantizer, transposed
        self._quantizer = make_quantizer(quantizer, group_size)
        groups = self._quantizer.n_groups(in_features)
        self.register_buffer("qweight", torch.empty(out_features, packed_row_bytes(in_features, bits),
                                                    dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, weight_out_in: torch.Tensor, bias: torch.Tensor | None, bits: int,
                    quantizer: RTNQuantizer, transposed: bool = False) -> "PackedLinear":
        """Quantise an (out, in) weight with ``quantizer`` -- the profiling function -- and pack it."""
        out_f, in_f = weight_out_in.shape
        q = quantizer.quantize(weight_out_in.detach(), bits)
        module = cls(in_f, out_f, bits, quantizer.group_size, bias=bias is not None,
                     quantizer=quantizer.name, transposed=transposed,
                     bias_dtype=bias.dtype if bias is not None else torch.float32)
        module.qweight = pack_codes(q.codes, bits)
        module.scales, module.zeros = q.scales.contiguous(), q.zeros.contiguous()
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")

    def quantized(self, rows: slice = slice(None)) -> QuantizedTensor:
        """The quantiser's view of (a row range of) this weight: unpacked codes, scales, zeros."""
        return QuantizedTensor(codes=unpack_codes(self.qweight[rows], self.bits, self.in_features),
                               scales=self.scales[rows], zeros=self.zeros[rows], bits=self.bits,
                               group_size=self.group_size)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        """The (out, in) weight exactly as ``quantizer.fake_quantize`` produces it, in ``dtype``."""
        if type(self._quantizer) is RTNQuantizer:  # fast path, bit-identical (tested)
            return dequantize_rtn(self.qweight[rows], self.bits, self.in_features, self.scales[rows],
                                  self.zeros[rows], self.group_size, dtype)
        return self._quantizer.dequantize(self.quantized(rows), dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = _row_chunk(self.out_features, self.in_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if step >= self.out_features:
            return F.linear(x, self.dequantized_weight(x.dtype), bias)
        parts = []
        for start in range(0, self.out_features, step):
            rows = slice(start, start + step)
            parts.append(F.linear(x, self.dequantized_weight(x.dtype, rows), None if bias is None else bias[rows]))
        return torch.cat(parts, dim=-1)


def _chunked_linear(x: torch.Tensor, weight_out_in: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` with a 16-bit stored weight upcast to ``x.dtype`` a row chunk at a time."""
    if weight_out_in.dtype == x.dtype:
        return F.linear(x, weight_out_in, bias if bias is None else bias.to(x.dtype))
    out_f, in_f = weight_out_in.shape
    bias = None if bias is None else bias.to(x.dtype)
    step = _row_chunk(out_f, in_f)
    if step >= out_f:
        return F.linear(x, weight_out_in.to(x.dtype), bias)
    out = x.new_empty(*x.shape[:-1], out_f)
    for start in range(0, out_f, step):
        end = min(start + step, out_f)
        out[..., start:end] = F.linear(x, weight_out_in[start:end].to(x.dtype),
                                       None if bias is None else bias[start:end])
    return out


class StoredLinear(nn.Linear):
    """An ``nn.Linear`` whose weight stays in its 16-bit storage dtype and computes in the input's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _chunked_linear(x, self.weight, self.bias)


class StoredEmbedding(nn.Embedding):
    """An ``nn.Embedding`` stored in 16 bits whose looked-up rows come out in ``compute_dtype``."""

    compute_dtype: torch.dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.compute_dtype)


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


_STORED_CONV1D: type | None = None


def _stored_conv1d_class() -> type:
    """``Conv1D`` (weight (in, out)) stored in 16 bits; made lazily so transformers stays optional here."""
    global _STORED_CONV1D
    if _STORED_CONV1D is None:
        base = _conv1d_class()

        def forward(self, x):
            return _chunked_linear(x, self.weight.t(), self.bias)

        _STORED_CONV1D = type("StoredConv1D", (base,), {"forward": forward, "__doc__": "Conv1D stored in 16 bits."})
    return _STORED_CONV1D


def storage_dtype_for(model: nn.Module) -> torch.dtype:
    """16-bit storage for everything that is not a quantised gene: bf16 for a bf16 model, else fp16."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return torch.bfloat16 if dtypes == {torch.bfloat16} else torch.float16


def compute_dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype activations flow in: the dtype of the model's norm weights / small parameters."""
    for module in model.modules():
        if isinstance(module, (PackedLinear, StoredLinear, StoredEmbedding, nn.Embedding, nn.Linear)):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def store_in_16bit(model: nn.Module, storage_dtype: torch.dtype, compute_dtype: torch.dtype,
                   skip: Iterable[nn.Module] = ()) -> None:
    """Give every non-packed module its shipped form, in place.

    Embeddings, linears and ``Conv1D`` keep their matrices in ``storage_dtype`` and upcast in
    ``forward``; every other floating parameter (norm weights, biases) is rounded to ``storage_dtype``
    and kept in ``compute_dtype``, so the in-memory model computes exactly what the checkpoint holds.
    """
    skip_ids = {id(m) for m in skip}
    conv1d = _conv1d_class()
    matrices: set[int] = set()
    for module in model.modules():
        if id(module) in skip_ids or isinstance(module, PackedLinear):
            continue
        if type(module) in (nn.Embedding, StoredEmbedding):  # subclasses (scaled embeddings) stay as they are
            module.__class__ = StoredEmbedding
            module.compute_dtype = compute_dtype
            matrices.add(id(module.weight))
        elif type(module) in (nn.Linear, StoredLinear):
            module.__class__ = StoredLinear
            matrices.add(id(module.weight))
        elif conv1d is not None and type(module) in (conv1d, _stored_conv1d_class()):
            module.__class__ = _stored_conv1d_class()
            matrices.add(id(module.weight))
    with torch.no_grad():
        for p in model.parameters():  # tied parameters appear once
            if not p.is_floating_point():
                continue
            if id(p) in matrices:
                p.data = p.data.to(storage_dtype)
            else:
                p.data = p.data.to(storage_dtype).to(compute_dtype)


# -- the whole model -------------------------------------------------------------------------------

def _genome(inventory: Inventory, bits_per_gene) -> list[tuple[Gene, int]]:
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
    return [(g, validate_bits(int(b))) for g, b in zip(inventory.genes, bits)]


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
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
        for lin in gene.linears:
            layout[lin.path] = _pack_one(model, lin, bits, quantizer, packed)
    if storage_dtype is not None:
        store_in_16bit(model, storage_dtype, compute)
    return layout


def _pack_one(model: nn.Module, lin: LinearRef, bits: int, quantizer, packed: list) -> dict:
    old = model.get_submodule(lin.path)
    weight = old.weight.t() if lin.transposed else old.weight
    new = PackedLinear.from_weight(weight, getattr(old, "bias", None), bits, quantizer, lin.transposed)
    _set_submodule(model, lin.path, new)
    packed.append(new)
    return {"bits": bits, "out_features": lin.out_features, "in_features": lin.in_features,
            "transposed": lin.transposed, "bias": new.bias is not None}


def skeleton_packed_module(spec: dict, group_size: int, quantizer: str, bias_dtype: torch.dtype) -> PackedLinear:
    """An empty :class:`PackedLinear` (on the meta device) ready for ``load_state_dict(assign=True)``."""
    return PackedLinear(spec["in_features"], spec["out_features"], spec["bits"], group_size,
                        bias=bool(spec.get("bias")), quantizer=quantizer, transposed=bool(spec.get("transposed")),
                        device="meta", bias_dtype=bias_dtype)


@contextlib.contextmanager
def as_shipped(model: nn.Module, inventory: Inventory, bits_per_gene, quantizer,
               storage_dtype: torch.dtype | None = torch.float16) -> Iterator[None]:
    """The fake-quantised model *as shipped*: genes fake-quantised and every other floating parameter
    (and 16-bit gene) rounded to ``storage_dtype``, restored afterwards. A packed model's outputs equal
    this reference to float tolerance; ``quantized_weights`` alone differs from it by the fp16
    rounding of embeddings and norms."""
    from .runner import quantized_weights

    genome = _genome(inventory, bits_per_gene)
    quantised = {id(model.get_submodule(lin.path).weight) for g, b in genome if b != UNQUANTIZED_BITS
                 for lin in g.linears}
    saved = []
    try:
        with torch.no_grad():
            if storage_dtype is not None:
                for p in model.parameters():
                    if p.is_floating_point() and id(p) not in quantised:
                        saved.append((p, p.data.clone()))
                        p.data.copy_(p.data.to(storage_dtype))
        with quantized_weights(model, [g for g, _ in genome], [b for _, b in genome], quantizer):
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


# -- running it ------------------------------------------------------------------------------------

def heldout_loss(model: nn.Module, tokens: torch.Tensor, batch: int = 4) -> float:
    """Mean next-token loss over ``tokens`` (n_seq, len), a few sequences at a time.

    Same value as ``next_token_loss(model(tokens).logits, tokens)`` (every sequence has the same
    length, so the mean of batch means weighted by size is the overall mean) with less peak memory.
    """
    from .runner import next_token_loss

    total, n = 0.0, tokens.shape[0]
    with torch.no_grad():
        for start in range(0, n, batch):
            chunk = tokens[start:start + batch]
            total += next_token_loss(model(input_ids=chunk, use_cache=False).logits, chunk) * chunk.shape[0]
    return total / n


def generate_ids(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id=None,
                 pad_token_id=None, exact: bool = False) -> torch.Tensor:
    """Greedy continuation; ``exact`` forces exactly ``max_new_tokens`` (for speed measurements)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              min_new_tokens=max_new_tokens if exact else None,
                              eos_token_id=None if exact else eos_token_id,
                              pad_token_id=pad_token_id if pad_token_id is not None else eos_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             generation_config=config)
    return out[:, input_ids.shape[1]:]


def encode_prompt(tokenizer, prompt: str, chat: bool = False) -> torch.Tensor:
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = list(ids[0]) if ids and isinstance(ids[0], list) else list(ids)
    if not ids:
        raise PackingError("the prompt encodes to no tokens: pass some text")
    return torch.tensor([ids], dtype=torch.long)


def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = False) -> dict:
    """Greedy text generation with timing: {text, prompt_tokens, new_tokens, seconds, tokens_per_s}."""
    ids = encode_prompt(tokenizer, prompt, chat)
    started = time.perf_counter()
    new = generate_ids(model, ids, max_new_tokens, eos_token_id=getattr(tokenizer, "eos_token_id", None),
                       pad_token_id=getattr(tokenizer, "pad_token_id", None))[0]
    seconds = time.perf_counter() - started
    return {"text": tokenizer.decode(new.tolist(), skip_special_tokens=True), "prompt_tokens": ids.shape[1],
            "new_tokens": int(new.numel()), "seconds": seconds,
            "tokens_per_s": new.numel() / seconds if seconds > 0 else None}


# -- measurement -----------------------------------------------------------------------------------

DEFAULT_SPEED_PROMPT = "The history of the printing press begins"


def hardware_string() -> str:
    """e.g. "AMD EPYC, 2 torch threads (torch 2.13.0+cpu)"."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def _proc_status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss_bytes() -> int | None:
    rss = _proc_status_bytes("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover
        return None


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process so far.

    Linux: ``VmHWM`` of the process's own address space. Not ``ru_maxrss``: Linux keeps that across
    ``execve``, so a child started from a big parent would report the parent's peak.
    """
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def is_packed_checkpoint(path) -> bool:
    from storage.checkpoint import MANIFEST_NAME

    return Path(path).is_dir() and (Path(path) / MANIFEST_NAME).is_file()


def measure_loaded(model: nn.Module, tokenizer, heldout: torch.Tensor, gen_tokens: int = 32,
                   prompt: str = DEFAULT_SPEED_PROMPT, repeats: int = 3) -> dict:
    """Speed first (so peak RSS covers load + generation), then held-out perplexity.

    Generation runs ``repeats`` times after a warm-up; ``tokens_per_s`` is the best run (the least
    disturbed by other processes on a shared machine), every run is in ``tokens_per_s_runs``.
    """
    result: dict = {"resident_bytes": resident_bytes(model), "rss_after_load_bytes": current_rss_bytes()}
    if gen_tokens > 0:
        ids = encode_prompt(tokenizer, prompt)
        generate_ids(model, ids, 2, exact=True)  # warm-up: first-call allocations, lazy inits
        runs = []
        for _ in range(max(1, repeats)):
            started = time.perf_counter()
            new = generate_ids(model, ids, gen_tokens, exact=True)
            runs.append(new.shape[1] / (time.perf_counter() - started))
        result.update(gen_tokens=int(new.shape[1]), tokens_per_s=max(runs), tokens_per_s_runs=runs,
                      prompt_tokens=int(ids.shape[1]), sample=tokenizer.decode(new[0].tolist(), skip_special_tokens=True))
    result["peak_rss_bytes"] = peak_rss_bytes()
    started = time.perf_counter()
    loss = heldout_loss(model, heldout)
    result.update(heldout_loss=loss, ppl=math.exp(loss), heldout_tokens=int(heldout.numel()),
                  eval_seconds=time.perf_counter() - started, peak_rss_with_eval_bytes=peak_rss_bytes(),
                  hardware=hardware_string())
    return result


def measure_checkpoint(target, heldout_tokens: torch.Tensor, gen_tokens: int = 32,
                       prompt: str = DEFAULT_SPEED_PROMPT, threads: int | None = None,
                       timeout: float | None = 3600, repeats: int = 3) -> dict:
    """Measure a packed checkpoint folder (or a dense model spec) in a fresh Python process.

    Returns {kind, resident_bytes, rss_baseline_bytes (after imports), rss_after_load_bytes,
    peak_rss_bytes (load + generation), peak_rss_with_eval_bytes, ppl, heldout_loss, tokens_per_s
    (best of ``repeats`` greedy runs of ``gen_tokens``), tokens_per_s_runs, gen_tokens, prompt_tokens,
    load_seconds, hardware, ...}. All measured, none predicted.
    """
    threads = threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="empas-measure-") as tmp:
        tokens_file = Path(tmp) / "heldout.pt"
        torch.save(heldout_tokens.clone(), tokens_file)
        request = {"target": str(target), "tokens": str(tokens_file), "gen_tokens": int(gen_tokens),
                   "prompt": prompt, "threads": int(threads), "repeats": int(repeats)}
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        proc = subprocess.run([sys.executable, "-m", "profiling.packed", json.dumps(request)], env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=root)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PackingError(f"measuring {target} failed: {tail}")
    return json.loads(lines[-1])


def _child_main(argv: list[str]) -> int:
    """Entry of the measuring child: load, measure, print one JSON line."""
    request = json.loads(argv[0])
    torch.set_num_threads(request["threads"])
    baseline = current_rss_bytes()
    tokens = torch.load(request["tokens"])
    started = time.perf_counter()
    target = request["target"]
    if is_packed_checkpoint(target):
        from storage.checkpoint import load_packed

        loaded = load_packed(target)
        model, tokenizer, kind = loaded.model, loaded.tokenizer, "packed"
        from storage.checkpoint import weight_file_bytes

        extra = {"genes": len(loaded.manifest["genes"]), "average_bits": loaded.average_bits,
                 "checkpoint_bytes": weight_file_bytes(target), "memory_model_bytes": loaded.manifest.get("memory_bytes")}
    else:
        from .models import load_model

        lm = load_model(target)
        model, tokenizer, kind = lm.model, lm.tokenizer, "dense"
        from storage.checkpoint import weight_file_bytes

        extra = {"checkpoint_bytes": weight_file_bytes(lm.source_path), "source_path": lm.source_path}
    load_seconds = time.perf_counter() - started
    result = {"target": target, "kind": kind, "rss_baseline_bytes": baseline, "load_seconds": load_seconds,
              "compute_dtype": str(compute_dtype_of(model)).replace("torch.", ""), **extra}
    result.update(measure_loaded(model, tokenizer, tokens, request["gen_tokens"], request["prompt"],
                                 request.get("repeats", 3)))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through measure_checkpoint
    from profiling.packed import _child_main as _main  # the importable module, not __main__'s copy

    sys.exit(_main(sys.argv[1:]))
