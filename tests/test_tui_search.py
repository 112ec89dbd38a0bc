"""Pilot-driven tests of the search, archetypes and dashboard screens on the tiny random Llama:
profile -> short search -> select a front point -> measure -> export, one front count everywhere,
budgets and skipped archetypes, quitting mid-search and resuming, measured mode, deleting."""

from __future__ import annotations

import io
import json
import math
import urllib.request
from contextlib import redirect_stdout

import pytest
from textual.widgets import DataTable, Input

from empas_tui.tui.app import EmpasApp
from tui_helpers import assert_fits, assert_wrapped, empty_storage, profile_small, screen_name, shown_text, wait_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

MIB = 1024 * 1024



@pytest.fixture
def db(tmp_path):
    return empty_storage(tmp_path)


@pytest.fixture
def sharp_loaded():
    """The tiny Llama with its block weights x8 and embedding x4: a random init's near-uniform outputs
    barely notice quantisation; these do (all genes at 2 bits: PPL +78%, at 4 bits: +7%)."""
    import torch

    from conftest import TinyTokenizer, make_tiny_llama
    from profiling.models import LoadedModel

    model = make_tiny_llama()
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(8.0)
        model.model.embed_tokens.weight.mul_(4.0)
    return LoadedModel(model, TinyTokenizer(), model_id="sharp-tiny-llama", fingerprint="sharp" * 12 + "tiny",
                       source_path="")


def make_app(db, tiny_loaded):
    return EmpasApp(storage=db, loader=lambda spec: tiny_loaded)


def open_db(url):
    from storage.database import open_database

    return open_database(url, create=False)


def cli_json(*argv) -> object:
    """What an ``empas`` command prints with --json."""
    from empas_tui.cli.entry import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(list(argv)) == 0
    return json.loads(out.getvalue())


async def run_search_from_profile(pilot) -> object:
    await pilot.press("s")
    await wait_for(pilot, lambda: screen_name(pilot.app) == "SearchScreen", "the search screen")
    screen = pilot.app.screen
    await wait_for(pilot, lambda: screen.state in ("done", "paused", "failed"), "the search")
    assert screen.state == "done", screen.message
    await pilot.pause(0.3)  # one redraw tick
    return screen


async def open_archetypes(pilot):
    await pilot.press("a")
    await wait_for(pilot, lambda: screen_name(pilot.app) == "ArchetypesScreen" and pilot.app.screen.choices,
                   "the archetypes")
    return pilot.app.screen


async def test_profile_search_select_measure_export(db, tiny_loaded, tmp_path):
    from search.catalogue import load_front
    from storage.artifacts import load_artifact

    app = make_app(db, tiny_loaded)
    async with app.run_test(size=(80, 24)) as pilot:
        await profile_small(pilot, study="flow")
        screen = await run_search_from_profile(pilot)
        assert screen.trials_total == 16  # population 8, 16 trials
        front = screen.query_one("#front", DataTable)
        assert front.row_count == len(screen.points) > 1
        assert screen.exact_count > 0 and screen.hv_ratio is not None and 0 < screen.hv_ratio <= 1.0 + 1e-9
        assert screen.has_class("narrow")  # 80 columns: the per-layer table moves to its own screen
        assert_fits(screen, ("#pareto", "#front", "#strip", "#point-line"), (80, 24))
        stats = screen.query_one("#search-stats")
        assert_wrapped(stats, (80, 24))  # the status line fits: no "HV rati"
        assert f"front {len(screen.points)}" in shown_text(stats)
        # one front count everywhere: this screen, `empas front`, `empas studies`, the archetypes screen
        n_front = len(screen.points)
        assert len(load_front(open_db(db), "flow").points) == n_front
        assert len(cli_json("front", "--study", "flow", "--storage", db, "--json")["points"]) == n_front
        (listed,) = cli_json("studies", "--storage", db, "--json")
        assert listed["front_size"] == n_front
        # select the lowest-memory point with the keyboard: the strip shows its types
        await pilot.press("ctrl+home")
        await pilot.pause(0.3)
        first = screen.points[0]
        assert screen.selected_trial == first.trial_number
        assert screen.query_one("#strip").qtypes == list(first.qtypes)
        assert f"trial {first.trial_number}" in shown_text(screen.query_one("#point-line"))
        await pilot.press("enter")
        assert screen_name(app) == "PointScreen"
        layers = app.screen.query_one("#point-layers", DataTable)
        assert [str(layers.get_row_at(i)[3]).strip() for i in range(3)] == list(first.qtypes)
        await pilot.press("escape")
        # archetypes: chosen on the same front, measured with baselines, exported into a folder
        arch = await open_archetypes(pilot)
        assert [c.archetype for c in arch.choices] + list(arch.skipped) == ["max-accuracy", "balanced",
                                                                            "max-compression"]
        assert len(arch.front.points) == n_front
        assert str(n_front) in shown_text(arch.query_one("#arch-info"))
        await pilot.press("m")
        await wait_for(pilot, lambda: not arch.busy, "the held-out measurements")
        assert arch.validation is not None, shown_text(arch.query_one("#measure-status"))
        names = [r.name for r in arch.baselines.rows]
        assert names[:2] == ["dense", "uniform-8"] and "q4_k_m-mix" in names
        assert arch.query_one("#baselines", DataTable).row_count == len(names)
        table = arch.query_one("#arch-table", DataTable)
        assert str(table.get_row_at(0)[5]) != "-"  # measured PPL shown next to the prediction
        await pilot.pause()
        for label in ("#arch-info", "#measure-status"):
            assert_wrapped(arch.query_one(label), (80, 24))
        target = tmp_path / "exported"
        await pilot.press("e")
        assert screen_name(app) == "FolderPrompt"
        app.screen.query_one(Input).value = str(target)
        await pilot.press("enter")
        await wait_for(pilot, lambda: not arch.busy and arch.written, "the export")
        written = sorted(p.name for p in target.iterdir())
        assert written == sorted([f"{c.archetype}.json" for c in arch.choices] + ["validation.csv", "validation.md"])
        for c in arch.choices:
            artifact = load_artifact(target / f"{c.archetype}.json")
            point = arch.point_of(c)
            assert list(artifact.genes.values()) == list(point.qtypes)
            assert artifact.source["study"] == "flow" and artifact.source["trial"] == point.trial_number
            assert "heldout" in artifact.metrics["measured"]
            assert artifact.metrics["predicted"]["memory_bytes"] == point.memory_bytes


