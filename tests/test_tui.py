"""Pilot-driven tests of the TUI on the tiny random Llama: studies, setup (defaults, checks),
profiling (live table, cache reuse, cancel/resume, ggml types per gene), help, log, and the structure
of the package (screens never import each other, every message in one module)."""

from __future__ import annotations

import ast
import logging
import threading
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input, Label, Select

from empas_tui.tui.app import EmpasApp
from empas_tui.tui.logs import RingHandler, route_library_logging
from tui_helpers import (SMALL, assert_fits, assert_wrapped, empty_storage, fill_setup, open_setup, profile_small,
                         screen_name, shown_text, wait_for)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

TUI = Path(__file__).resolve().parent.parent / "empas_tui" / "tui"



@pytest.fixture
def make_app(tmp_path, tiny_loaded):
    def factory(loader=None, **kw):
        return EmpasApp(storage=storage, loader=loader or (lambda spec: tiny_loaded), **kw)

    storage = empty_storage(tmp_path)

    return factory


# -- structure ---------------------------------------------------------------------------------------

def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = "empas_tui." + ".".join(path.relative_to(TUI.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out |= {f"{module}.{a.name}" for a in node.names}
    return out


def test_no_screen_imports_another_screen():
    screens = sorted((TUI / "screens").glob("*.py"))
    names = {f"empas_tui.tui.screens.{p.stem}" for p in screens if p.stem != "__init__"}
    assert len(names) >= 8
    for path in screens:
        others = (_imports(path) & names) - {f"empas_tui.tui.screens.{path.stem}"}
        assert not others, f"{path.name} imports {sorted(others)}: navigate through the app instead"


def test_every_message_class_lives_in_messages():
    for path in TUI.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if "Message" in bases:
                    assert path.name == "messages.py", f"{path.name} defines message {node.name}"


# -- setup -------------------------------------------------------------------------------------------

def _cli_defaults():
    from empas_tui.cli.entry import build_parser
    from empas_tui.cli.options import profile_settings
    from empas_tui.cli.search import _settings

    args = build_parser().parse_args(["search"])
    return profile_settings(args), _settings(args)


def test_setup_defaults_are_the_clis(monkeypatch):
    from empas_tui.tui.config import form_values, parse_form
    from profiling import settings as ps

    for quantizer in (ps.DEFAULT_QUANTIZER, *(q for q in ps.QUANTIZER_NAMES if q != ps.DEFAULT_QUANTIZER)):
        # the lead switches the default quantiser in the settings module: both clients must follow
        monkeypatch.setattr(ps, "DEFAULT_QUANTIZER", quantizer)
        cli_profile, cli_search = _cli_defaults()
        cfg, errors = parse_form(form_values() | {"study": "s"})
        assert errors == {}
        assert cfg.profile == cli_profile and cfg.profile.quantizer.name == quantizer
        cli_search.study_name = "s"
        assert cfg.search == cli_search
        assert cfg.search.resolved(None, "s") == cli_search.resolved(None, "s")


async def test_setup_defaults_quantiser_switch_and_inline_checks(make_app, tmp_path):
    from empas_tui.tui.config import default_qtypes_text, form_values
    from profiling.settings import ProfileSettings, QuantizerSettings
    from search.settings import SearchSettings

    def message(fn) -> str:
        with pytest.raises(ValueError) as info:
            fn()
        return str(info.value)

    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await open_setup(pilot)
        screen = app.screen
        # the form starts at the settings modules' defaults, valid as they stand
        expected = form_values()
        for name, text in expected.items():
            if name != "study":
                assert str(screen.query_one(f"#{name}").value) == text, name
        await wait_for(pilot, lambda: screen.query_one("#study", Input).value, "the suggested study name")
        assert screen.refresh_checks() is not None
        assert_wrapped(screen.query_one("#setup-summary", Label), (80, 24))
        # switching the quantiser offers its own types and fields
        for name in ("ggml", "rtn"):
            await fill_setup(pilot, {"quantizer": name})
            assert screen.query_one("#qtypes", Input).value == default_qtypes_text(name)
            assert screen.query_one("#group_size-row").display == (name == "rtn")
            assert screen.query_one("#imatrix-row").display == (name == "ggml")
        # types the user typed survive a switch of quantiser (and are then checked against it)
        await fill_setup(pilot, {"qtypes": "2,3,16", "quantizer": "ggml"})
        assert screen.query_one("#qtypes", Input).value == "2,3,16"
        assert "unknown ggml type" in shown_text(screen.query_one("#qtypes-error"))
        # every message is the settings validators' own, whole at 80 columns
        missing = str(tmp_path / "missing.txt")
        await fill_setup(pilot, {"quantizer": "rtn", "qtypes": "2,9,16", "seq_len": "abc", "text_file": missing,
                                 "population": "1", "include_embeddings": "yes"})
        errors = {n: shown_text(screen.query_one(f"#{n}-error"))
                  for n in ("qtypes", "seq_len", "text_file", "population", "include_embeddings")}
        assert errors["qtypes"] == message(lambda: QuantizerSettings.parse("rtn", "2,9,16"))
        assert errors["seq_len"] == message(lambda: ProfileSettings(seq_len="abc").validate())
        assert errors["text_file"] == message(lambda: ProfileSettings(text_file=missing).validate())
        assert errors["population"] == message(lambda: SearchSettings(population=1).validate())
        assert "ggml" in errors["include_embeddings"]
        assert screen.query_one("#qtypes", Input).has_class("-invalid")
        for name in errors:  # wrapped rather than cut
            label = screen.query_one(f"#{name}-error")
            screen.query_one("#setup-form").scroll_to_widget(label, animate=False)
            await pilot.pause()
            assert_wrapped(label, (80, 24))
        await pilot.press("ctrl+s")
        assert screen_name(app) == "SetupScreen"  # nothing started
        # fixing every field clears the messages and starts profiling
        await fill_setup(pilot, SMALL | {"text_file": "", "include_embeddings": "auto"})
        assert not any(shown_text(screen.query_one(f"#{n}-error")) for n in errors)
        assert screen.refresh_checks() is not None
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: screen_name(app) == "ProfileScreen", "the profile screen")


async def test_too_short_text_fails_in_one_line_on_the_profile_screen(make_app, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here\n")
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await open_setup(pilot)
        await fill_setup(pilot, SMALL | {"text_file": str(short)})
        await pilot.press("ctrl+s")  # the file exists and is text: only tokenising can tell it is short
        await wait_for(pilot, lambda: screen_name(app) == "ProfileScreen", "the profile screen")
        screen = app.screen
        await wait_for(pilot, lambda: screen.state == "failed", "the failure")
        assert "short.txt" in screen.status and "tokens" in screen.status and "\n" not in screen.status
        assert screen.check_action("restart", ()) is True
        assert_wrapped(screen.query_one("#profile-status"), (80, 24))


# -- profile -----------------------------------------------------------------------------------------

async def test_profile_fills_table_live_then_a_cached_profile_from_the_list(make_app):
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await profile_small(pilot)
        screen = app.screen
        table = screen.query_one("#sensitivity", DataTable)
        assert len(screen.genes) == 3 and table.row_count == 3
        assert [str(c.label) for c in table.columns.values()][4:] == ["S@2", "S@4"]
        for i in range(3):  # every gene measured at every quantised type, all positive KL values
            for q in ("2", "4"):
                assert screen.values[(i, q)] > 0
        assert float(str(table.get_row_at(0)[-1])) > 0
        assert screen.profile.reused_entries == 0 and "took" in screen.status
        assert_fits(screen, ("#overall", "#genes-bar", "#profile-status", "#sensitivity"), (80, 24))
        for label in ("#profile-title", "#profile-status"):
            assert_wrapped(screen.query_one(label), (80, 24))
        # sorting by the most damaging type puts the biggest S first
        for _ in range(3):  # layer order -> name -> params -> S@2
            await pilot.press("o")
        assert screen.sort_label() == "S@2"
        top = float(str(table.get_row_at(0)[4]))
        assert top == pytest.approx(max(screen.values[(i, "2")] for i in range(3)), rel=1e-3)
        # the studies screen lists the cached profile; a new study from it reuses every cell, and the
        # time shown is the time the measurements took, not this run's fraction of a second
        await pilot.press("escape")  # profile -> setup
        await pilot.press("escape")  # setup -> studies
        assert screen_name(app) == "StudiesScreen"
        profiles = app.screen.query_one("#profiles", DataTable)
        await wait_for(pilot, lambda: profiles.row_count == 1, "the profile row")
        row = profiles.get_row_at(0)
        assert row[0] == "tiny-llama" and row[2] == "rtn" and row[4] == "9"
        profiles.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen_name(app) == "SetupScreen", "the prefilled setup")
        setup = app.screen
        for name, value in (("calib_tokens", "64"), ("seq_len", "32"), ("group_size", "32"), ("quantizer", "rtn"),
                            ("qtypes", "2,4,16")):
            assert str(setup.query_one(f"#{name}").value) == value, name
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: screen_name(app) == "ProfileScreen" and app.screen is not screen,
                       "a second profile screen")
        again = app.screen
        await wait_for(pilot, lambda: again.state == "done", "the cached profile")
        assert again.profile.reused_entries == 3 * 3
        assert "measured earlier in" in again.status and "took 0" not in again.status
        assert again.profile.measured_seconds > 0


