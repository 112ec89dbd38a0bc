"""GGUF export of a tiny random Llama (widths multiples of 256), checked in real llama.cpp: the file
loads and generates, its size is predicted to the byte, its logits are the PyTorch model's, q/k rows are
permuted as llama.cpp expects, tied and untied heads both work, a tensor-type file reproduces a genome
through llama-quantize, and bad input fails in one line leaving nothing behind."""

from __future__ import annotations

import copy
import os

import gguf
import numpy as np
import pytest
import torch

from gguf_support import fake_quantized, make_tiny_llama_256, save_bpe_tokenizer, torch_logits, torch_threads
from profiling.corpus import build_token_sets
from profiling.deploy.gguf_layout import (GgufExportError, GgufLayout, LlamaHparams, TensorSpec,
                                          parse_tensor_types_text, permute_rows, tensor_types_text, unpermute_rows)
from profiling.deploy.gguf_metadata import TokenizerError
from profiling.deploy.gguf_writer import export_gguf, gguf_file_bytes, gguf_layout_for, gguf_py_quantize, write_gguf
from profiling.deploy.gguf_weights import load_file_weights
from profiling.deploy.llamacpp import (LlamaCppError, generate, gguf_logits, gguf_tensor_types, load_gguf,
                                       quantize_with_llamacpp)
from profiling.runner import DenseReference

PRE = "gpt-2"  # llama.cpp's pre-tokenizer for a GPT-2 byte-level BPE


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):  # 2 shared cores: more torch threads only slow these steps down
        yield


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return save_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def tied():
    return make_tiny_llama_256(tied=True)


@pytest.fixture(scope="module")
def layout(tied, tokenizer):
    return gguf_layout_for(tied, tokenizer, tokenizer_pre=PRE)


@pytest.fixture(scope="module")
def tokens(tokenizer):
    return build_token_sets(tokenizer, 128, 256, 128).heldout  # 2 x 128 held-out tokens


@pytest.fixture(scope="module")
def f16_file(tmp_path_factory, tied, tokenizer):
    return export_gguf(tmp_path_factory.mktemp("f16") / "tiny-f16.gguf", tied, tokenizer, {}, tokenizer_pre=PRE)


def file_types(path) -> dict[str, str]:
    types = gguf_tensor_types(path)  # ggml's C parser
    assert types == {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(path).tensors}  # gguf-py's
    return types


def mixed_genome(layout) -> dict[str, str]:
    """Every type gguf-py can pack, spread over blocks, keyed by HF module paths."""
    cycle = ["q4_0", "q5_1", "q8_0", "f16", "q4_1", "q5_0"]
    genome = {t.hf_name.removesuffix(".weight"): cycle[(t.layer + i) % len(cycle)]
              for i, t in enumerate(layout.matrices) if t.layer is not None}
    genome["model.embed_tokens.weight"] = "q8_0"
    return genome


def test_layout_names_shapes_and_rotary_permutation(layout, tied, f16_file):
    names = {t.name for t in layout.tensors}
    per_block = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"}
    assert names == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{p}.weight" for i in range(8) for p in per_block}
    assert layout.tied_embeddings and "output.weight" not in names
    reader = gguf.GGUFReader(f16_file)
    assert {t.name for t in reader.tensors} == names
    by_name = {t.name: t for t in reader.tensors}
    for spec in layout.tensors:  # GGUF lists dims fastest-first: (in, out) for an (out, in) matrix
        assert tuple(int(d) for d in by_name[spec.name].shape) == spec.shape[::-1]
        assert by_name[spec.name].tensor_type.name == ("F16" if spec.is_matrix else "F32")
    assert reader.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_F16

    # q and k rows are stored in llama.cpp's rotary order (k with the KV head count), the rest as in HF
    for hf, name, heads in (("q_proj", "attn_q", 8), ("k_proj", "attn_k", 2), ("v_proj", "attn_v", None)):
        w = tied.get_parameter(f"model.layers.3.self_attn.{hf}.weight").numpy()
        stored = np.asarray(by_name[f"blk.3.{name}.weight"].data).reshape(w.shape)
        expected = permute_rows(w, heads) if heads else w
        np.testing.assert_array_equal(stored, expected.astype(np.float16))
    w = tied.get_parameter("model.layers.3.self_attn.q_proj.weight").numpy()
    assert not np.array_equal(permute_rows(w, 8), w)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w, 8), 8), w)

    # blocks run along rows, so permuting rows before or after quantising gives the same bytes
    for qtype in ("q8_0", "q4_0"):
        packed = gguf_py_quantize(qtype, w)
        rows = packed.reshape(w.shape[0], -1)
        np.testing.assert_array_equal(gguf_py_quantize(qtype, permute_rows(w, 8)), permute_rows(rows, 8))


