"""Shared helpers of the Pilot-driven TUI tests (a module, not fixtures, so both test files can use them)."""

from __future__ import annotations

import time

# A small RTN run on the tiny random Llama: 3 block genes x (2, 4, 16), two generations of 8.
SMALL = {"quantizer": "rtn", "granularity": "block", "qtypes": "2,4,16", "group_size": "32", "calib_tokens": "64", "heldout_tokens": "64",
         "seq_len": "32", "population": "8", "trials": "16"}


async def wait_for(pilot, condition, what: str, limit: float = 60.0) -> None:
    """Let the app run until ``condition()`` holds. ``limit`` only guards against a hang; no test
    asserts on how long anything took."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await pilot.pause(0.05)


def screen_name(app) -> str:
    return type(app.screen).__name__


async def fill_setup(pilot, values: dict[str, str]) -> None:
    from textual.widgets import Input, Select

    screen = pilot.app.screen
    for name, value in values.items():
        widget = screen.query_one(f"#{name}")
        assert isinstance(widget, (Input, Select)), name
        widget.value = value
        await pilot.pause()  # a select's change (the quantiser) is handled before the next field


async def open_setup(pilot) -> None:
    await pilot.press("n")
    await wait_for(pilot, lambda: screen_name(pilot.app) == "SetupScreen", "the setup screen")


async def profile_small(pilot, **overrides) -> None:
    """Studies -> n -> setup with a small configuration -> ctrl+s -> wait for the profile to finish."""
    await open_setup(pilot)
    await fill_setup(pilot, {**SMALL, **overrides})
    await pilot.press("ctrl+s")
    await wait_for(pilot, lambda: screen_name(pilot.app) == "ProfileScreen", "the profile screen")
    await wait_for(pilot, lambda: pilot.app.screen.state in ("done", "failed", "cancelled"), "the profile")
    assert pilot.app.screen.state == "done", pilot.app.screen.status


def assert_fits(screen, selectors, size) -> None:
    """Each widget is laid out with a non-empty region inside the terminal."""
    for sel in selectors:
        region = screen.query_one(sel).region
        assert region.width > 0 and region.height > 0, sel
        assert region.right <= size[0] and region.bottom <= size[1], sel


def shown_text(widget) -> str:
    """What a label shows, as plain text (markup removed)."""
    from rich.text import Text

    content = widget.render()
    return content.plain if isinstance(content, Text) else str(content)


def assert_wrapped(label, size) -> None:
    """A label's whole text is on screen: inside the terminal, with room for every character (a
    one-line label cut at the edge fails: "HV rati")."""
    text = shown_text(label)
    region = label.content_region
    assert label.region.right <= size[0] and label.region.bottom <= size[1], label.id
    assert region.width * region.height >= len(text.replace("\n", "")), (label.id, text, region)


_EMPTY_STORAGE: dict[str, bytes] = {}


def empty_storage(folder) -> str:
    """A new, empty EMPAS storage (SQLite with Optuna's schema) in ``folder``.

    Creating Optuna's tables takes ~1.5 s on this machine; the schema is created once per session and
    each test gets a byte copy of that empty database (a real SQLite file, nothing shared)."""
    from pathlib import Path

    if "db" not in _EMPTY_STORAGE:
        import tempfile

        from storage.database import open_database

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "empty.db"
            db = open_database(str(path))
            db.profiles  # noqa: B018 - creates EMPAS's profile tables too
            db.close()
            _EMPTY_STORAGE["db"] = path.read_bytes()
    target = Path(folder) / "tui.db"
    target.write_bytes(_EMPTY_STORAGE["db"])
    return str(target)
