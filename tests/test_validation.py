"""Measured validation on a tiny random Llama, and the baseline genome builders."""

import math

import numpy as np
import pytest
import torch

from profiling.baselines import BASELINES, baseline_genomes, q4_k_m_genome, uniform_genome, use_more_bits
from profiling.evaluation import measured_calibration_kl, validate, with_prediction
from profiling.evaluation_report import render_csv, render_markdown, render_terminal
from profiling.genome import Genome, genome_from_genes, genome_from_mapping
from profiling.inventory import Gene, Inventory, WeightRef, build_inventory
from profiling.quantizers.rtn import RTNQuantizer
from profiling.runner import next_token_loss, quantized_weights

LLAMA_LINEARS = [("self_attn.q_proj", 64, 64), ("self_attn.k_proj", 32, 64), ("self_attn.v_proj", 32, 64),
                 ("self_attn.o_proj", 64, 64), ("mlp.gate_proj", 128, 64), ("mlp.up_proj", 128, 64),
                 ("mlp.down_proj", 64, 128)]


def fake_inventory(n_blocks: int, granularity: str = "linear") -> Inventory:
    """A Llama-shaped inventory without a model (the builders only need the layout)."""
    genes = []
    for i in range(n_blocks):
        lins = [WeightRef(f"model.layers.{i}.{name}", i, o, n) for name, o, n in LLAMA_LINEARS]
        if granularity == "block":
            genes.append(Gene(f"block.{i}", i, tuple(lins)))
        else:
            genes += [Gene(f"layers.{i}.{lin.path.split(f'.{i}.', 1)[1]}", i, (lin,)) for lin in lins]
    params = sum(g.params for g in genes)
    return Inventory(granularity=granularity, blocks_path="model.layers", genes=genes, total_params=params + 1000,
                     n_blocks=n_blocks)


def tokens(n_seq=6, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 259, (n_seq, length), generator=g)


