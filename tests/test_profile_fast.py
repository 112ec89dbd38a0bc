"""The fast KL profile (exact shortcuts, screening, exact measurement of the rest) and truthful progress."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from profiling.profile import SKIP_VALUES, skip_reason
from profiling.runner import PrefixRunner
from profiling.sensitivity import (ProfileCancelled, Screening, cell_work, dominated_mask, eta_seconds, measure_gene,
                                   load_profile, make_screening, prepare, run_profile)
from profiling.settings import ProfileSettings, QuantizerSettings, SettingsError
from search.space import SearchSpace
from storage.database import open_database

from empas_tui.cli.output import ProgressBar

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

REL_BAR, ABS_BAR = 0.05, 1e-5



# -- the dominance rule (pure) ----------------------------------------------------------------------

def test_dominated_mask_keeps_the_front_of_each_gene():
    cost = [10, 20, 20, 30, 40]
    value = [5.0, 1.0, 1.1, 2.0, 0.5]
    # 20b@1.1 is worse than 20b@1.0 (equal bytes); 30b@2.0 worse than 20b@1.0; 40b@0.5 better than all
    assert dominated_mask(cost, value).tolist() == [False, False, True, True, False]
    # with a margin, losing by less than it is not enough
    assert dominated_mask(cost, value, margin=0.15).tolist() == [False, False, False, True, False]


def test_dominated_mask_zeros_unknowns_and_ties():
    nan = math.nan
    # a cheaper zero dominates everything above it, known or not; of equal zeros the first one stays
    assert dominated_mask([5, 10, 10, 20], [nan, 0.0, 0.0, nan]).tolist() == [False, False, True, True]
    # an unknown value dominates nothing and is dominated only by a zero
    assert dominated_mask([5, 10], [nan, 3.0]).tolist() == [False, False]
    assert dominated_mask([5, 10], [1.0, nan]).tolist() == [False, False]


def test_screened_losers_need_confidence_not_just_a_bigger_mean():
    from profiling.sensitivity import screened_losers

    rng = np.random.default_rng(0)
    base = rng.exponential(1e-3, 256)
    cost = np.array([10, 10, 10])
    clear = base * 1.5  # every token worse: a sure loser
    noisy = base * rng.choice([0.2, 2.2], 256)  # worse on average, but token by token a coin toss
    lost = screened_losers(cost, {0: base, 1: clear, 2: noisy}, margin=0.05)
    assert lost == {1}  # the noisy one is measured exactly instead
    assert float(noisy.mean()) > 1.05 * float(base.mean())  # though its mean alone would have skipped it
    # a cheaper cell is never skipped for a more expensive one, however much better that one is
    assert screened_losers(np.array([5, 10]), {0: base * 9, 1: base}, margin=0.05) == set()


def test_screening_pairs_compare_equal_bytes_both_ways():
    from profiling.sensitivity import _screening_pairs

    # SmolLM2's down_proj: iq4_nl, q4_0, q4_k all 4.5 bpw; q4_k's error is 15x smaller and listed last
    cost = np.array([864.0, 864.0, 864.0, 660.0, 504.0])
    errors = [37.5, 51.4, 2.43, 167.0, 454.0]
    assert _screening_pairs(cost, errors, [0, 1, 2, 3, 4]) == {0, 1, 2}
    # RTN-like: each cheaper type has a far larger error, nothing to screen
    assert _screening_pairs(np.array([2.0, 4.0, 8.0]), [100.0, 6.0, 0.4], [0, 1, 2]) == set()


# -- fast vs exact on a real model ----------------------------------------------------------------

def ggml_settings(granularity="block", **kw) -> ProfileSettings:
    return ProfileSettings(granularity=granularity, quantizer=QuantizerSettings.parse("ggml"), calib_tokens=256,
                           heldout_tokens=64, seq_len=32, **kw)


@pytest.fixture
def zeroed_loaded(tiny_loaded):
    """The tiny Llama with block 1's linears set to zero: every type leaves them bit for bit unchanged."""
    for module in tiny_loaded.model.model.layers[1].modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data.zero_()
    return tiny_loaded


