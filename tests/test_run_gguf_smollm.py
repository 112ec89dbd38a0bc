"""The embedded SmolLM2-135M as a GGUF through ``empas evaluate / generate`` in llama.cpp: a q4_0/q8_0 mix
written from the dense model (metadata and tokenizer from its own GGUF, as the GGUF export writes it)
measures the same KL to F16 in llama.cpp as in PyTorch on the file's weights, and generates in plain and
chat form (SmolLM2's GGUF has a chat template). Few tokens: the point is agreement on a real model."""

from __future__ import annotations

import json

import pytest

from empas_tui.cli import main
from gguf_support import torch_threads
from profiling.deploy.gguf_writer import gguf_layout_for, gguf_py_quantize, write_gguf

pytestmark = pytest.mark.smollm


def cli_json(capsys, *argv) -> dict:
    code = main([str(a) for a in argv] + ["--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


@pytest.fixture(scope="module")
def mixed_gguf(smollm, tmp_path_factory):
    from profiling.models import default_gguf_path

    with torch_threads(1):
        layout = gguf_layout_for(smollm.model, smollm.tokenizer, default_gguf_path())
        genome = {t.name: ("q8_0" if t.layer is None or t.layer % 3 == 0 else "q4_0") for t in layout.matrices}
        return write_gguf(tmp_path_factory.mktemp("smollm-run") / "mixed.gguf", smollm.model, layout, genome,
                          quantize=gguf_py_quantize)


def test_smollm2_gguf_kl_in_llamacpp_agrees_with_pytorch(mixed_gguf, capsys):
    with torch_threads(1):
        result = cli_json(capsys, "evaluate", mixed_gguf, "--threads", 1, "--heldout-tokens", 256)
    (row,) = result["rows"]
    print(f"\nSmolLM2 q4_0/q8_0 GGUF, 256 held-out tokens: KL to F16 llama.cpp {row['llamacpp_kl']:.4f}, PyTorch "
          f"{row['torch_kl']:.4f}; PPL {row['llamacpp_ppl']:.2f} vs {row['torch_ppl']:.2f}; F16 across engines "
          f"{result['engines_f16_kl']:.2e}")
    assert result["model"] == "default" and result["engines_f16_kl"] < 2e-3
    assert row["torch_kl"] > 0.02  # q4_0 on two thirds of the blocks: far above the kernels' noise
    assert abs(row["kl_difference"]) < 0.15 * row["torch_kl"]
    assert abs(row["ppl_difference"]) < 0.03 * row["torch_ppl"]
    assert any("Q4_1" in note for note in result["notes"])  # the embedded model's grid caveat


def test_smollm2_gguf_generates_plain_and_chat(mixed_gguf, capsys):
    plain = cli_json(capsys, "generate", mixed_gguf, "--prompt", "The capital of France is", "--max-new-tokens", 6,
                     "--threads", 1)
    assert "Paris" in plain["text"] and plain["generation_tokens_per_s"] > 0
    chat = cli_json(capsys, "generate", mixed_gguf, "--prompt", "What is the capital of France?", "--chat",
                    "--max-new-tokens", 12, "--threads", 1)
    assert chat["chat"] and chat["prompt_tokens"] > 20 and chat["new_tokens"] >= 1  # the template's own tokens
