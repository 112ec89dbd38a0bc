"""The embedded SmolLM2-135M packed for real: bytes vs the memory model, measured PPL vs fake-quant,
text generation, through a checkpoint folder loaded without the dense weights.

Measured in this process (one session-scoped SmolLM2 load): the fresh measuring process of
`empas measure` is tested on the tiny model (tests/test_deploy.py), where starting it costs less."""

import copy
import math

import pytest
import torch

from profiling.corpus import build_token_sets
from profiling.deploy.checkpoint import load_packed, pack_loaded, weight_file_bytes
from profiling.deploy.generation import generate_text, heldout_loss
from profiling.deploy.measure import measure_loaded
from profiling.deploy.packed_modules import PackedLinear
from profiling.deploy.packing import as_shipped
from profiling.inventory import build_inventory
from profiling.models import LoadedModel
from profiling.quantizers.rtn import RTNQuantizer
from profiling.runner import quantized_weights
from storage.artifacts import save_artifact
from test_deploy_support import artifact_for

pytestmark = pytest.mark.smollm


@pytest.fixture
def one_thread():
    """This machine's 2 shared cores: 2 torch threads ran these steps 5-20x slower than 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_smollm_packed_checkpoint(smollm, tmp_path, one_thread):
    genes = {"block.0": "8", "block.29": "8", "block.15": "16", "*": "4"}
    artifact = artifact_for(smollm, genes)
    path = save_artifact(artifact, tmp_path / "mixed.json")
    copy_of = LoadedModel(copy.deepcopy(smollm.model), smollm.tokenizer, smollm.model_id, smollm.fingerprint,
                          smollm.source_path)
    manifest = pack_loaded(copy_of, artifact, tmp_path / "packed", artifact_path=path)
    del copy_of
    assert abs(manifest["tensor_bytes"] - artifact.memory_bytes) <= 0.02 * artifact.memory_bytes
    assert manifest["tensor_bytes"] == artifact.memory_bytes  # exact, in fact
    assert weight_file_bytes(tmp_path / "packed") == artifact.memory_bytes  # what `empas measure` reports

    tokens = build_token_sets(smollm.tokenizer, 128, 256, 128).heldout
    inv = build_inventory(smollm.model, "block")
    qtypes = [artifact.genes[g.name] for g in inv.genes]
    q = RTNQuantizer(64)
    with as_shipped(smollm.model, inv, qtypes, q):
        shipped = heldout_loss(smollm.model, tokens)
    with quantized_weights(smollm.model, inv.genes, qtypes, q):
        profiled = heldout_loss(smollm.model, tokens)

    checkpoint = load_packed(tmp_path / "packed")
    assert sum(isinstance(m, PackedLinear) for m in checkpoint.model.modules()) == 29 * 7  # block 15 stays dense
    measured = measure_loaded(checkpoint.model, checkpoint.tokenizer, tokens, gen_tokens=4, repeats=1)
    assert measured["gen_tokens"] == 4 and measured["tokens_per_s"] > 0 and measured["heldout_tokens"] == 256
    assert measured["heldout_loss"] == pytest.approx(shipped, rel=1e-5)
    assert measured["ppl"] == pytest.approx(math.exp(profiled), rel=2e-3)  # only the fp16 rounding of embeddings
    # resident: the checkpoint plus norm vectors upcast to fp32 and the rotary tables
    assert artifact.memory_bytes <= measured["resident_bytes"] <= 1.01 * artifact.memory_bytes

    out = generate_text(checkpoint.model, checkpoint.tokenizer, "The capital of France is", max_new_tokens=6)
    assert out["new_tokens"] >= 1 and out["text"].strip()
