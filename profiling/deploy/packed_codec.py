"""The packed checkpoint's bit codec: RTN codes bit-packed densely per output row, and back.

``qweight`` holds the integer codes of one weight, ``ceil(in * bits / 8)`` bytes a row (the layout
:meth:`RTNQuantizer.weight_bytes` counts). Within a row, code *i* occupies bits ``[i*bits, (i+1)*bits)``
of a little-endian bit stream (LSB of byte 0 first); the unused tail bits of the last byte are zero.
8-bit codes are the plain uint8 codes. Pure tensor functions, no modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..quantizers.rtn import UNQUANTIZED_BITS, qtype_bits


class PackingError(ValueError):
    """A genome or checkpoint that cannot be packed/loaded; the message names the fix."""


# -- bit packing -----------------------------------------------------------------------------------

def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes of one packed row: exactly what :meth:`RTNQuantizer.weight_bytes` counts for the codes."""
    return math.ceil(in_features * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, in) uint8 codes in [0, 2**bits) -> (rows, ceil(in*bits/8)) uint8, densely bit-packed."""
    qtype_bits(str(bits))
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
