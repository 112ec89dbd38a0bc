"""Archetype artifacts: round trip, atomic writes, and refusal of bad files (one clear line each)."""

import json
import math
import os
import stat

import pytest

from storage.artifacts import SCHEMA, Artifact, ArtifactError, load_artifact, save_artifact


def sample(**kw) -> Artifact:
    d = dict(archetype="balanced", model_id="default", model_fingerprint="f" * 64,
             quantizer={"name": "rtn", "group_size": 64}, granularity="block",
             genes={"block.0": "4", "block.1": "8", "block.2": "16"}, memory_bytes=123456,
             metrics={"predicted": {"loss": 3.2, "ppl": 24.5, "on": "512 calibration tokens"},
                      "measured": {"heldout": {"ppl": 25.1, "kl": 0.03, "tokens": 2048}}},
             source={"study": "s", "trial": 7, "storage": "sqlite:///x.db",
                     "calibration": {"corpus": "default", "tokens": 512}},
             selection={"rule": "knee", "basis": "predicted"})
    d.update(kw)
    return Artifact(**d)


def test_round_trip(tmp_path):
    path = save_artifact(sample(), tmp_path / "a" / "balanced.json")
    art = load_artifact(path)
    assert art.genes == {"block.0": "4", "block.1": "8", "block.2": "16"} and art.qtypes == ["4", "8", "16"]
    assert art.metrics["measured"]["heldout"]["ppl"] == 25.1 and art.source["trial"] == 7
    assert art.selection == {"rule": "knee", "basis": "predicted"} and art.created.endswith("Z")
    assert json.loads(path.read_text())["schema"] == SCHEMA
    assert [p.name for p in path.parent.iterdir()] == ["balanced.json"]  # no temp file left
    # saving again replaces atomically and keeps the content valid
    save_artifact(sample(archetype="max-accuracy"), path)
    assert load_artifact(path).archetype == "max-accuracy"


def test_ggml_artifact_round_trip(tmp_path):
    genes = {"embed_tokens": "q8_0", "layers.0.mlp.down_proj": "q4_k", "layers.0.self_attn.q_proj": "f16"}
    art = sample(quantizer={"name": "ggml", "importance": "calibration"}, granularity="linear", genes=genes)
    loaded = load_artifact(save_artifact(art, tmp_path / "g.json"))
    assert loaded.genes == genes and loaded.quantizer == {"name": "ggml", "importance": "calibration"}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_with_the_permissions_of_a_plain_open(tmp_path, umask):
    """Not mkstemp's private 0600: an artifact is for sharing (the umask still rules)."""
    old = os.umask(umask)
    try:
        path = save_artifact(sample(), tmp_path / "a.json")
        plain = tmp_path / "plain.json"
        plain.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask


def test_check_model_refuses_other_weights():
    art = sample()
    art.check_model("f" * 64)
    with pytest.raises(ArtifactError, match="made for model default") as err:
        art.check_model("0" * 64, where=" x.json")
    assert "--model default" in str(err.value) and "\n" not in str(err.value)


def write(tmp_path, text: str):
    p = tmp_path / "bad.json"
    p.write_text(text)
    return p


def good_dict() -> dict:
    return json.loads(json.dumps(sample().to_dict()))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema="empas.artifact/0"), "unknown schema"),
    (lambda d: d.pop("schema"), "unknown schema"),
    (lambda d: d.update(schema="empas.artifact/1"), "unknown schema"),  # v1: genes were integer bits
    (lambda d: d["genes"].update({"block.1": 8}), "invalid qtype"),  # a number, not a qtype string
    (lambda d: d["genes"].update({"block.1": True}), "invalid qtype"),
    (lambda d: d["genes"].update({"block.1": None}), "invalid qtype"),
    (lambda d: d["genes"].update({"block.1": "Q4_K"}), "invalid qtype"),  # qtypes are lower case
    (lambda d: d["genes"].update({"block.1": ""}), "invalid qtype"),
    (lambda d: d["genes"].update({"block.1": "q" * 17}), "invalid qtype"),
    (lambda d: d["genes"].update({"block.1": "4 "}), "invalid qtype"),
    (lambda d: d.update(genes={}), "no genes"),
    (lambda d: d.update(memory_bytes=12.5), "memory_bytes"),
    (lambda d: d.update(memory_bytes=-1), "memory_bytes"),
    (lambda d: d.update(granularity="tensor"), "granularity"),
    (lambda d: d.update(model={"id": "x"}), "model id/fingerprint"),
    (lambda d: d.update(quantizer={"name": "rtn", "group_size": "64"}), "group size"),
    (lambda d: d.update(quantizer={"name": "rtn", "group_size": 0}), "group size"),
    (lambda d: d.update(quantizer={"name": "rtn"}), "group size"),
    (lambda d: d.update(quantizer={"name": "gptq"}), "unknown quantizer"),
    (lambda d: d.update(quantizer="rtn"), "unknown quantizer"),
    (lambda d: d.update(metrics=[1, 2]), "must be objects"),
    (lambda d: d["metrics"].update(predicted=3.0), "metrics.predicted is not an object"),
    (lambda d: d["metrics"]["predicted"].update(loss=[1]), "metrics.predicted.loss"),
    (lambda d: d["source"].update(trial=-3), "source.trial"),
    (lambda d: d["source"].update(trial="7"), "source.trial"),
    (lambda d: d.update(archetype=5), "archetype"),
])
def test_refuses_wrong_types_and_schema(tmp_path, mutate, message):
    d = good_dict()
    mutate(d)
    p = write(tmp_path, json.dumps(d))
    with pytest.raises(ArtifactError, match=message) as err:
        load_artifact(p)
    assert "\n" not in str(err.value) and str(p) in str(err.value)


def test_refuses_corrupt_files(tmp_path):
    text = json.dumps(good_dict())
    for bad, message in [(text[: len(text) // 2], "not valid JSON"),  # truncated
                         ("", "not valid JSON"),
                         (text.replace("3.2", "NaN"), "not valid JSON"),  # NaN is not JSON
                         (text.replace("25.1", "Infinity"), "not valid JSON"),
                         ("[1, 2]", "not an object"),
                         (text[:-1] + ', "genes": {"block.0": "2"}}', "appears twice")]:
        with pytest.raises(ArtifactError, match=message):
            load_artifact(write(tmp_path, bad))
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(tmp_path / "bin.json")
    with pytest.raises(ArtifactError, match="cannot read"):
        load_artifact(tmp_path / "missing.json")


def test_save_refuses_invalid_without_writing(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(ArtifactError, match="invalid qtype"):
        save_artifact(sample(genes={"block.0": 4}), target)
    with pytest.raises(ValueError):  # JSON has no NaN: metrics must be finite or null
        save_artifact(sample(metrics={"predicted": {"loss": math.nan}}), target)
    assert list(tmp_path.iterdir()) == []
