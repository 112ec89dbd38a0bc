"""`empas export` / `empas evaluate` end to end on a tiny model saved as a Hugging Face folder."""

import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import pytest

from empas_tui.cli import main
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A 3-block random Llama + byte-level tokenizer that `load_model(folder)` loads like any HF model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-model")
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    make_tiny_llama().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_front(tiny_folder):
    """A FrontData-shaped object (profile, space, points) from a real profile's exact proxy front."""
    from profiling.models import load_model
    from profiling.sensitivity import prepare, run_profile
    from search.exact_front import front_for_space
    from search.space import SearchSpace

    loaded = load_model(str(tiny_folder))
    setup = prepare(granularity="block", group_size=32, calib_tokens=128, heldout_tokens=128, seq_len=32,
                    loaded=loaded)
    profile = run_profile(setup, [2, 4, 8, 16])
    space = SearchSpace.from_profile(profile)
    f = front_for_space(space)
    points = [SimpleNamespace(trial_number=100 + k, bits=space.bits_of(g), predicted_loss=float(l),
                              memory_bytes=int(m), measured=None)
              for k, (g, l, m) in enumerate(zip(f.genomes, f.loss, f.memory))]
    return SimpleNamespace(profile=profile, space=space, points=points, settings={}), loaded


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_writes_valid_artifacts_and_evaluate_measures_them(tiny_front, tiny_folder, tmp_path, capsys):
    from profiling.validation import prepare_validation
    from search.archetypes import export_archetypes
    from storage.artifacts import load_artifact

    front, loaded = tiny_front
    setup = prepare_validation(loaded, front.profile.quantizer, n_tokens=128, seq_len=32,
                               calibration={"corpus": "default", "tokens": 128})
    out = tmp_path / "arts"
    res = export_archetypes(front, out, "tiny-study", "postgresql://u:secret@h/db", validation=setup,
                            validate_points=3)
    assert sorted(p.name for p in out.iterdir()) == ["balanced.json", "max-accuracy.json", "max-compression.json"]
    arts = {a.archetype: a for a in (load_artifact(p) for p in res.paths)}
    acc = arts["max-accuracy"]
    # the front's last point is its lowest loss (8 bits may tie with 16 on a tiny model: the smaller wins)
    assert acc.source["trial"] == 100 + len(front.points) - 1 and set(acc.genes.values()) <= {8, 16}
    assert "secret" not in json.dumps(acc.source) and acc.source["study"] == "tiny-study"
    assert acc.metrics["predicted"]["ppl_rise_pct"] == pytest.approx(0.0, abs=1e-3)
    held = acc.metrics["measured"]["heldout"]
    assert 0 <= held["kl"] < 1e-4 and held["memory_basis"] == "memory model"
    assert arts["balanced"].selection["basis"] == "predicted"
    assert res.validation.fidelity["points"] >= 4  # archetypes + spread front points
    # the exported genomes measure the same through `empas evaluate`
    code, text, err = run_cli(capsys, "evaluate", *sorted(res.paths), "--model", tiny_folder,
                              "--heldout-tokens", 128, "--seq-len", 32, "--json")
    assert code == 0, err
    data = json.loads(text)
    by_archetype = {r["name"].split(" ")[0]: r for r in data["rows"]}
    for name, row in by_archetype.items():
        assert row["ppl"] == pytest.approx(arts[name].metrics["measured"]["heldout"]["ppl"], rel=1e-5)
        assert row["memory_bytes"] == arts[name].memory_bytes
        assert row["predicted_ppl"] == pytest.approx(arts[name].metrics["predicted"]["ppl"])


def test_export_budgets_fail_before_writing(tiny_front, tmp_path):
    from search.archetypes import ArchetypeError, export_archetypes

    front, _ = tiny_front
    with pytest.raises(ArchetypeError, match="smallest achievable"):
        export_archetypes(front, tmp_path / "o", "s", "sqlite:///x.db", max_bytes=1.0)
    assert not (tmp_path / "o").exists()
    res = export_archetypes(front, tmp_path / "o", "s", "sqlite:///x.db", archetypes=["max-accuracy"],
                            max_bytes=float(np.median([p.memory_bytes for p in front.points])))
    assert [p.name for p in res.paths] == ["max-accuracy.json"]