def test_file_loads_generates_and_matches_pytorch(f16_file, tied, tokens):
    logits = gguf_logits(f16_file, tokens)
    reference = torch_logits(tied, tokens)
    kl = DenseReference(reference).mean_kl(logits)
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"\nF16 GGUF vs PyTorch float32: KL {kl:.2e}, top-1 agreement {agree:.4f}")
    assert kl < 1e-4 and agree > 0.95  # near-ties of a random model flip a few

    llm = load_gguf(f16_file, n_ctx=64)
    out = generate(llm, "The function returns", max_new_tokens=8, stop_at_eos=False)
    llm.close()
    assert out.new_tokens == 8 and out.prompt_tokens > 0 and out.text
    assert out.prompt_seconds > 0 and out.generation_seconds > 0 and out.generation_tokens_per_s > 0
    assert out.n_threads == 1 and "CPU" in out.hardware


def test_size_prediction_is_exact(tmp_path, tied, tokenizer, layout):
    genomes = {"f16": {}, "q8_0": {t.name: "q8_0" for t in layout.matrices}, "mixed": mixed_genome(layout),
               "q4_0-head-f16": {"token_embd.weight": "f16", **{t.hf_name: "q4_0" for t in layout.matrices
                                                                  if t.layer is not None}}}
    sizes = set()
    for label, genome in genomes.items():
        path = write_gguf(tmp_path / f"{label}.gguf", tied, layout, genome, quantize=gguf_py_quantize)
        size = os.path.getsize(path)
        assert layout.file_bytes(genome) == size, label
        assert file_types(path) == layout.resolve(genome), label
        sizes.add(size)
        load_gguf(path, n_ctx=16).close()  # llama.cpp accepts every one of them
    assert len(sizes) == len(genomes)
    assert gguf_file_bytes(tied, genomes["mixed"], tokenizer, tokenizer_pre=PRE) == layout.file_bytes(genomes["mixed"])
    assert sorted(os.listdir(tmp_path)) == sorted(f"{g}.gguf" for g in genomes)  # no temp files left


def test_quantised_kl_in_llamacpp_matches_pytorch_fake_quant(tmp_path, tied, tokenizer, layout, f16_file, tokens):
    f16 = DenseReference(gguf_logits(f16_file, tokens))
    dense = DenseReference(torch_logits(tied, tokens))
    results = {}
    for label, genome in (("q8_0", {t.name: "q8_0" for t in layout.matrices}), ("mixed", mixed_genome(layout)),
                          ("q4_0", {t.name: "q4_0" for t in layout.matrices})):
        path = write_gguf(tmp_path / f"{label}.gguf", tied, layout, genome, quantize=gguf_py_quantize)
        kl_llama = f16.mean_kl(gguf_logits(path, tokens))
        twin = fake_quantized(tied, layout, genome, gguf_py_quantize)
        kl_torch = dense.mean_kl(torch_logits(twin, tokens))
        results[label] = (kl_llama, kl_torch)
        read_back = copy.deepcopy(tied)
        load_file_weights(read_back, path, layout)  # the file's bytes, dequantised, q/k rows back in HF order
        for name, param in read_back.named_parameters():
            assert torch.equal(param, twin.get_parameter(name)), name
    print("\nKL to F16 (llama.cpp) vs KL to float32 of the fake-quantised HF model (PyTorch):")
    for label, (a, b) in results.items():
        print(f"  {label:6s} llama.cpp {a:.5f}  PyTorch {b:.5f}")
    q8_llama, q8_torch = results["q8_0"]
    assert 0 < q8_llama < 0.02 and 0 < q8_torch < 0.02
    assert abs(q8_llama - q8_torch) < 0.005  # llama.cpp's 8-bit activation rounding: a few 1e-3 of noise
    for label in ("mixed", "q4_0"):
        a, b = results[label]
        assert a > 10 * q8_llama and abs(a - b) < 0.05 * b, label
    assert results["q4_0"][0] > results["mixed"][0]


