"""Pilot-driven tests of the TUI on the tiny random Llama: studies, setup checks, profiling, help, log."""

from __future__ import annotations

import logging
import threading

import pytest
from textual.widgets import DataTable, Input, Label

from empas_tui.app import EmpasApp, RingHandler, route_library_logging
from tui_helpers import SMALL, assert_fits, fill_setup, profile_small, screen_name, wait_for


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from threads, and on a busy shared CPU OpenMP's spinning makes a
    0.3 s profile take 5 s; restore the setting for the other tests."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_app(tmp_path, tiny_loaded):
    def factory(loader=None, **kw):
        return EmpasApp(storage=str(tmp_path / "tui.db"), loader=loader or (lambda spec: tiny_loaded), **kw)

    return factory


async def test_starts_on_empty_studies_and_opens_setup(make_app):
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        assert screen_name(app) == "StudiesScreen"
        await wait_for(pilot, lambda: "Nothing here yet" in str(app.screen.query_one("#studies-hint", Label).render()),
                       "the empty-storage hint")
        await pilot.press("n")
        await wait_for(pilot, lambda: screen_name(app) == "SetupScreen", "the setup screen")
        await pilot.press("escape")
        assert screen_name(app) == "StudiesScreen"


async def test_setup_checks_fields_inline_and_refuses_to_start(make_app, tmp_path):
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("n")
        await wait_for(pilot, lambda: screen_name(app) == "SetupScreen", "the setup screen")
        screen = app.screen
        await fill_setup(pilot, {"bits": "2,9,16", "seq_len": "abc", "text_file": str(tmp_path / "missing.txt"),
                                 "population": "1"})
        errors = {name: str(screen.query_one(f"#{name}-error", Label).render())
                  for name in ("bits", "seq_len", "text_file", "population")}
        assert "9" in errors["bits"] and "2 to 8" in errors["bits"]
        assert "whole number" in errors["seq_len"]
        assert "missing.txt" in errors["text_file"] and "not a file" in errors["text_file"]
        assert "between 4" in errors["population"]
        assert screen.query_one("#bits", Input).has_class("-invalid")
        await pilot.press("ctrl+s")
        assert screen_name(app) == "SetupScreen"  # nothing started
        # fixing every field clears the messages and starts profiling
        await fill_setup(pilot, SMALL | {"text_file": ""})
        assert not any(str(screen.query_one(f"#{n}-error", Label).render()) for n in errors)
        assert screen.collect() is not None
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: screen_name(app) == "ProfileScreen", "the profile screen")


async def test_too_short_text_fails_in_one_line_on_the_profile_screen(make_app, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here\n")
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("n")
        await wait_for(pilot, lambda: screen_name(app) == "SetupScreen", "the setup screen")
        await fill_setup(pilot, SMALL | {"text_file": str(short)})
        await pilot.press("ctrl+s")  # the file exists and is text: only tokenising can tell it is short
        await wait_for(pilot, lambda: screen_name(app) == "ProfileScreen", "the profile screen")
        screen = app.screen
        await wait_for(pilot, lambda: screen.state == "failed", "the failure")
        assert "short.txt" in screen.status and "tokens" in screen.status and "\n" not in screen.status
        assert screen.check_action("restart", ()) is True


async def test_profile_fills_table_live_then_reuses_the_cache(make_app):
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await profile_small(pilot)
        screen = app.screen
        table = screen.query_one("#sensitivity", DataTable)
        n_genes = len(screen.genes)
        assert n_genes == 3 and table.row_count == n_genes
        assert [str(c) for c in table.columns.values()][0]  # columns exist
        # every gene measured at every non-16 width, all positive KL values shown
        for i in range(n_genes):
            for b in (2, 4):
                assert screen.values[(i, b)] > 0
        row = table.get_row_at(0)
        assert float(str(row[-1])) > 0
        assert screen.profile.reused_entries == 0
        assert_fits(screen, ("#overall", "#genes-bar", "#profile-status", "#sensitivity"), (80, 24))
        # sorting by the most damaging width puts the biggest S first
        for _ in range(3):  # layer order -> name -> params -> S@2
            await pilot.press("o")
        assert screen.sort_label() == "S@2"
        top = float(str(table.get_row_at(0)[4]))
        assert top == pytest.approx(max(screen.values[(i, 2)] for i in range(n_genes)), rel=1e-3)
        # back to setup and again: everything comes from the cache
        await pilot.press("escape")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: screen_name(app) == "ProfileScreen" and app.screen is not screen,
                       "a second profile screen")
        await wait_for(pilot, lambda: app.screen.state == "done", "the cached profile")
        assert app.screen.profile.reused_entries == 3 * 3
        assert "reused" in app.screen.status