def test_fast_profile_matches_exact_and_skips_only_dominated_cells(zeroed_loaded):
    fast_setup = prepare(ggml_settings(), zeroed_loaded)
    exact_setup = replace(fast_setup, settings=replace(fast_setup.settings, mode="exact"))
    assert fast_setup.key != exact_setup.key  # the two are never mixed in a storage
    runner = PrefixRunner(zeroed_loaded.model, fast_setup.inventory, fast_setup.tokens.calibration,
                          importance=fast_setup.importance)
    exact = run_profile(exact_setup, runner=runner)
    fast = run_profile(fast_setup, runner=runner)
    assert exact.mode == "exact" and fast.mode == "fast" and not exact.dominated.any()

    measured = fast.offered
    err = np.abs(fast.sensitivity - exact.sensitivity)[measured]
    rel = err / np.maximum(exact.sensitivity[measured], 1e-30)
    assert np.all((rel <= REL_BAR) | (err <= ABS_BAR))
    # every skipped cell really is dominated: a cheaper-or-equal type of its gene is as good, exactly
    for i, j in zip(*np.nonzero(fast.dominated)):
        cheaper = [k for k in np.flatnonzero(exact.valid[i]) if k != j and exact.cost_bytes[i, k] <= exact.cost_bytes[i, j]]
        assert any(exact.sensitivity[i, k] <= exact.sensitivity[i, j] for k in cheaper), (fast.gene_names[i], j)
    # the zeroed linear: its cheapest type has S = 0 without a pass, all the others are skipped for it
    z = fast.gene_names.index("block.1")
    assert fast.skipped.get("zero", 0) >= int(fast.valid[z].sum()) - 1
    offered = np.flatnonzero(fast.offered[z])
    assert len(offered) == 1 and fast.sensitivity[z, offered[0]] == 0.0
    assert int(fast.dominated.sum()) == sum(fast.skipped.values())
    # the search offers only what the profile offers
    space = SearchSpace.from_profile(fast)
    assert np.array_equal(space.valid, fast.offered)
    # the archetype-deciding front is the same: every exact-front point of the exact profile is reachable
    assert fast.skipped_text().startswith(f"{int(fast.dominated.sum())} dominated cells skipped")


def test_screening_skips_a_cell_that_loses_and_measures_the_rest_exactly(tiny_loaded):
    setup = prepare(ggml_settings("linear"), tiny_loaded)
    runner = PrefixRunner(tiny_loaded.model, setup.inventory, setup.tokens.calibration, importance=setup.importance)
    screen = make_screening(setup, runner, margin=0.05)
    assert screen.runner.tokens.numel() == 128 and screen.rest.tokens.numel() == 128
    total_screened = 0
    for i in [i for i, g in enumerate(setup.inventory.genes) if g.block == 0]:
        qtypes = [q for q, ok in zip(setup.quantizer.qtypes, setup.inventory.valid_table(setup.quantizer,
                                                                                           setup.quantizer.qtypes)[i]) if ok]
        fast = measure_gene(runner, setup.inventory, setup.quantizer, i, qtypes, {}, screen)
        exact = measure_gene(runner, setup.inventory, setup.quantizer, i, qtypes)
        for q, v in fast.items():
            if skip_reason(v):
                total_screened += skip_reason(v) == "screened"
                cost = {p: sum(setup.quantizer.weight_bytes(p, w.out_features, w.in_features)
                               for w in setup.inventory.genes[i].weights) for p in qtypes}
                assert any(exact[p] <= exact[q] for p in qtypes if p != q and cost[p] <= cost[q])
            else:  # screened cells: screening tokens + the rest, the same tokens as the exact pass
                assert v == pytest.approx(exact[q], rel=1e-4, abs=1e-9)
    assert total_screened > 0  # q4_0 loses to iq4_nl (same bytes) on some gene: screening did work