async def test_archetype_budgets_skip_and_refuse(db, sharp_loaded, tmp_path):
    from search.archetypes import DEFAULT_PPL_RISE_CAP

    app = make_app(db, sharp_loaded)
    async with app.run_test(size=(80, 24)) as pilot:
        await profile_small(pilot, study="budget")
        await run_search_from_profile(pilot)
        arch = await open_archetypes(pilot)
        points = sorted(arch.front.points, key=lambda p: p.memory_bytes)
        base = arch.front.profile.base_loss
        within_cap = [math.expm1(p.predicted_loss - base) <= DEFAULT_PPL_RISE_CAP for p in points]
        # a memory budget under which every point ruins the model beyond max-compression's cap
        assert not within_cap[0] and any(within_cap)
        tight = points[within_cap.index(True) - 1].memory_bytes
        await pilot.press("b")
        assert screen_name(app) == "BudgetPrompt"
        app.screen.query_one("#max-mib", Input).value = f"{tight / MIB:.9f}"
        await pilot.press("enter", "enter")
        await wait_for(pilot, lambda: arch.settings.max_mib is not None, "the re-chosen archetypes")
        assert list(arch.skipped) == ["max-compression"]
        assert [c.archetype for c in arch.choices] == ["max-accuracy", "balanced"]
        assert all(arch.point_of(c).memory_bytes <= tight for c in arch.choices)
        assert "max-compression skipped" in shown_text(arch.query_one("#arch-skipped"))
        assert "Budget: memory" in shown_text(arch.query_one("#arch-info"))
        # an impossible budget is refused in one line and changes nothing
        before = [c.index for c in arch.choices]
        await pilot.press("b")
        app.screen.query_one("#max-mib", Input).value = f"{points[0].memory_bytes / 2 / MIB:.6f}"
        await pilot.press("enter", "enter")
        await pilot.pause(0.5)
        assert [c.index for c in arch.choices] == before and arch.settings.max_mib == pytest.approx(tight / MIB)
        # a budget the export settings refuse stays in the prompt with their message
        await pilot.press("b")
        prompt = app.screen
        prompt.query_one("#max-mib", Input).value = "0"
        await pilot.press("enter", "enter")
        assert screen_name(app) == "BudgetPrompt" and "--max-mib" in shown_text(prompt.query_one("#budget-error"))
        await pilot.press("escape")
        # the export (skipped archetype left out) refuses a file as its folder, inline, writing nothing
        (tmp_path / "a-file").write_text("x")
        await pilot.press("e")
        prompt = app.screen
        prompt.query_one(Input).value = str(tmp_path / "a-file")
        await pilot.press("enter")
        assert screen_name(app) == "FolderPrompt" and "is a file" in shown_text(prompt.query_one("#path-error"))
        prompt.query_one(Input).value = str(tmp_path / "out")
        await pilot.press("enter")
        await wait_for(pilot, lambda: not arch.busy and arch.written, "the export")
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["balanced.json", "max-accuracy.json"]
        assert "max-compression skipped" in shown_text(arch.query_one("#measure-status"))