def test_evaluate_baselines_tables_and_csv(tiny_folder, tmp_path, capsys):
    csv_path = tmp_path / "rows.csv"
    code, out, err = run_cli(capsys, "evaluate", "--baselines", "--model", tiny_folder, "--group-size", 32,
                             "--heldout-tokens", 128, "--seq-len", 32, "--markdown", "--csv", csv_path)
    assert code == 0, err
    assert out.startswith("| genome |") and "| q4_k_m-mix | baseline |" in out and "memory model" in out
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 7 and lines[1].startswith("dense,baseline,16.0,")
    code, out, err = run_cli(capsys, "evaluate", "--baselines", "--model", tiny_folder, "--group-size", 32,
                             "--heldout-tokens", 128, "--seq-len", 32)
    assert code == 0, err
    assert "weights MiB (memory model)" in out and "uniform-2" in out


def test_evaluate_refuses_bad_artifacts(tiny_front, tiny_folder, tmp_path, capsys):
    from search.archetypes import export_archetypes

    front, _ = tiny_front
    res = export_archetypes(front, tmp_path / "a", "s", "sqlite:///x.db", archetypes=["balanced"])
    good = res.paths[0]
    d = json.loads(good.read_text())
    other = tmp_path / "other.json"
    d["model"]["fingerprint"] = "0" * 64
    other.write_text(json.dumps(d))
    truncated = tmp_path / "trunc.json"
    truncated.write_text(good.read_text()[:100])
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({**json.loads(good.read_text()), "schema": "other/9"}))
    for path, message in [(other, "was made for model"), (truncated, "not valid JSON"), (schema, "unknown schema")]:
        code, out, err = run_cli(capsys, "evaluate", path, "--model", tiny_folder, "--heldout-tokens", 64,
                                 "--seq-len", 32)
        assert code == 2 and out == "" and message in err and err.count("\n") == 1, err
    # two artifacts of different models are refused before anything loads
    code, _, err = run_cli(capsys, "evaluate", good, other)
    assert code == 2 and "another model" in err
    code, _, err = run_cli(capsys, "evaluate")
    assert code == 2 and "nothing to evaluate" in err


def test_evaluate_directory_hook(tmp_path, capsys):
    """A folder goes to the deploy command's checkpoint evaluation when it exists, else one line."""
    code, _, err = run_cli(capsys, "evaluate", tmp_path)
    assert code == 2 and err.count("\n") == 1, err
    if importlib.util.find_spec("empas_tui.commands.deploy") is None:
        assert "is a folder" in err
    else:
        assert "empas_packing.json" in err  # deploy's own refusal of a folder that is no checkpoint


def test_export_cli_argument_errors(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    for argv, message in [(["--max-mib", "-3"], "--max-mib"), (["--max-ppl-rise", "nan"], "--max-ppl-rise"),
                          (["-o", f], "not a folder")]:
        args = ["export", "--study", "s", "--storage", tmp_path / "e.db", "-o", tmp_path / "out", *argv]
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and message in err, err


def test_export_from_a_study_end_to_end(tiny_front, tiny_folder, tmp_path, capsys):
    """A real (tiny) study: `empas export` writes one artifact per archetype, `--validate` measures them."""
    from search.study import SearchSettings, run_search
    from storage.artifacts import load_artifact

    front, _ = tiny_front
    storage = f"sqlite:///{tmp_path / 'e.db'}"
    run_search(SearchSettings(study_name="tiny", population=8, trials=16), front.profile, storage)
    out = tmp_path / "out"
    code, text, err = run_cli(capsys, "export", "--study", "tiny", "--storage", storage, "-o", out, "--validate",
                              "--validate-points", 2, "--model", tiny_folder, "--heldout-tokens", 64,
                              "--seq-len", 32, "--json")
    assert code == 0, err
    data = json.loads(text)
    assert sorted(p.name for p in out.iterdir()) == ["balanced.json", "max-accuracy.json", "max-compression.json",
                                                    "validation.csv", "validation.md"]
    assert (out / "validation.md").read_text().startswith("| genome |")
    for path in data["written"]:
        art = load_artifact(path)
        assert art.source["study"] == "tiny" and isinstance(art.source["trial"], int)
        assert art.model_fingerprint == front.profile.model_fingerprint
        assert art.metrics["measured"]["heldout"]["tokens"] == 64 and art.selection["basis"] == "predicted"
    # the table form, one archetype under a budget
    code, text, err = run_cli(capsys, "export", "--study", "tiny", "--storage", storage, "-o", tmp_path / "o2",
                              "--archetype", "max-accuracy", "--max-ppl-rise", 100)
    assert code == 0, err
    assert "max-accuracy" in text and "(pred.)" in text and "wrote 1 artifact" in text
    # refusals: one line, nothing written
    for argv, message in [(["--study", "nope"], "no study named"), (["--study", "tiny", "--max-mib", 0.01],
                                                                   "smallest achievable")]:
        code, _, err = run_cli(capsys, "export", *argv, "--storage", storage, "-o", tmp_path / "o3")
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o3").exists()
