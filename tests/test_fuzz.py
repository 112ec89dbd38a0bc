"""Hostile input: the artifact loader and the CLI's option parsing never crash with a traceback.

Every input either loads or raises the loader's own one-line error type; the CLI returns exit 2 with
one `empas: error:` line. Counts of generated cases are in the README's reliability section.
"""

import json
import math
import re

import pytest
from hypothesis import HealthCheck, example, given, settings
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
                 genes={"block.0": "4", "block.1": "16"}, memory_bytes=123456).to_dict()


def is_qtype(v) -> bool:
    """What an artifact may name as a gene's type: RTN bits ("4") or a ggml label ("q4_k"); whether the
    quantiser offers it is checked when the artifact is applied."""
    return isinstance(v, str) and re.fullmatch(r"[a-z0-9_]{1,16}", v) is not None


def check_loads_or_refuses(path):
    try:
        art = load_artifact(path)
    except ArtifactError as exc:
        assert "\n" not in str(exc) and str(exc)
        return False
    assert art.genes and all(is_qtype(q) for q in art.genes.values())
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


QTYPE_LIKE = st.sampled_from(["2", "4", "8", "16", "q4_k", "q8_0", "iq4_nl", "f16", "Q4_K", "q4-k", "4\n", " 4",
                              "", "x" * 17, "٣", "4.0"])


@FUZZ
@given(genes=st.dictionaries(st.text(min_size=1, max_size=30),
                             st.integers(min_value=-10**12, max_value=10**12) | st.floats() | st.text(max_size=4)
                             | QTYPE_LIKE, min_size=0, max_size=6))
@example(genes={"block.0": "4\n"})  # a regex ending in $ let a trailing newline through
@example(genes={"block.0": 4})  # schema 1's integer bits
def test_absurd_gene_maps(tmp_path_factory, genes):
    d = dict(VALID)
    d["genes"] = genes
    p = tmp_path_factory.mktemp("g") / "a.json"
    p.write_text(json.dumps(d, allow_nan=True))
    ok = check_loads_or_refuses(p)
    assert ok == (bool(genes) and all(is_qtype(v) for v in genes.values()))


def test_nan_metric_is_not_written(tmp_path):
    art = Artifact(**load_artifact_dict())
    save_artifact(art, tmp_path / "ok.json")  # the same artifact without the NaN is fine
    art.metrics = {"predicted": {"ppl": math.nan}}
    with pytest.raises(ValueError):
        save_artifact(art, tmp_path / "x.json")
    assert [p.name for p in tmp_path.iterdir()] == ["ok.json"]  # nothing half-written


def load_artifact_dict():
    return dict(archetype="b", model_id="m", model_fingerprint="f", quantizer={"name": "rtn", "group_size": 64},
                granularity="block", genes={"block.0": "4"}, memory_bytes=10)


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