async def test_profile_cancel_then_resume(make_app, tiny_loaded):
    release = threading.Event()

    def slow_loader(spec):
        release.wait(30)  # hold the worker in "loading" until the test has pressed cancel
        return tiny_loaded

    app = make_app(loader=slow_loader)
    async with app.run_test(size=(200, 50)) as pilot:
        await open_setup(pilot)
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


def _ggml_available() -> bool:
    try:
        from profiling.quantizers.ggml import GgmlQuantizer  # noqa: F401
        from profiling.settings import QuantizerSettings
        from profiling.quantizers import make_quantizer

        make_quantizer(QuantizerSettings.parse("ggml", "q8_0,f16"))
    except Exception:  # noqa: BLE001 - no libggml-base here
        return False
    return True


@pytest.mark.skipif(not _ggml_available(), reason="llama.cpp's libggml-base (llama-cpp-python) is not installed")
async def test_ggml_profile_offers_each_gene_the_types_that_fit(make_app):
    """The tiny Llama's rows are 96 and 160 wide: Q8_0/Q4_0 (blocks of 32) fit every gene, Q4_K (256)
    none; with ggml the embedding is a gene too."""
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await profile_small(pilot, quantizer="ggml", qtypes="q8_0,q4_0,q4_k,f16", trials="")
        screen = app.screen
        assert sorted(screen.qtypes) == ["f16", "q4_0", "q4_k", "q8_0"] and "embed_tokens" in screen.genes
        table = screen.query_one("#sensitivity", DataTable)
        col = [str(c.label) for c in table.columns.values()].index("S@q4_k")
        assert all(str(table.get_row_at(r)[col]) == "-" for r in range(table.row_count))
        assert all(screen.values[(i, "q4_0")] > 0 for i in range(len(screen.genes)))
        assert not screen.profile.valid[:, screen.profile.qtypes.index("q4_k")].any()