async def test_profile_cancel_then_resume(make_app, tiny_loaded):
    release = threading.Event()

    def slow_loader(spec):
        release.wait(30)  # hold the worker in "loading" until the test has pressed cancel
        return tiny_loaded

    app = make_app(loader=slow_loader)
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.press("n")
        await wait_for(pilot, lambda: screen_name(app) == "SetupScreen", "the setup screen")
        await fill_setup(pilot, SMALL)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: screen_name(app) == "ProfileScreen", "the profile screen")
        screen = app.screen
        assert screen.check_action("cancel", ()) is True
        await pilot.press("c")
        assert screen.state == "cancelling"
        release.set()
        await wait_for(pilot, lambda: screen.state == "cancelled", "the cancel")
        assert "resume" in screen.status
        await pilot.press("r")
        await wait_for(pilot, lambda: screen.state == "done", "the resumed profile")
        assert screen.query_one("#sensitivity", DataTable).row_count == 3
        assert_fits(screen, ("#overall", "#genes-bar", "#profile-status", "#sensitivity"), (200, 50))


async def test_studies_screen_lists_cached_profiles_and_prefills_setup(make_app):
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await profile_small(pilot, granularity="block")
        await pilot.press("escape")  # profile -> setup
        await pilot.press("escape")  # setup -> studies
        assert screen_name(app) == "StudiesScreen"
        await wait_for(pilot, lambda: app.screen.query_one("#profiles", DataTable).row_count == 1, "the profile row")
        row = app.screen.query_one("#profiles", DataTable).get_row_at(0)
        assert row[0] == "tiny-llama" and row[3] == "9"
        app.screen.query_one("#profiles", DataTable).focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen_name(app) == "SetupScreen", "the prefilled setup")
        assert app.screen.query_one("#calib_tokens", Input).value == "64"
        assert app.screen.query_one("#group_size", Input).value == "32"


async def test_help_log_and_command_palette(make_app):
    ring = RingHandler()
    app = make_app(ring=ring)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("question_mark")
        assert screen_name(app) == "HelpScreen"
        await pilot.press("escape")
        assert screen_name(app) == "StudiesScreen"
        # library logging goes to the log panel, never to a stream on the terminal
        import optuna

        logging.getLogger("optuna").warning("a message from optuna")
        for name in ("optuna", ""):  # (pytest adds its own capturing handlers; those are not streams)
            assert not any(type(h) is logging.StreamHandler for h in logging.getLogger(name).handlers)
        assert logging.getLogger("optuna").propagate
        await pilot.press("l")
        assert screen_name(app) == "LogScreen"
        assert any("a message from optuna" in line for line in ring.lines)
        await pilot.press("escape")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for title in ("New study", "Studies", "Dashboard", "Log", "Help", "Theme", "Refresh studies"):
            assert title in titles
        await pilot.press("ctrl+p")
        assert screen_name(app) == "CommandPalette"
        await pilot.press("escape")


def test_route_library_logging_removes_stderr_handlers():
    import optuna

    root = logging.getLogger()
    stray = logging.StreamHandler()
    root.addHandler(stray)
    try:
        route_library_logging(RingHandler())
        assert stray not in root.handlers
        assert optuna.logging._default_handler is None or optuna.logging._default_handler not in \
            logging.getLogger("optuna").handlers
    finally:
        root.removeHandler(stray)