def test_fast_profile_resume_remeasures_nothing(zeroed_loaded, tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    setup = prepare(ggml_settings(), zeroed_loaded)
    genes_seen = []

    def stop_after_three_genes():
        return len(genes_seen) >= 2

    events = []
    with pytest.raises(ProfileCancelled):
        run_profile(setup, open_database(url).profiles, progress=lambda e: (events.append(e), e.kind == "entry"
                                                                           and e.gene_index not in genes_seen
                                                                           and genes_seen.append(e.gene_index)),
                    should_stop=stop_after_three_genes)
    stored = open_database(url).profiles.entries(setup.key)
    assert {g for g, _ in stored} == set(genes_seen)
    resumed_events = []
    profile = run_profile(setup, open_database(url).profiles, progress=resumed_events.append)
    measured_again = {(e.gene_index, e.qtype) for e in resumed_events if e.kind == "entry"}
    assert not measured_again & set(stored)  # finished genes, skip markers included, are not touched
    assert profile.reused_entries == len(stored)
    again_events = []
    again = run_profile(setup, open_database(url).profiles, progress=again_events.append)
    assert not [e for e in again_events if e.kind == "entry"] and again.reused_entries == int(again.valid.sum())
    assert np.array_equal(again.dominated, profile.dominated) and again.skipped == profile.skipped
    np.testing.assert_array_equal(np.nan_to_num(again.sensitivity, nan=-7), np.nan_to_num(profile.sensitivity, nan=-7))
    # the markers are what the storage holds for skipped cells; a measured S is never negative
    assert set(v for v in stored.values() if v < 0) <= set(SKIP_VALUES.values())


def test_fewer_types_later_measure_the_cells_skipped_for_a_type_now_left_out(zeroed_loaded, tmp_path):
    """Qtypes are not part of the key: a run without the type that dominated some cells (SmolLM2: every
    type above q4_1 skipped for q4_1's S = 0, then `--types` without q4_1) measures those cells instead
    of taking their markers, and the storage then holds the measured values."""
    db = open_database(f"sqlite:///{tmp_path / 'p.db'}")
    first = run_profile(prepare(ggml_settings(), zeroed_loaded), db.profiles)
    z = first.gene_names.index("block.1")
    (winner,) = [first.qtypes[j] for j in np.flatnonzero(first.offered[z])]
    assert first.dominated[z].sum() >= 2  # the zeroed block: one type offered, the others skipped for it
    fewer = ",".join(q for q in first.qtypes if q != winner)
    setup = prepare(replace(ggml_settings(), quantizer=QuantizerSettings.parse("ggml", fewer)), zeroed_loaded)
    assert setup.key == prepare(ggml_settings(), zeroed_loaded).key
    assert load_profile(setup, db.profiles) is None  # stored cells that no longer hold are not a profile
    events = []
    second = run_profile(setup, db.profiles, progress=events.append)
    offered = [second.qtypes[j] for j in np.flatnonzero(second.offered[z])]
    assert len(offered) == 1 and offered[0] != winner and second.sensitivity[z, second.qtypes.index(offered[0])] == 0
    assert any(e.kind == "entry" and e.gene_index == z for e in events)
    # every other gene keeps at least one offered type, and the first run's profile is still found whole
    assert second.offered.any(axis=1).all()
    assert load_profile(prepare(ggml_settings(), zeroed_loaded), db.profiles) is not None


def test_profile_json_round_trip_keeps_dominated_cells(zeroed_loaded):
    from profiling.profile import Profile

    profile = run_profile(prepare(ggml_settings(), zeroed_loaded))
    back = Profile.from_dict(profile.to_dict())
    assert np.array_equal(back.dominated, profile.dominated) and back.skipped == profile.skipped
    assert back.key == profile.key and back.mode == "fast"


def test_profile_mode_is_validated():
    with pytest.raises(SettingsError, match="--profile-mode"):
        ProfileSettings(mode="quick").validate()


@pytest.mark.smollm
def test_q4_1_is_exactly_zero_on_smollm_and_dominates_what_costs_more(smollm):
    """SmolLM2's dense weights are a dequantised Q4_1: that type is lossless, found without a pass."""
    settings = ProfileSettings(granularity="linear", quantizer=QuantizerSettings.parse("ggml", "q8_0,q4_1,f16"),
                               calib_tokens=128, heldout_tokens=64, include_embeddings=False)
    setup = prepare(settings, smollm)
    runner = PrefixRunner(smollm.model, setup.inventory, setup.tokens.calibration[:1, :16],
                          importance=setup.importance)
    gene = setup.inventory.gene_names().index("layers.29.self_attn.k_proj")
    values = measure_gene(runner, setup.inventory, setup.quantizer, gene, ["f16", "q8_0", "q4_1"], {},
                          Screening(None, 0.15))
    assert values == {"f16": SKIP_VALUES["zero"], "q8_0": SKIP_VALUES["zero"], "q4_1": 0.0}


# -- ETA and progress -------------------------------------------------------------------------------

def test_cell_work_weighs_the_tail_and_eta_follows_work():
    assert cell_work(0, 30, 8.0) == 38.0 and cell_work(29, 30, 8.0) == 9.0
    assert cell_work(-1, 30, 8.0) == 38.0 and cell_work(30, 30, 8.0) == 8.0
    # 10 s for the first half of the work: 10 s left, however many cells that was
    assert eta_seconds(10.0, 50.0, 100.0) == pytest.approx(10.0)
    assert eta_seconds(0.0, 0.0, 100.0) is None


def test_profile_events_carry_work_and_a_weighted_eta(tiny_loaded):
    from conftest import rtn_settings

    events = []
    run_profile(prepare(rtn_settings("2,4", "linear"), tiny_loaded), progress=events.append)
    entries = [e for e in events if e.kind == "entry"]
    work = [e.work_done for e in entries]
    assert work == sorted(work) and work[-1] == pytest.approx(entries[-1].work_total)
    # an early block's cell is worth more work than a late one's
    first, last = entries[0], entries[-1]
    assert work[0] > work[-1] - work[-2] > 0 and first.gene_index < last.gene_index
    assert all(e.eta_seconds is not None and e.eta_seconds >= 0 for e in entries if e.work_seconds > 0)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_in_a_pipe_prints_a_line_per_interval_with_a_ticking_clock():
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar("profiling", stream=stream, interval=30.0, clock=clock)
    bar.update(3, 10, "layers.0.mlp.up_proj@q4_0", eta=120.0)
    bar.tick()
    assert stream.getvalue() == ""  # not yet 30 s
    clock.now += 31
    bar.tick()
    clock.now += 10
    bar.tick()  # 10 s later: no second line yet
    clock.now += 25
    bar.tick()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("profiling: 3/10 (30%), elapsed 31s ETA 1m29s")
    assert "elapsed 1m06s ETA 54s" in lines[1]  # elapsed ticks and the ETA counts down with no new event
    assert "\r" not in stream.getvalue()


def test_progress_ticker_thread_writes_to_a_pipe_without_events():
    stream = io.StringIO()
    bar = ProgressBar("evaluating", stream=stream, interval=0.05)
    bar.update(1, 4, "dense", eta=None)
    deadline = time.monotonic() + 10
    while "evaluating: 1/4" not in stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.02)
    bar.close()
    assert "evaluating: 1/4 (25%), elapsed" in stream.getvalue()
    n = len(stream.getvalue())
    bar.update(2, 4)
    bar.close()
    assert len(stream.getvalue()) == n  # closed: silent


def test_empas_profile_in_a_pipe_prints_progress_lines(tiny_model_dir, tmp_path):
    env = {**os.environ, "EMPAS_PROGRESS_INTERVAL": "0.05", "OMP_NUM_THREADS": "1", "EMPAS_STORAGE": f"sqlite:///{tmp_path / 'e.db'}"}
    proc = subprocess.run([sys.executable, "-m", "empas_tui", "profile", "--model", str(tiny_model_dir),
                           "--quantizer", "rtn", "--bits", "2,4,16", "--granularity", "linear",
                           "--calib-tokens", "256", "--seq-len", "64"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("profiling: ")]
    assert lines and all(" elapsed " in ln for ln in lines), proc.stderr
    assert "\r" not in proc.stderr
    assert "(fast mode)" in proc.stdout


def test_empas_evaluate_in_a_pipe_prints_progress_lines(tiny_model_dir):
    env = {**os.environ, "EMPAS_PROGRESS_INTERVAL": "0.05", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "empas_tui", "evaluate", "--baselines", "--model", str(tiny_model_dir),
                           "--heldout-tokens", "256", "--seq-len", "64"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("evaluating: ")]
    assert lines and all(" elapsed " in ln for ln in lines), proc.stderr
