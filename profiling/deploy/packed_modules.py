"""Modules of a packed model: :class:`PackedLinear` (a bit-packed RTN weight) and the 16-bit stored rest.

A quantised gene's linears become :class:`PackedLinear` modules holding what
:meth:`RTNQuantizer.quantize` returned -- the very function profiling fake-quantises with -- so the
shipped model computes exactly what was measured. ``forward`` unpacks and dequantises the weight with
torch ops, a few thousand rows at a time, and drops it again: nothing weight-sized is cached.

Everything that is not a quantised gene (embeddings, LM head, norms, biases, 16-bit genes) is *stored*
in 16 bits (fp16, or bf16 for a bf16 model) -- as the memory model counts it -- while the model
*computes* in its own dtype: the large 16-bit matrices keep their storage and are upcast chunk by
chunk in ``forward`` (:class:`StoredLinear`, :class:`StoredEmbedding`), the tiny vectors (norm weights,
biases) are upcast once. On a CPU that keeps fp32 arithmetic (fast and equal to the fake-quantised
measurement) at 16-bit memory.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizers.rtn import UNQUANTIZED_BITS, QuantizedTensor, RTNQuantizer, qtype_bits
from .packed_codec import PackingError, dequantize_rtn, pack_codes, packed_row_bytes, unpack_codes

#: Upper bound on the elements of a weight slice materialised at once in ``forward`` (4 MiB in fp32:
#: larger chunks ran slower and left tens of MiB in the allocator).
CHUNK_ELEMENTS = 1 << 20


def _row_chunk(out_features: int, in_features: int) -> int:
    return max(1, min(out_features, CHUNK_ELEMENTS // max(in_features, 1)))


class PackedLinear(nn.Module):
    """Drop-in for ``nn.Linear`` (and GPT-2 ``Conv1D``) with a bit-packed RTN weight.

    ``y = x @ W^T + b`` with ``W = dequantize(codes, scales, zeros)`` in the input's dtype, computed in
    row chunks so at most :data:`CHUNK_ELEMENTS` weights exist at a time. ``transposed`` only records
    that the original module was a ``Conv1D``; the maths is the same.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 transposed: bool = False, device=None, bias_dtype=torch.float32):
        super().__init__()
        qtype_bits(str(bits))
        if bits == UNQUANTIZED_BITS:
            raise PackingError("PackedLinear needs 2-8 bits; keep 16-bit genes as dense linears")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.transposed = bits, group_size, transposed
        self._quantizer = RTNQuantizer(group_size)
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
        q = quantizer.quantize(weight_out_in.detach(), str(bits))
        module = cls(in_f, out_f, bits, quantizer.group_size, bias=bias is not None, transposed=transposed,
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
        # Broadcast per group instead of RTNQuantizer.dequantize's per-column copies: bit-identical (tested).
        return dequantize_rtn(self.qweight[rows], self.bits, self.in_features, self.scales[rows],
                              self.zeros[rows], self.group_size, dtype)

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
