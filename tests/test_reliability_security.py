"""Security checks: servers bind 127.0.0.1 unless told otherwise; storage passwords never printed."""

from __future__ import annotations

import signal

import pytest

from cli_helpers import empas_process, run_cli, seed_synthetic_study
from empas_tui.cli.entry import build_parser

SECRET = "S3cretPw_xyz"


def test_dashboard_binds_loopback(tmp_path):
    from search.dashboard import start_dashboard

    server = start_dashboard(f"sqlite:///{tmp_path / 'd.db'}", 0, background=True)
    try:
        assert server.server.server_address[0] == "127.0.0.1"
        assert server.url.startswith("http://127.0.0.1:")
    finally:
        server.shutdown()
        server.server.server_close()
    args = build_parser().parse_args(["dashboard"])
    assert not hasattr(args, "host")  # no option to widen it


def test_serve_binds_loopback_by_default():
    import inspect

    from profiling.deploy.serve import make_server

    assert build_parser().parse_args(["serve", "ckpt"]).host == "127.0.0.1"
    assert inspect.signature(make_server).parameters["host"].default == "127.0.0.1"


UNREACHABLE = f"postgresql+psycopg://empas:{SECRET}@127.0.0.1:1/empas"


@pytest.mark.parametrize("argv", [
    ["search", "--study", "s"],
    ["search"],
    ["studies"],
    ["front", "--study", "s"],
    ["dashboard", "--port", "0"],
    ["profile", "--model", "/nonexistent/model"],
])
def test_password_not_printed_when_the_database_is_down(capsys, argv):
    code, out, err = run_cli(capsys, *argv, "--storage", UNREACHABLE)
    assert code == 2 and err.startswith("empas: error: ") and err.count("\n") == 1, err
    assert SECRET not in out + err
    assert "***" in err  # the URL is named, redacted


def test_password_not_printed_from_environment(capsys, monkeypatch):
    monkeypatch.setenv("EMPAS_STORAGE", UNREACHABLE)
    code, out, err = run_cli(capsys, "studies")
    assert code == 2 and SECRET not in out + err


def _with_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(password=SECRET).render_as_string(hide_password=False)


def test_password_not_printed_on_success(storage_url, capsys):
    """A reachable database with a password in the URL (the test server trusts local connections and
    ignores it): every command's normal output names the storage without the password."""
    if not storage_url.startswith("postgresql"):
        pytest.skip("SQLite URLs have no password")
    url = _with_password(storage_url)
    seed_synthetic_study(url)
    for argv in (["search", "--study", "s", "--trials", "8"], ["search", "--study", "s", "--trials", "8", "--json"],
                 ["studies"], ["studies", "--json"], ["front", "--study", "s"], ["front", "--study", "s", "--json"],
                 ["front", "--study", "nope"], ["search", "--study", "s", "--population", "3"]):
        code, out, err = run_cli(capsys, *argv, "--storage", url)
        assert code in (0, 2), err
        assert SECRET not in out + err, argv
    # the dashboard's start-up lines
    proc = empas_process("dashboard", "--storage", url, "--port", "0")  # a real process: stopped by SIGINT
    try:
        first = proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert "optuna-dashboard for" in first and "127.0.0.1" in first
    assert SECRET not in first + out + err
