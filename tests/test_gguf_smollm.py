"""The embedded SmolLM2-135M through GGUF and llama.cpp: an F16 file written from the dense model (metadata
and tokenizer from its own GGUF) runs in llama.cpp like PyTorch does; the presets llama-quantize makes
from it are the genomes :mod:`profiling.deploy.presets` predicts, byte size included (576-wide rows:
K-quants fall back); and KL to F16 measured in llama.cpp agrees with PyTorch on the same weights."""

from __future__ import annotations

import os

import pytest

from gguf_support import fake_quantized, torch_logits, torch_threads
from profiling.corpus import build_token_sets
from profiling.deploy.gguf_writer import gguf_layout_for, gguf_py_quantize, write_gguf
from profiling.deploy.llamacpp import (evaluate_gguf, generate, gguf_tensor_types, load_gguf, quantize_with_llamacpp,
                                       reference_for, timed_load)
from profiling.deploy.presets import PRESETS, preset_genome
from profiling.runner import DenseReference

pytestmark = pytest.mark.smollm


@pytest.fixture(scope="module")
def one_thread():
    with torch_threads(1):  # 2 shared cores: more torch threads only slow these steps down
        yield


@pytest.fixture(scope="module")
def smollm_f16(smollm, tmp_path_factory, one_thread):
    from profiling.models import default_gguf_path

    layout = gguf_layout_for(smollm.model, smollm.tokenizer, default_gguf_path())
    path = write_gguf(tmp_path_factory.mktemp("smollm") / "smollm2-f16.gguf", smollm.model, layout, {})
    assert os.path.getsize(path) == layout.file_bytes({})
    return layout, path


@pytest.fixture(scope="module")
def heldout(smollm):
    return build_token_sets(smollm.tokenizer, 128, 256, 128).heldout  # 2 x 128 tokens


@pytest.fixture(scope="module")
def f16_reference(smollm_f16, heldout):
    return reference_for(smollm_f16[1], heldout)


def test_smollm2_f16_file_runs_like_pytorch(smollm, smollm_f16, heldout, f16_reference):
    layout, path = smollm_f16
    vocab = load_gguf(path, vocab_only=True)
    assert vocab.metadata["tokenizer.ggml.pre"] == "smollm"  # copied from its own GGUF
    vocab.close()
    assert "output.weight" not in gguf_tensor_types(path)  # tied head
    kl = DenseReference(torch_logits(smollm.model, heldout)).mean_kl(f16_reference.logprobs)  # log-probs are logits too
    print(f"\nSmolLM2 F16 GGUF in llama.cpp vs float32 PyTorch: KL {kl:.2e}")
    assert kl < 2e-3
    llm, seconds = timed_load(path, n_ctx=128)
    out = generate(llm, "The capital of France is", max_new_tokens=6)
    llm.close()
    assert out.new_tokens >= 1 and "Paris" in out.text and seconds > 0


def test_smollm2_presets_match_llama_quantize(smollm_f16, tmp_path):
    layout, f16 = smollm_f16
    fallbacks = 0
    for preset in PRESETS:
        out = quantize_with_llamacpp(f16, tmp_path / f"{preset}.gguf", preset)
        genome = preset_genome(preset, layout)
        assert gguf_tensor_types(out) == layout.resolve(genome), preset
        assert os.path.getsize(out) == layout.file_bytes(genome), preset
        fallbacks += sum(q in ("q5_0", "q5_1", "q8_0") for n, q in genome.items() if "attn" in n)
        out.unlink()
    assert fallbacks > 0  # 576-wide rows: K-quants fell back, and the genomes said so


def test_smollm2_kl_in_llamacpp_agrees_with_pytorch(smollm, smollm_f16, heldout, f16_reference, tmp_path, one_thread):
    layout, _ = smollm_f16
    f16 = f16_reference
    q8 = {t.name: "q8_0" for t in layout.matrices}
    path = write_gguf(tmp_path / "q8_0.gguf", smollm.model, layout, q8, quantize=gguf_py_quantize)
    q8_kl = evaluate_gguf(path, heldout, reference=f16).kl
    path.unlink()
    # the PyTorch side costs a model copy and a forward: one genome, mixed, is enough to compare
    genome = {t.name: ("q8_0" if t.layer is None or t.layer % 3 == 0 else "q4_0") for t in layout.matrices}
    path = write_gguf(tmp_path / "mixed.gguf", smollm.model, layout, genome, quantize=gguf_py_quantize)
    measured = evaluate_gguf(path, heldout, reference=f16)
    twin = fake_quantized(smollm.model, layout, genome, gguf_py_quantize)  # the file's weights, in PyTorch
    torch_kl = DenseReference(torch_logits(smollm.model, heldout)).mean_kl(torch_logits(twin, heldout))
    print(f"\nSmolLM2, 256 held-out tokens: Q8_0 file KL to F16 in llama.cpp {q8_kl:.4f}; q4_0/q8_0 mix: "
          f"llama.cpp {measured.kl:.4f} vs PyTorch {torch_kl:.4f} (llama.cpp PPL {measured.ppl:.2f})")
    assert 0 < q8_kl < 0.02
    assert measured.kl > 5 * q8_kl and abs(measured.kl - torch_kl) < 0.15 * torch_kl
