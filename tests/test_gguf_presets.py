"""llama.cpp's presets as genomes: for every tensor, the type :func:`preset_genome` predicts is the type
real ``llama_model_quantize`` writes, on a tiny 256-wide Llama (tied and untied head, GQA 4). SmolLM2
(576 wide: the shape fallbacks, GQA 3, 30 blocks) is checked in test_gguf_smollm.py."""

from __future__ import annotations

import os

import numpy as np
import pytest

from gguf_support import make_tiny_llama_256, save_bpe_tokenizer
from profiling.deploy.gguf_layout import GgufExportError, LlamaHparams
from profiling.deploy.gguf_writer import export_gguf, gguf_layout_for
from profiling.deploy.llamacpp import gguf_tensor_types, quantize_with_llamacpp
from profiling.deploy.presets import PRESETS, preset_genome, preset_tensor_type, use_more_bits


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return save_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module", params=["tied", "untied"])
def tiny_f16(request, tmp_path_factory, tokenizer):
    model = make_tiny_llama_256(tied=request.param == "tied", layers=8)
    layout = gguf_layout_for(model, tokenizer, tokenizer_pre="gpt-2")
    path = export_gguf(tmp_path_factory.mktemp("f16") / f"{request.param}.gguf", model, tokenizer, {},
                       tokenizer_pre="gpt-2")
    return layout, path


@pytest.mark.parametrize("preset", PRESETS)
def test_tiny_presets_match_llama_quantize(tiny_f16, preset, tmp_path):
    layout, f16 = tiny_f16
    out = quantize_with_llamacpp(f16, tmp_path / f"{preset}.gguf", preset)
    assert gguf_tensor_types(out) == layout.resolve(preset_genome(preset, layout))
    assert os.path.getsize(out) == layout.file_bytes(preset_genome(preset, layout))


def test_tiny_q4_0_with_importance_matrix(tiny_f16, tmp_path):
    layout, f16 = tiny_f16
    imatrix = {t.name: np.ones(t.in_features, np.float32) for t in layout.matrices}
    out = quantize_with_llamacpp(f16, tmp_path / "q4_0-imatrix.gguf", "Q4_0", imatrix=imatrix)
    expected = preset_genome("Q4_0", layout, has_imatrix=True)
    assert expected["blk.0.ffn_down.weight"] == "q4_1" and expected["blk.1.ffn_down.weight"] == "q4_0"
    assert gguf_tensor_types(out) == layout.resolve(expected)


def test_rules_that_differ_by_shape_and_layer():
    hp = LlamaHparams(n_layers=8, n_head=8, n_head_kv=2, n_embd=256, n_vocab=512)
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert preset_tensor_type("Q4_K_M", "blk.3.attn_v.weight", 256, 3, hp, True) == "q6_k"
    assert preset_tensor_type("Q4_K_M", "blk.4.attn_v.weight", 256, 4, hp, True) == "q4_k"
    assert preset_tensor_type("Q4_K_M", "blk.4.attn_v.weight", 576, 4, hp, True) == "q5_0"  # fallback
    assert preset_tensor_type("Q2_K", "blk.4.attn_v.weight", 256, 4, hp, True) == "q4_k"  # GQA 4
    gqa3 = LlamaHparams(n_layers=8, n_head=9, n_head_kv=3, n_embd=576, n_vocab=512)
    assert preset_tensor_type("Q2_K", "blk.4.attn_v.weight", 256, 4, gqa3, True) == "q3_k"
    assert preset_tensor_type("Q4_0", "token_embd.weight", 576, None, gqa3, True) == "q8_0"  # Q6_K -> fallback
    assert preset_tensor_type("Q4_0", "token_embd.weight", 576, None, gqa3, False) == "q4_0"  # untied: base
    big = LlamaHparams(n_layers=80, n_head=64, n_head_kv=8, n_embd=8192, n_vocab=128256)
    assert preset_tensor_type("Q3_K_M", "blk.40.attn_v.weight", 8192, 40, big, False) == "q5_k"  # "70B" bump
    with pytest.raises(GgufExportError, match="unknown preset"):
        preset_tensor_type("Q4_K_X", "blk.0.attn_v.weight", 256, 0, hp, True)
