"""The embedded SmolLM2-135M packed for real: bytes vs the memory model, measured PPL vs fake-quant,
text generation, all through a checkpoint folder measured in a fresh process."""

import copy
import json
import math

import pytest
import torch

from empas_tui.cli import main
from profiling.corpus import build_token_sets
from profiling.inventory import build_inventory
from profiling.models import LoadedModel
from profiling.packed import as_shipped, generate_text, heldout_loss
from profiling.quantizer import RTNQuantizer
from profiling.runner import quantized_weights
from storage.artifacts import save_artifact
from storage.checkpoint import load_packed, pack_loaded
from test_deploy_support import artifact_for

pytestmark = pytest.mark.smollm


@pytest.fixture
def one_thread():
    """This machine's 2 shared cores: 2 torch threads ran these steps 5-20x slower than 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_smollm_packed_checkpoint(smollm, tmp_path, one_thread, capsys):
    genes = {"block.0": 8, "block.29": 8, "block.15": 16, "*": 4}
    artifact = artifact_for(smollm, genes)
    path = save_artifact(artifact, tmp_path / "mixed.json")
    copy_of = LoadedModel(copy.deepcopy(smollm.model), smollm.tokenizer, smollm.model_id, smollm.fingerprint,
                          smollm.source_path)
    manifest = pack_loaded(copy_of, artifact, tmp_path / "packed", artifact_path=path)
    del copy_of
    assert abs(manifest["tensor_bytes"] - artifact.memory_bytes) <= 0.02 * artifact.memory_bytes
    assert manifest["tensor_bytes"] == artifact.memory_bytes  # exact, in fact

    tokens = build_token_sets(smollm.tokenizer, 128, 256, 128).heldout
    inv = build_inventory(smollm.model, "block")
    bits = [artifact.genes[g.name] for g in inv.genes]
    q = RTNQuantizer(64)
    with as_shipped(smollm.model, inv, bits, q):
        shipped = heldout_loss(smollm.model, tokens)
    with quantized_weights(smollm.model, inv.genes, bits, q):
        profiled = heldout_loss(smollm.model, tokens)

    # through the CLI: `empas measure DIR --json` measures it in a fresh process
    assert main(["measure", str(tmp_path / "packed"), "--json", "--heldout-tokens", "256", "--gen-tokens", "4",
                 "--threads", "1"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["heldout_tokens"] == 256 and len(table["rows"]) == 1
    measured = table["rows"][0]
    assert measured["kind"] == "packed" and measured["gen_tokens"] == 4
    assert measured["checkpoint_bytes"] == artifact.memory_bytes
    assert measured["heldout_loss"] == pytest.approx(shipped, rel=1e-5)
    assert measured["ppl"] == pytest.approx(math.exp(profiled), rel=2e-3)  # only the fp16 rounding of embeddings
    # resident: the checkpoint plus norm vectors upcast to fp32 and the rotary tables
    assert artifact.memory_bytes <= measured["resident_bytes"] <= 1.01 * artifact.memory_bytes
    assert measured["peak_rss_bytes"] > measured["resident_bytes"]

    checkpoint = load_packed(tmp_path / "packed")
    out = generate_text(checkpoint.model, checkpoint.tokenizer, "The capital of France is", max_new_tokens=6)
    assert out["new_tokens"] >= 1 and out["text"].strip()