async def test_empty_studies_help_log_and_command_palette(make_app):
    ring = RingHandler()
    app = make_app(ring=ring)
    async with app.run_test(size=(80, 24)) as pilot:
        assert screen_name(app) == "StudiesScreen"
        await wait_for(pilot, lambda: "Nothing here yet" in shown_text(app.screen.query_one("#studies-hint")),
                       "the empty-storage hint")
        await open_setup(pilot)
        await pilot.press("escape")
        assert screen_name(app) == "StudiesScreen"
        await pilot.press("question_mark")
        assert screen_name(app) == "HelpScreen"
        await pilot.press("escape")
        assert screen_name(app) == "StudiesScreen"
        # library logging goes to the log panel, never to a stream on the terminal
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


def test_status_parts_drop_least_important_first():
    from empas_tui.tui.format import fit_parts

    parts = [(0, "[b]study[/]"), (0, "running"), (4, "123 trials/s"), (1, "HV ratio 0.9876"), (0, "front 37")]
    assert fit_parts(parts, 200) == "[b]study[/]  running  123 trials/s  HV ratio 0.9876  front 37"
    assert fit_parts(parts, 45) == "[b]study[/]  running  HV ratio 0.9876  front 37"
    assert fit_parts(parts, 10) == "[b]study[/]"  # the first, most important part always stays
