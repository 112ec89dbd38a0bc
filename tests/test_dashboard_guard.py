"""The dashboard answers only requests addressed to its loopback name and refuses cross-origin writes:
a DNS-rebinding page (Host: evil.example) cannot delete a study, a same-origin request still can."""

from __future__ import annotations

import http.client

import pytest

from search.catalogue import list_studies
from search.dashboard import host_name, start_dashboard
from search.nsga import run_search
from search.settings import SearchSettings
from search.synthetic import synthetic_profile
from storage.database import close_all, open_database


@pytest.fixture
def dashboard(tmp_path):
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    db = open_database(url)
    for name in ("keep", "other"):
        run_search(SearchSettings(study_name=name, population=8, trials=8),
                   synthetic_profile(blocks=2, granularity="block"), db)
    server = start_dashboard(url, 0, background=True)
    try:
        yield server, db
    finally:
        server.shutdown()
        close_all()


def request(port: int, method: str, path: str, headers: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def study_ids(db) -> dict[str, int]:
    return {s.study_name: s._study_id for s in db.optuna.get_all_studies()}


def test_rebinding_and_cross_origin_deletes_are_refused(dashboard):
    server, db = dashboard
    sid = study_ids(db)["keep"]
    port = server.port
    attacks = [
        {"Host": f"evil.example:{port}"},  # DNS rebinding: the page's own name, resolved to 127.0.0.1
        {"Host": "evil.example"},
        {"Host": f"127.0.0.1.evil.example:{port}"},
        {"Host": f"127.0.0.1:{port}", "Origin": "http://evil.example"},  # a cross-origin fetch / form
        {"Host": f"127.0.0.1:{port}", "Origin": "null"},
        {"Host": f"127.0.0.1:{port}", "Sec-Fetch-Site": "cross-site"},
        {"Host": f"localhost:{port}", "Origin": f"http://127.0.0.1:{port + 1}"},  # another local port
    ]
    for headers in attacks:
        status, body = request(port, "DELETE", f"/api/studies/{sid}", headers)
        assert status == 403, (headers, status, body)
    status, _ = request(port, "GET", f"/api/studies/{sid}?after=0", {"Host": f"evil.example:{port}"})
    assert status == 403  # nor can it read the studies
    assert {r["name"] for r in list_studies(db)} == {"keep", "other"}  # intact


def test_same_origin_requests_still_work(dashboard):
    server, db = dashboard
    ids = study_ids(db)
    port = server.port
    status, _ = request(port, "GET", f"/api/studies/{ids['keep']}?after=0", {"Host": f"127.0.0.1:{port}"})
    assert status == 200
    status, _ = request(port, "GET", "/dashboard/", {"Host": "localhost:9000"})  # through ssh -L 9000:...
    assert status == 200
    status, _ = request(port, "DELETE", f"/api/studies/{ids['other']}",
                        {"Host": f"127.0.0.1:{port}", "Origin": f"http://127.0.0.1:{port}",
                         "Sec-Fetch-Site": "same-origin"})
    assert status == 204
    assert {r["name"] for r in list_studies(db)} == {"keep"}  # the check lets the real delete through


def test_host_name():
    assert host_name("127.0.0.1:8080") == "127.0.0.1"
    assert host_name("[::1]:8080") == "[::1]"
    assert host_name("LocalHost") == "localhost"
    assert host_name("evil.example:80") == "evil.example"
