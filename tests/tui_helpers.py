"""Shared helpers of the Pilot-driven TUI tests (a module, not fixtures, so both test files can use them)."""

from __future__ import annotations

import time

SMALL = {"calib_tokens": "64", "heldout_tokens": "64", "seq_len": "32", "group_size": "32", "bits": "2,4,16",
         "population": "8", "generations": "2"}


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
    await pilot.pause()


async def profile_small(pilot, **overrides) -> None:
    """Studies -> n -> setup with a small configuration -> ctrl+s -> wait for the profile to finish."""
    await pilot.press("n")
    await wait_for(pilot, lambda: screen_name(pilot.app) == "SetupScreen", "the setup screen")
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
