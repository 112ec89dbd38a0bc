"""Bit packing and PackedLinear: exact against the quantiser and the fake-quantised model (tiny models)."""

import copy

import pytest
import torch

import profiling.deploy.packed_modules as packed_mod
from profiling.deploy.packed_codec import PackingError, pack_codes, packed_row_bytes, unpack_codes
from profiling.deploy.packed_modules import PackedLinear, StoredEmbedding, StoredLinear
from profiling.deploy.packing import as_shipped, pack_model, resident_bytes
from profiling.inventory import build_inventory
from profiling.quantizers.rtn import RTNQuantizer
from profiling.runner import quantized_weights
from test_deploy_support import tiny_gpt2

ALL_BITS = [2, 3, 4, 5, 6, 7, 8]
WIDTHS = [1, 5, 8, 9, 63, 64, 100, 577]  # ragged: most are not multiples of 8 or of the group size


def reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The documented layout, spelt out with Python integers: code i at bits [i*b, (i+1)*b) of a
    little-endian bit stream per row, padded with zero bits to whole bytes."""
    rows = []
    for row in codes.tolist():
        stream = 0
        for i, c in enumerate(row):
            stream |= c << (i * bits)
        rows.append(list(stream.to_bytes(packed_row_bytes(len(row), bits), "little")))
    return torch.tensor(rows, dtype=torch.uint8)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_pack_unpack_round_trip_and_layout(bits):
    g = torch.Generator().manual_seed(bits)
    for n in WIDTHS:
        codes = torch.randint(0, 1 << bits, (6, n), generator=g).to(torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (6, -(-n * bits // 8))
        assert torch.equal(packed, reference_pack(codes, bits))
        assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_pack_rejects_bad_input():
    with pytest.raises(PackingError):
        pack_codes(torch.zeros(2, 3, dtype=torch.uint8), 16)
    with pytest.raises(PackingError):
        pack_codes(torch.zeros(2, 3, dtype=torch.int64), 4)
    with pytest.raises(PackingError):
        unpack_codes(torch.zeros(2, 3, dtype=torch.uint8), 4, 100)


@pytest.mark.parametrize("group_size", [64, 128, 7])
def test_packed_linear_equals_fake_quantize_exactly(group_size):
    q = RTNQuantizer(group_size)
    g = torch.Generator().manual_seed(group_size)
    for bits in ALL_BITS:
        for n in (5, 100):  # ragged for every group size here (and a single short group)
            w = torch.randn(11, n, generator=g)
            module = PackedLinear.from_weight(w, None, bits, q)
            # bytes held == what the memory model counts for this weight
            held = sum(t.numel() * t.element_size() for t in (module.qweight, module.scales, module.zeros))
            qtype = str(bits)
            assert held == q.weight_bytes(qtype, 11, n)
            assert torch.equal(module.dequantized_weight(), q.fake_quantize(w, qtype))
            assert torch.equal(module.dequantized_weight(torch.float16), q.dequantize(q.quantize(w, qtype), torch.float16))
            assert torch.equal(unpack_codes(module.qweight, bits, n), q.quantize(w, qtype).codes)
            x = torch.randn(2, 3, n, generator=g)
            assert torch.equal(module(x), torch.nn.functional.linear(x, q.fake_quantize(w, qtype)))


def test_forward_in_row_chunks_matches(monkeypatch):
    q = RTNQuantizer(64)
    w, b = torch.randn(50, 100), torch.randn(50)
    module = PackedLinear.from_weight(w, b, 4, q)
    x = torch.randn(3, 100)
    whole = module(x)
    monkeypatch.setattr(packed_mod, "CHUNK_ELEMENTS", 700)  # 7 rows at a time
    torch.testing.assert_close(module(x), whole, rtol=1e-5, atol=1e-5)  # GEMM blocking may differ
    lin = torch.nn.Linear(100, 50)
    lin.weight.data = lin.weight.data.half()
    lin.__class__ = StoredLinear
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight.float(), lin.bias), rtol=1e-5, atol=1e-5)


def mixed_bits(n):
    """Every RTN qtype in turn, 16 (left dense) included."""
    return [["2", "3", "4", "5", "6", "7", "8", "16"][i % 8] for i in range(n)]


def test_packed_logits_equal_fake_quant_tiny_llama(tiny_llama):
    inv = build_inventory(tiny_llama, "linear")
    bits = mixed_bits(len(inv.genes))
    q = RTNQuantizer(64)
    ids = torch.randint(0, 259, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with quantized_weights(tiny_llama, inv.genes, bits, q):
            fake = tiny_llama(input_ids=ids).logits
        with as_shipped(tiny_llama, inv, bits, q):
            shipped_ref = tiny_llama(input_ids=ids).logits
        dense = tiny_llama(input_ids=ids).logits
        swapped = copy.deepcopy(tiny_llama)
        layout = pack_model(swapped, inv, bits, q, storage_dtype=None)  # pure drop-in swap
        assert torch.equal(swapped(input_ids=ids).logits, fake)
        shipped = copy.deepcopy(tiny_llama)
        pack_model(shipped, inv, bits, q)  # + every other weight in fp16
        torch.testing.assert_close(shipped(input_ids=ids).logits, shipped_ref, rtol=0, atol=1e-5)
        assert torch.equal(tiny_llama(input_ids=ids).logits, dense)  # as_shipped restored everything
    n_packed = sum(1 for i, g in enumerate(inv.genes) if bits[i] != "16")
    assert len(layout) == n_packed
    assert sum(isinstance(m, PackedLinear) for m in shipped.modules()) == n_packed
    assert isinstance(shipped.model.embed_tokens, StoredEmbedding) and shipped.model.embed_tokens.weight.dtype == torch.float16
    assert shipped.lm_head.weight is shipped.model.embed_tokens.weight  # tying survives
    assert shipped.model.norm.weight.dtype == torch.float32  # small vectors compute in the model's dtype
    assert resident_bytes(shipped) < resident_bytes(tiny_llama) / 2


def test_packed_logits_equal_fake_quant_gpt2_conv1d():
    model = tiny_gpt2()
    inv = build_inventory(model, "linear")
    assert all(lin.transposed for g in inv.genes for lin in g.weights)
    bits = mixed_bits(len(inv.genes))
    q = RTNQuantizer(32)
    ids = torch.randint(0, 259, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with quantized_weights(model, inv.genes, bits, q):
            fake = model(input_ids=ids).logits
        with as_shipped(model, inv, bits, q):
            shipped_ref = model(input_ids=ids).logits
        swapped = copy.deepcopy(model)
        pack_model(swapped, inv, bits, q, storage_dtype=None)
        torch.testing.assert_close(swapped(input_ids=ids).logits, fake, rtol=0, atol=1e-6)
        shipped = copy.deepcopy(model)
        pack_model(shipped, inv, bits, q)
        torch.testing.assert_close(shipped(input_ids=ids).logits, shipped_ref, rtol=0, atol=1e-5)
    c_attn = shipped.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, PackedLinear) and c_attn.transposed and c_attn.bias is not None


def test_pack_model_rejects_a_genome_for_other_genes(tiny_llama):
    inv = build_inventory(tiny_llama, "block")
    q = RTNQuantizer(64)
    with pytest.raises(PackingError, match="genome"):
        pack_model(tiny_llama, inv, ["4", "4"], q)
    with pytest.raises(PackingError, match="unknown gene"):
        pack_model(tiny_llama, inv, {"block.0": "4", "block.1": "4", "block.2": "4", "block.9": "4"}, q)
    with pytest.raises(PackingError, match="missing"):
        pack_model(tiny_llama, inv, {"block.0": "4"}, q)
    # a qtype RTN cannot store is refused before any module is swapped
    with pytest.raises(ValueError, match="bit-width 9 is not supported"):
        pack_model(tiny_llama, inv, {"block.0": "4", "block.1": "9", "block.2": "4"}, q)
    assert not any(isinstance(m, PackedLinear) for m in tiny_llama.modules())
