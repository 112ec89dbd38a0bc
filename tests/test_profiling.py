"""Inventory, corpus and sensitivity profiling on a tiny random Llama (fast)."""

import numpy as np
import pytest
import torch

from profiling.corpus import CorpusError, build_token_sets, default_corpus_texts
from profiling.inventory import InventoryError, build_inventory
from conftest import rtn_settings
from profiling.quantizers.rtn import RTNQuantizer
from profiling.runner import PrefixRunner, mean_kl, quantized_weights
from profiling.sensitivity import ProfileCancelled, fidelity_check, prepare, run_profile
from profiling.settings import QuantizerError, parse_rtn_bits
from storage.database import open_database


def tokens_for(n_seq=3, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 259, (n_seq, length), generator=g)


def test_inventory_block_and_linear(tiny_llama):
    inv = build_inventory(tiny_llama, "block")
    assert inv.blocks_path == "model.layers"
    assert [g.name for g in inv.genes] == ["block.0", "block.1", "block.2"]
    assert all(len(g.weights) == 7 for g in inv.genes)
    lin = build_inventory(tiny_llama, "linear")
    assert len(lin.genes) == 21
    assert lin.genes[6].name == "layers.0.mlp.down_proj"
    total = sum(p.numel() for p in tiny_llama.parameters())
    assert inv.total_params == total
    # tied embedding counted once in fixed; gene params equal the linears' weights
    linear_params = sum(m.weight.numel() for n, m in tiny_llama.named_modules()
                        if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}")
    assert sum(g.params for g in inv.genes) == linear_params == sum(g.params for g in lin.genes)
    assert inv.fixed_params == total - linear_params
    with pytest.raises(InventoryError):
        build_inventory(tiny_llama, "group")


def test_inventory_gpt2_conv1d():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=259, n_positions=64))
    inv = build_inventory(model, "linear")
    names = [g.name for g in inv.genes]
    assert "h.0.attn.c_attn" in names and "h.1.mlp.c_proj" in names
    c_attn = inv.genes[names.index("h.0.attn.c_attn")].weights[0]
    assert (c_attn.out_features, c_attn.in_features, c_attn.transposed) == (192, 64, True)


def test_cost_table_matches_quantizer(tiny_llama):
    inv = build_inventory(tiny_llama, "block")
    q = RTNQuantizer(64)
    table = inv.cost_table(q, ["2", "4", "16"])
    assert table.shape == (3, 3)
    assert table[0, 2] == 2 * inv.genes[0].params
    assert table[0, 0] < table[0, 1] < table[0, 2]


def test_prefix_reuse_gives_same_kl_as_full_forward(tiny_llama):
    inv = build_inventory(tiny_llama, "linear")
    toks = tokens_for()
    fast = PrefixRunner(tiny_llama, inv, toks, reuse_prefix=True)
    slow = PrefixRunner(tiny_llama, inv, toks, reuse_prefix=False)
    assert fast.reuse_prefix and not slow.reuse_prefix
    q = RTNQuantizer(32)
    for gene in (inv.genes[0], inv.genes[9], inv.genes[-1]):
        a = fast.kl_with([gene], ["2"], q)
        b = slow.kl_with([gene], ["2"], q)
        assert a > 0 and a == pytest.approx(b, rel=1e-4, abs=1e-7)


def test_fused_kl_equals_reference(tiny_llama):
    inv = build_inventory(tiny_llama, "block")
    runner = PrefixRunner(tiny_llama, inv, tokens_for())
    logits = runner.logits_with([inv.genes[1]], ["2"], RTNQuantizer(32))
    flat = logits.reshape(-1, logits.shape[-1])
    assert runner.dense.mean_kl(logits) == pytest.approx(mean_kl(runner.dense.logprobs, flat), rel=1e-4)