def test_untied_head_is_its_own_tensor(tmp_path, tokenizer, tokens):
    model = make_tiny_llama_256(seed=1, tied=False, layers=2)
    layout = gguf_layout_for(model, tokenizer, tokenizer_pre=PRE)
    assert not layout.tied_embeddings
    assert layout.tensor("lm_head").name == "output.weight" and layout.tensor("lm_head").shape == (512, 256)
    genome = {"lm_head": "q8_0", "model.embed_tokens": "q4_0"}
    path = export_gguf(tmp_path / "untied.gguf", model, tokenizer, genome, quantize=gguf_py_quantize,
                       tokenizer_pre=PRE)
    types = file_types(path)
    assert types["output.weight"] == "q8_0" and types["token_embd.weight"] == "q4_0"
    assert os.path.getsize(path) == layout.file_bytes(genome)
    kl = DenseReference(torch_logits(fake_quantized(model, layout, genome, gguf_py_quantize), tokens)).mean_kl(
        gguf_logits(path, tokens))
    assert kl < 0.01  # llama.cpp runs exactly these weights, output layer included


def test_tied_genome_names_the_head_as_the_embedding(layout):
    assert layout.tensor("lm_head.weight").name == "token_embd.weight"
    with pytest.raises(GgufExportError, match="two types"):
        layout.resolve({"lm_head": "q8_0", "token_embd.weight": "q4_0"})


def test_tensor_type_file_reproduces_a_genome_through_llama_quantize(tmp_path, layout, f16_file):
    cycle = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "iq4_nl", "q4_0", "f16"]
    genome = {t.name: cycle[i % len(cycle)] for i, t in enumerate(layout.matrices)}
    text = tensor_types_text(layout.resolve(genome))
    assert all(line.startswith("^blk\\.") or line.startswith("^token_embd") for line in text.splitlines())
    assert len(text.split()) == len(layout.matrices)  # one anchored item per matrix, no vectors
    assert parse_tensor_types_text(text)[0] == ("^token_embd\\.weight$", "Q2_K")
    out = quantize_with_llamacpp(f16_file, tmp_path / "mix.gguf", "Q8_0", tensor_types=text)
    assert {k: v for k, v in file_types(out).items() if k in genome} == genome
    assert os.path.getsize(out) == layout.file_bytes(genome)  # llama-quantize's file is the size we predict
    load_gguf(out, n_ctx=16).close()


def test_resolve_checks_types_and_shapes():
    hp = LlamaHparams(n_layers=1, n_head=9, n_head_kv=3, n_embd=576, n_vocab=100)
    layout = GgufLayout(tensors=(TensorSpec("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight",
                                            (576, 1536), 0),
                                 TensorSpec("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight",
                                            (192, 576), 0),
                                 TensorSpec("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight",
                                            (576,), 0)),
                        metadata={}, hparams=hp, tied_embeddings=True)
    assert layout.resolve({"model.layers.0.mlp.down_proj": "Q4_K"})["blk.0.ffn_down.weight"] == "q4_k"
    with pytest.raises(GgufExportError, match="use q5_0, as llama.cpp would"):
        layout.resolve({"blk.0.attn_v.weight": "q4_k"})  # 576 is no multiple of 256
    with pytest.raises(GgufExportError, match="unknown type"):
        layout.resolve({"blk.0.attn_v.weight": "q7_k"})
    with pytest.raises(GgufExportError, match="no tensor of this model"):
        layout.resolve({"model.layers.9.mlp.down_proj": "q8_0"})
    with pytest.raises(GgufExportError, match="keeps it in F32"):
        layout.resolve({"blk.0.attn_norm.weight": "q8_0"})
    with pytest.raises(GgufExportError, match="malformed"):
        parse_tensor_types_text("attn_v.weight:q8_0")


def assert_one_line(exc_info, *fragments):
    message = str(exc_info.value)
    assert "\n" not in message and isinstance(exc_info.value, ValueError)
    for fragment in fragments:
        assert fragment in message, message


