"""llama.cpp's presets as baselines of a ggml profile (:func:`empas_tui.jobs.baselines.preset_baselines`):
a pure function of the profile, the model's GGUF layout and the inventory of its genes, checked on a
tiny random Llama with 256-wide rows (every K-quant fits) and a profile of made-up sensitivities."""

from __future__ import annotations

import numpy as np
import pytest

from empas_tui.jobs.baselines import nearest_presets, preset_baselines
from gguf_support import make_tiny_llama_256
from profiling.deploy.gguf_writer import tensor_layout
from profiling.deploy.presets import PRESETS, preset_genome
from profiling.inventory import build_inventory
from profiling.profile import Profile

QTYPES = ["f16", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0", "q3_k", "q2_k"]


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama_256(layers=4)


def made_up_profile(inventory, qtypes=QTYPES) -> Profile:
    rng = np.random.default_rng(0)
    n = len(inventory.genes)
    sensitivity = rng.uniform(0.001, 0.1, size=(n, len(qtypes)))
    sensitivity[:, qtypes.index("f16")] = 0.0
    return Profile(model_id="tiny", model_fingerprint="f" * 64, corpus_source="default", corpus_fingerprint="c",
                   calibration_tokens=64, quantizer={"name": "ggml"}, granularity=inventory.granularity, metric="kl",
                   qtypes=list(qtypes), qtype_bits=[4.0] * len(qtypes), gene_names=inventory.gene_names(),
                   gene_blocks=[g.block for g in inventory.genes], gene_params=[g.params for g in inventory.genes],
                   cost_bytes=np.ones((n, len(qtypes)), dtype=np.int64), fixed_bytes=0, base_loss=2.0,
                   sensitivity=sensitivity, include_embeddings=True, memory_basis="gguf file", unquantized="f16")


def test_linear_genes_predict_every_preset_and_sizes_are_the_layouts(model):
    layout = tensor_layout(model)
    inventory = build_inventory(model, "linear", include_embeddings=True)
    profile = made_up_profile(inventory)
    presets = {p.name: p for p in preset_baselines(profile, layout, inventory)}
    assert list(presets) == list(PRESETS)
    for name, p in presets.items():
        types = preset_genome(name, layout)
        assert p.file_bytes == layout.file_bytes(types) and p.types == types
        # the additive proxy of the preset's own type for every gene
        expected = profile.base_loss + sum(
            profile.sensitivity[i, QTYPES.index(types[layout.tensor(g.weights[0].path).name])]
            for i, g in enumerate(inventory.genes))
        assert p.predicted_loss == pytest.approx(expected) and not p.why_not, name
    assert presets["Q2_K"].file_bytes < presets["Q4_K_M"].file_bytes < presets["Q8_0"].file_bytes
    assert presets["Q2_K"].average_bits < presets["Q4_K_M"].average_bits < presets["Q8_0"].average_bits
    near = nearest_presets(presets["Q4_K_M"].file_bytes + 1, list(presets.values()))
    assert len(near) == 2 and "Q4_K_M" in [p.name for p in near]
    assert near[0].file_bytes <= near[1].file_bytes  # smaller first


def test_what_the_genes_cannot_express_is_not_predicted(model):
    layout = tensor_layout(model)
    blocks = build_inventory(model, "block", include_embeddings=True)
    presets = {p.name: p for p in preset_baselines(made_up_profile(blocks), layout, blocks)}
    assert presets["Q8_0"].predicted_loss is not None  # one type in every block
    assert presets["Q4_K_M"].predicted_loss is None and "mixes" in presets["Q4_K_M"].why_not
    # the embedding is no gene: every preset quantises it, so none is predicted
    linears = build_inventory(model, "linear", include_embeddings=False)
    profile = made_up_profile(linears)
    assert all(p.predicted_loss is None and "token_embd" in p.why_not
               for p in preset_baselines(profile, layout, linears))
    # a type the profile did not measure
    no_q6 = made_up_profile(build_inventory(model, "linear", include_embeddings=True),
                            [q for q in QTYPES if q != "q6_k"])
    p = next(p for p in preset_baselines(no_q6, layout, build_inventory(model, "linear", include_embeddings=True))
             if p.name == "Q6_K")
    assert p.predicted_loss is None and "q6_k" in p.why_not