def test_weights_restored_after_quantisation(tiny_llama):
    inv = build_inventory(tiny_llama, "block")
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with quantized_weights(tiny_llama, inv.genes, ["2", "3", "4"], RTNQuantizer(32)):
        assert not torch.equal(tiny_llama.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_kl_nonnegative_and_monotone_in_bits(tiny_llama):
    inv = build_inventory(tiny_llama, "block")
    runner = PrefixRunner(tiny_llama, inv, tokens_for())
    q = RTNQuantizer(32)
    for gene in inv.genes:
        values = [runner.kl_with([gene], [b], q) for b in ("2", "4", "8")]
        assert all(v >= 0 for v in values)
        assert values[0] > values[1] > values[2]
    assert runner.kl_with(inv.genes, ["16", "16", "16"], q) == pytest.approx(0.0, abs=1e-6)


def test_parse_bits():
    assert parse_rtn_bits("16,2, 4,8,4") == ("2", "4", "8", "16")
    for bad in ("", "2,x", "1,4", "2,4,32"):
        with pytest.raises(QuantizerError):
            parse_rtn_bits(bad)


def test_embedding_genes_and_untied_head(tiny_llama):
    """The embedding is a gene read before block 0 (full forward); an untied head one read after the last block."""
    inv = build_inventory(tiny_llama, "linear", include_embeddings=True)
    assert inv.genes[0].name == "embed_tokens" and inv.genes[0].block == -1
    assert len(inv.genes) == 22  # tied: the head is the embedding, one gene
    assert inv.fixed_params == sum(p.numel() for p in tiny_llama.parameters()) - sum(g.params for g in inv.genes)
    toks = tokens_for()
    q = RTNQuantizer(32)
    fast = PrefixRunner(tiny_llama, inv, toks)
    slow = PrefixRunner(tiny_llama, inv, toks, reuse_prefix=False)
    assert fast.kl_with([inv.genes[0]], ["2"], q) == pytest.approx(slow.kl_with([inv.genes[0]], ["2"], q), rel=1e-5)
    from conftest import make_tiny_llama
    from transformers import LlamaForCausalLM

    tied = make_tiny_llama()
    untied = LlamaForCausalLM(tied.config.__class__(**{**tied.config.to_dict(), "tie_word_embeddings": False})).eval()
    inv2 = build_inventory(untied, "block", include_embeddings=True)
    assert [g.name for g in inv2.genes][-1] == "lm_head" and inv2.genes[-1].block == inv2.n_blocks
    fast2 = PrefixRunner(untied, inv2, toks)
    slow2 = PrefixRunner(untied, inv2, toks, reuse_prefix=False)
    head = inv2.genes[-1]
    a, b = fast2.kl_with([head], ["2"], q), slow2.kl_with([head], ["2"], q)
    assert a > 0 and a == pytest.approx(b, rel=1e-4)


def test_corpus_default_is_disjoint_and_deterministic(tiny_loaded):
    calib, held = default_corpus_texts()
    assert len(calib) > 50_000 and len(held) > 50_000
    a = build_token_sets(tiny_loaded.tokenizer, 256, 256, 64)
    b = build_token_sets(tiny_loaded.tokenizer, 256, 256, 64)
    assert a.fingerprint == b.fingerprint and a.calibration.shape == (4, 64)
    assert not torch.equal(a.calibration, a.heldout)


def test_corpus_text_file_errors(tiny_loaded, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CorpusError, match="empty"):
        build_token_sets(tiny_loaded.tokenizer, 64, 64, 32, empty)
    short = tmp_path / "short.txt"
    short.write_text("hello world " * 10)
    with pytest.raises(CorpusError, match="fewer tokens"):
        build_token_sets(tiny_loaded.tokenizer, 512, 512, 64, short)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc" * 50)
    with pytest.raises(CorpusError, match="UTF-8"):
        build_token_sets(tiny_loaded.tokenizer, 64, 64, 32, binary)
    ok = tmp_path / "ok.txt"
    ok.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    sets = build_token_sets(tiny_loaded.tokenizer, 256, 256, 64, ok)
    # calibration from the start, held-out from the end, never overlapping
    n = len(ok.read_bytes())
    assert n >= 512 and sets.calibration.numel() == 256 and sets.heldout.numel() == 256


def test_profile_persists_and_resumes(tiny_loaded, tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    store = open_database(url).profiles
    two = prepare(rtn_settings("2,4"), tiny_loaded)
    calls = {"n": 0}

    def stop_after_two_genes():
        calls["n"] += 1
        return calls["n"] > 4  # 2 bits x 2 genes measured, then "killed"

    with pytest.raises(ProfileCancelled):
        run_profile(two, store, should_stop=stop_after_two_genes)
    assert len(store.entries(two.key)) == 4
    events = []
    setup = prepare(rtn_settings("2,4,16"), tiny_loaded)
    assert setup.key == two.key  # the qtype list is not part of the key: entries are reused per qtype
    profile = run_profile(setup, open_database(url).profiles, progress=events.append)
    assert profile.reused_entries == 4
    assert len([e for e in events if e.kind == "entry"]) == 5  # 1 gene x 2 + 3 genes x "16"
    full = run_profile(setup, None)
    np.testing.assert_allclose(profile.sensitivity, full.sensitivity, rtol=1e-5, atol=1e-8)
    assert np.all(profile.sensitivity[:, 2] == 0)
    again = run_profile(setup, open_database(url).profiles)
    assert again.reused_entries == 9
    assert again.measured_seconds == pytest.approx(profile.measured_seconds, rel=1e-6) and again.measured_seconds > 0


def test_fisher_profile_positive_and_correlated_with_kl(tiny_loaded):
    setup_kl = prepare(rtn_settings("2,4", "linear", heldout_tokens=64), tiny_loaded)
    setup_f = prepare(rtn_settings("2,4", "linear", heldout_tokens=64, metric="fisher"), tiny_loaded)
    kl = run_profile(setup_kl)
    fisher = run_profile(setup_f)
    assert np.all(fisher.sensitivity > 0)
    from profiling.sensitivity import correlations

    corr = correlations(list(kl.sensitivity[:, 0]), list(fisher.sensitivity[:, 0]))
    assert corr["spearman"] > 0.3
    assert not any(p.requires_grad for p in tiny_loaded.model.parameters())


def test_fidelity_check_reports_correlations(tiny_loaded):
    setup = prepare(rtn_settings("2,3,4,8", heldout_tokens=64), tiny_loaded)
    profile = run_profile(setup)
    runner = PrefixRunner(tiny_loaded.model, setup.inventory, setup.tokens.calibration)
    fid = fidelity_check(profile, runner, setup.inventory, setup.quantizer, count=8)
    assert fid["genomes"] == 8 and len(fid["measured_kl"]) == 8
    assert fid["spearman"] > 0.5