def test_q4_k_m_layout_on_32_blocks():
    # llama.cpp use_more_bits on 32 layers: the first and last 4, and every third block from 6
    raised = {i for i in range(32) if use_more_bits(i, 32)}
    assert raised == {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    inv = fake_inventory(32)
    g = q4_k_m_genome(inv)
    assert len(g.qtypes) == 32 * 7
    for lin, q in zip(g.weights, g.qtypes):
        special = lin.path.endswith(("v_proj", "down_proj"))
        assert q == ("6" if special and lin.block in raised else "4"), lin.path
    assert sum(q == "6" for q in g.qtypes) == 2 * 16
    # the same mix from a block inventory (it cannot be a block genome, so it is built per linear)
    gb = q4_k_m_genome(fake_inventory(32, "block"))
    assert gb.qtypes == g.qtypes and [l.path for l in gb.weights] == [l.path for l in g.weights]
    assert "per-linear" in gb.note
    # integer division as in llama.cpp: 30 layers -> blocks 0-2, 5, 8, ..., 23, 26-29
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_uniform_and_dense_genomes():
    inv = fake_inventory(4, "block")
    q = RTNQuantizer(64)
    for b in (2, 3, 4, 8):
        g = uniform_genome(inv, b)
        assert g.name == f"uniform-{b}" and set(g.qtypes) == {str(b)} and g.average_bits(q) == b
        assert not g.is_dense(q)
        assert g.memory_bytes(q, inv.fixed_bytes) == inv.fixed_bytes + int(inv.cost_table(q, [str(b)]).sum())
    dense = uniform_genome(inv, 16)
    assert dense.name == "dense" and dense.is_dense(q) and dense.average_bits(q) == 16
    assert dense.memory_bytes(q, inv.fixed_bytes) == 2 * inv.total_params
    names = [g.name for g in baseline_genomes(inv)]
    assert names == list(BASELINES)
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_genomes(inv, ["uniform-1x"])


def test_genome_expansion_and_mapping():
    inv = fake_inventory(3, "block")
    g = genome_from_genes(inv, ["2", "4", "8"], "x")
    assert g.qtypes == ("2",) * 7 + ("4",) * 7 + ("8",) * 7
    assert [w.path for w in g.weights] == [w.path for gene in inv.genes for w in gene.weights]
    assert genome_from_mapping(inv, {"block.0": "2", "block.1": "4", "block.2": "8"}, "y").qtypes == g.qtypes
    with pytest.raises(ValueError, match="do not match"):
        genome_from_mapping(inv, {"block.0": "2", "block.1": "4", "block.9": "8"}, "bad")
    with pytest.raises(ValueError, match="has 2 genes"):
        genome_from_genes(inv, ["2", "4"], "short")
    with pytest.raises(ValueError, match="20 qtypes for 21 weights"):
        Genome("short", g.weights, g.qtypes[:-1])
    # a qtype the quantiser does not have is refused before anything is measured
    with pytest.raises(ValueError, match="bit-width 1 is not supported"):
        Genome("odd", g.weights, ("1",) * len(g.weights)).check(RTNQuantizer(64))
    assert g.check(RTNQuantizer(64)) is g


def test_validation_reproducible_and_correct(tiny_llama):
    from tests.conftest import make_tiny_llama

    inv = build_inventory(tiny_llama, "linear")
    q = RTNQuantizer(32)
    genomes = baseline_genomes(inv)
    toks = tokens()
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    a = validate(tiny_llama, inv, toks, q, genomes, batch_sequences=2)
    # weights restored
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
    # same seed, fresh model, other batching: the same numbers
    b = validate(make_tiny_llama(), inv, toks, q, genomes, batch_sequences=6)
    for ra, rb in zip(a.rows, b.rows):
        assert ra.name == rb.name and ra.memory_bytes == rb.memory_bytes
        assert ra.loss == pytest.approx(rb.loss, rel=1e-5) and ra.kl == pytest.approx(rb.kl, rel=1e-3, abs=1e-5)
    dense = a.row("dense")
    assert dense.kl == 0 and dense.delta_ppl_pct == 0 and dense.ppl == pytest.approx(math.exp(a.dense_loss))
    with torch.no_grad():
        assert a.dense_loss == pytest.approx(next_token_loss(tiny_llama(input_ids=toks).logits, toks), rel=1e-5)
        with quantized_weights(tiny_llama, inv.genes, ["3"] * len(inv.genes), q):
            direct = next_token_loss(tiny_llama(input_ids=toks).logits, toks)
    assert a.row("uniform-3").loss == pytest.approx(direct, rel=1e-5)
    kls = [a.row(f"uniform-{bits}").kl for bits in (8, 4, 3, 2)]
    assert kls == sorted(kls) and kls[0] > 0
    mems = [a.row(n).memory_bytes for n in ("dense", "uniform-8", "uniform-4", "uniform-3", "uniform-2")]
    assert mems == sorted(mems, reverse=True)
    assert a.row("uniform-4").memory_bytes < a.row("q4_k_m-mix").memory_bytes < a.row("uniform-8").memory_bytes
    assert a.row("uniform-4").delta_ppl_pct == pytest.approx(100 * (a.row("uniform-4").ppl / dense.ppl - 1))
    assert a.fidelity is None  # no genome carried a prediction


def test_validation_fidelity_progress_and_tables(tiny_llama):
    inv = build_inventory(tiny_llama, "block")
    q = RTNQuantizer(32)
    genomes = [with_prediction(genome_from_genes(inv, qtypes.split(","), f"g{k}", kind="front"), 5.0 + 0.01 * k, 5.0)
               for k, qtypes in enumerate(["8,8,8", "4,8,8", "4,4,4", "2,4,4", "2,2,2"])]
    events = []
    r = validate(tiny_llama, inv, tokens(), q, genomes, progress=events.append, tokens_source="random tokens")
    assert [e.kind for e in events] == ["start"] + ["genome"] * 5 + ["done"]
    assert events[3].done == 3 and events[3].row.name == "g2"
    f = r.fidelity
    assert f["points"] == 5 and f["spearman"] is not None and -1 <= f["spearman"] <= 1
    assert r.rows[2].predicted_ppl == pytest.approx(math.exp(5.02))
    text = render_terminal(r, notes=["extra note"])
    assert "weights MiB (memory model)" in text and "(pred.)" in text and "extra note" in text
    assert "tok/s" not in text and "throughput" not in text.lower()
    md = render_markdown(r)
    assert md.splitlines()[0].startswith("| genome |") and md.count("\n| g") == 5
    csv_text = render_csv(r)
    assert csv_text.splitlines()[0].startswith("name,kind,average_bits,memory_bytes")
    assert len(csv_text.splitlines()) == 6


def test_measured_calibration_kl_matches_heldout_machinery(tiny_llama):
    from profiling.runner import PrefixRunner

    inv = build_inventory(tiny_llama, "linear")
    q = RTNQuantizer(32)
    toks = tokens(seed=1)
    runner = PrefixRunner(tiny_llama, inv, toks)
    genomes = [uniform_genome(inv, 4), uniform_genome(inv, 2)]
    kls = measured_calibration_kl(runner, genomes, q)
    r = validate(tiny_llama, inv, toks, q, genomes, batch_sequences=len(toks))
    np.testing.assert_allclose(kls, [row.kl for row in r.rows], rtol=1e-3)


def test_fused_kl_resolves_tiny_divergences():
    """Regression: the fused KL summed each term over all tokens before subtracting, so on a real
    vocabulary a KL of ~1e-5 nats/token (an 8-bit layer) came out as 0. It must match float64."""
    from profiling.runner import DenseReference

    g = torch.Generator().manual_seed(0)
    dense = 4 * torch.randn(512, 32768, generator=g)
    candidate = dense + 0.01 * torch.randn(512, 32768, generator=g)
    lp = torch.log_softmax(dense.double(), -1)
    lq = torch.log_softmax(candidate.double(), -1)
    exact = float((lp.exp() * (lp - lq)).sum(-1).mean())
    assert 1e-6 < exact < 1e-4
    assert DenseReference(dense).mean_kl(candidate) == pytest.approx(exact, rel=0.02)
