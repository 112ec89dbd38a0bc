"""Hostile input: the artifact loader and the CLI's option parsing never crash with a traceback.

Every input either loads or raises the loader's own one-line error type; the CLI returns exit 2 with
one `empas: error:` line. Counts of generated cases are in the README's reliability section.
"""

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from empas_tui.cli import main
from storage.artifacts import Artifact, ArtifactError, load_artifact, save_artifact

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)

VALID = Artifact(archetype="balanced", model_id="default", model_fingerprint="ab" * 32,
                 quantizer={"name": "rtn", "group_size": 64}, granularity="block",
                 genes={"block.0": 4, "block.1": 16}, memory_bytes=123456).to_dict()


def check_loads_or_refuses(path):
    try:
        art = load_artifact(path)
    except ArtifactError as exc:
        assert "\n" not in str(exc) and str(exc)
        return False
    assert all(b in (2, 3, 4, 5, 6, 7, 8, 16) for b in art.genes.values())
    assert art.memory_bytes > 0
    return True


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("f") / "a.json"
    p.write_bytes(data)
    check_loads_or_refuses(p)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(json.dumps(VALID)) - 1))
def test_truncated_valid_artifact(tmp_path_factory, cut):
    p = tmp_path_factory.mktemp("t") / "a.json"
    p.write_text(json.dumps(VALID)[:cut])
    assert not check_loads_or_refuses(p)


@FUZZ
@given(key=st.sampled_from(sorted(VALID)), value=json_values)
def test_wrong_typed_fields(tmp_path_factory, key, value):
    d = dict(VALID)
    d[key] = value
    p = tmp_path_factory.mktemp("w") / "a.json"
    p.write_text(json.dumps(d, allow_nan=True))
    check_loads_or_refuses(p)


@FUZZ
@given(genes=st.dictionaries(st.text(min_size=1, max_size=30),
                             st.integers(min_value=-10**12, max_value=10**12) | st.floats() | st.text(max_size=4),
                             min_size=0, max_size=6))
def test_absurd_gene_maps(tmp_path_factory, genes):
    d = dict(VALID)
    d["genes"] = genes
    p = tmp_path_factory.mktemp("g") / "a.json"
    p.write_text(json.dumps(d, allow_nan=True))
    ok = check_loads_or_refuses(p)
    valid_bits = all(isinstance(v, int) and v in (2, 3, 4, 5, 6, 7, 8, 16) for v in genes.values())
    assert ok == (bool(genes) and valid_bits)


def test_nan_metric_is_not_written(tmp_path):
    art = Artifact(**{**{k: v for k, v in load_artifact_dict().items()}})
    art.metrics = {"predicted": {"ppl": math.nan}}
    try:
        save_artifact(art, tmp_path / "x.json")
    except ValueError:
        pass
    assert not list(tmp_path.iterdir())  # nothing half-written


def load_artifact_dict():
    return dict(archetype="b", model_id="m", model_fingerprint="f", quantizer={"group_size": 64},
                granularity="block", genes={"block.0": 4}, memory_bytes=10)


bit_lists = st.lists(st.integers(min_value=-(2**40), max_value=2**40).map(str) | st.text(max_size=5),
                     min_size=0, max_size=6).map(",".join)


@settings(max_examples=200, deadline=None)
@given(bits=bit_lists, group=st.integers(min_value=-(2**40), max_value=0))
def test_cli_bad_bits_and_groups(bits, group):
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["profile", "--bits", bits or "x", "--group-size", str(group), "--storage", "/nonexistent/x.db"])
    assert code == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("empas: error:")