async def test_pause_resume_quit_and_reopen(db, tiny_loaded):
    from search.catalogue import list_studies, load_front

    app = make_app(db, tiny_loaded)
    async with app.run_test(size=(200, 50)) as pilot:
        await profile_small(pilot, study="long", trials="800000")
        await pilot.press("s")
        await wait_for(pilot, lambda: screen_name(app) == "SearchScreen", "the search screen")
        screen = app.screen
        await wait_for(pilot, lambda: screen.trials_total >= 8, "a generation")
        await pilot.press("p")  # "pausing" until the generation in flight is written
        await wait_for(pilot, lambda: screen.state == "paused", "the pause")
        paused_at = screen.trials_total
        assert paused_at % 8 == 0
        await pilot.press("p")  # another batch (the setup's 800000 trials) on the stored settings
        await wait_for(pilot, lambda: screen.trials_total >= paused_at + 16, "two more generations")
        assert not screen.has_class("narrow") and screen.query_one("#layers", DataTable).display
        assert_fits(screen, ("#pareto", "#front", "#layers", "#strip"), (200, 50))
        assert_wrapped(screen.query_one("#search-stats"), (200, 50))
        assert "trials/s" in shown_text(screen.query_one("#search-stats"))  # room for everything at 200
    # the app is gone; the job returns at the next generation boundary
    assert screen.run_finished.wait(60)
    (entry,) = [s for s in list_studies(open_db(db)) if s["name"] == "long"]
    assert entry["trials_complete"] % 8 == 0 and not entry["trials_other"]  # whole generations, nothing RUNNING
    before = entry["trials_complete"]

    app = make_app(db, tiny_loaded)
    async with app.run_test(size=(80, 24)) as pilot:
        studies = app.screen
        await wait_for(pilot, lambda: studies.query_one("#studies", DataTable).row_count == 1, "the study row")
        row = studies.query_one("#studies", DataTable).get_row_at(0)
        assert row[0] == "long" and row[3].replace(",", "") == str(before) and row[4] == str(entry["front_size"])
        studies.query_one("#studies", DataTable).focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen_name(app) == "SearchScreen", "the search screen")
        screen = app.screen
        await wait_for(pilot, lambda: screen.state == "paused" and screen.points, "the stored front")
        assert screen.trials_total == before and len(screen.points) == entry["front_size"]
        screen.more_trials = 8
        await pilot.press("p")
        await wait_for(pilot, lambda: screen.state == "done", "the resumed generation")
    assert load_front(open_db(db), "long").trials_complete == before + 8


async def test_measured_search_then_delete_the_study(db, tiny_loaded):
    from search.catalogue import list_studies

    app = make_app(db, tiny_loaded)
    async with app.run_test(size=(80, 24)) as pilot:
        await profile_small(pilot, study="meas", evaluate="measured", population="4", trials="4")
        screen = await run_search_from_profile(pilot)
        assert screen.evaluate == "measured" and screen.trials_total == 4
        assert all(p.measured and p.measured["kl"] >= 0 for p in screen.points)
        assert "measured" in shown_text(screen.query_one("#search-stats"))
        for _ in range(3):  # search -> profile -> setup -> studies
            await pilot.press("escape")
        assert screen_name(app) == "StudiesScreen"
        studies = app.screen
        table = studies.query_one("#studies", DataTable)
        await wait_for(pilot, lambda: table.row_count == 1, "the study row")
        table.focus()
        await pilot.press("d")
        assert screen_name(app) == "ConfirmScreen"
        await pilot.press("n")  # no: nothing happens
        assert [s["name"] for s in list_studies(open_db(db))] == ["meas"]
        await pilot.press("d")
        await pilot.press("y")
        await wait_for(pilot, lambda: table.row_count == 0,
                       f"the deleted study to disappear ({[n.message for n in app._notifications]})")
    assert list_studies(open_db(db)) == []


async def test_dashboard_start_copy_stop(db, tiny_loaded):
    app = make_app(db, tiny_loaded)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("w")
        assert screen_name(app) == "DashboardScreen"
        await pilot.press("s")
        await wait_for(pilot, lambda: app.dashboard is not None, "the dashboard")
        url = app.dashboard.url
        assert url.startswith("http://127.0.0.1:")
        port = app.dashboard.port
        assert f"-L {port}:127.0.0.1:{port}" in shown_text(app.screen.query_one("#dash-ssh"))
        with urllib.request.urlopen(url.replace("/dashboard/", "/api/studies"), timeout=10) as r:
            assert r.status == 200 and isinstance(json.loads(r.read()), (dict, list))
        await pilot.press("c")
        assert app.clipboard == url
        await pilot.press("s")
        assert app.dashboard is None