def test_bad_inputs_fail_in_one_line_and_leave_nothing(tmp_path, tied, tokenizer, f16_file):
    from conftest import TinyTokenizer

    out = tmp_path / "out"
    out.mkdir()
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("this is not a model\n")
    with pytest.raises(LlamaCppError) as exc:
        load_gguf(not_gguf)
    assert_one_line(exc, "is not a GGUF file")
    with pytest.raises(GgufExportError) as exc:
        export_gguf(out / "a.gguf", tied, tokenizer, {}, source_gguf=not_gguf)
    assert_one_line(exc, "not a readable GGUF file")
    with pytest.raises(LlamaCppError) as exc:
        quantize_with_llamacpp(not_gguf, out / "b.gguf", "Q4_K_M")
    assert_one_line(exc, "is not a GGUF file")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(f16_file.read_bytes()[: 1 << 16])
    with pytest.raises(LlamaCppError) as exc:
        load_gguf(truncated)
    assert_one_line(exc, "llama.cpp cannot load")
    with pytest.raises(LlamaCppError) as exc:
        quantize_with_llamacpp(truncated, out / "c.gguf", "Q4_K_M")
    assert_one_line(exc, "could not quantise")

    for bad_tokenizer in (None, TinyTokenizer()):
        with pytest.raises(TokenizerError) as exc:
            export_gguf(out / "d.gguf", tied, bad_tokenizer, {}, tokenizer_pre=PRE)
        assert_one_line(exc, "has no tokenizer llama.cpp can use")
    with pytest.raises(TokenizerError) as exc:  # a BPE tokenizer needs its llama.cpp pre-tokenizer name
        export_gguf(out / "e.gguf", tied, tokenizer, {})
    assert_one_line(exc, "has no tokenizer llama.cpp can use", "tokenizer_pre")
    with pytest.raises(TokenizerError) as exc:  # a wrong one is caught by tokenising in llama.cpp
        export_gguf(out / "f.gguf", tied, tokenizer, {}, tokenizer_pre="default")
    assert_one_line(exc, "splits a probe text differently")

    def broken(qtype, weight, importance):
        raise RuntimeError("quantiser crashed")

    layout = gguf_layout_for(tied, tokenizer, tokenizer_pre=PRE)
    with pytest.raises(RuntimeError, match="quantiser crashed"):
        write_gguf(out / "g.gguf", tied, layout, {"blk.5.ffn_up.weight": "q8_0"}, quantize=broken)
    with pytest.raises(GgufExportError) as exc:
        write_gguf(out / "h.gguf", tied, layout, {"blk.0.ffn_up.weight": "q8_0"},
                   quantize=lambda q, w, i: np.zeros(7, np.uint8))
    assert_one_line(exc, "the quantiser returned 7 bytes")
    assert os.listdir(out) == []  # no file, no temp file


@pytest.mark.parametrize("with_importance", [False, True])
def test_ggml_quantiser_writes_the_bytes_llama_quantize_writes(tmp_path, tied, layout, f16_file, with_importance):
    from profiling.quantizers.ggml import GgmlQuantizer
    from profiling.quantizers.ggml_types import SUPPORTED

    cycle = ["q4_k", "q6_k", "q3_k", "q5_k", "q2_k", "iq4_xs", "iq4_nl", "q8_0", "q5_0", "q4_1"]
    genome = {t.name: cycle[i % len(cycle)] for i, t in enumerate(layout.matrices)}
    rng = np.random.default_rng(0)
    importance = {t.name: rng.gamma(2.0, 1.0, t.in_features).astype(np.float32)
                  for t in layout.matrices} if with_importance else None
    quantizer = GgmlQuantizer(qtypes=[s.lower() for s in SUPPORTED], imatrix="calibration" if with_importance else None,
                              threads=1)
    rounded = fake_quantized(tied, layout, {}, gguf_py_quantize)  # llama-quantize starts from the F16 file
    ours = write_gguf(tmp_path / "ours.gguf", rounded, layout, genome, quantize=quantizer, importance=importance)
    theirs = quantize_with_llamacpp(f16_file, tmp_path / "theirs.gguf", "Q8_0", tensor_types=genome, imatrix=importance)
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.asarray(a[name].data).tobytes() == np.asarray(b[name].data).tobytes(), name
    assert os.path.getsize(ours) == layout.file_bytes(genome)
