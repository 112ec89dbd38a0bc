"""`empas export` / `empas evaluate` end to end: real (tiny) studies in SQLite, the tiny model saved as a
Hugging Face folder, and the export job's all-or-nothing writes."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from empas_tui.cli import main
from empas_tui.jobs.export import export_job
from search.archetypes import MIB, ArchetypeError, select_archetypes, front_arrays
from search.catalogue import load_front
from search.export_settings import ExportSettings
from search.nsga import run_search
from search.settings import SearchSettings
from storage.database import Database, open_database
from tests.conftest import rtn_settings

pytestmark = pytest.mark.filterwarnings("ignore")
ARCHETYPE_FILES = ["balanced.json", "max-accuracy.json", "max-compression.json"]


@pytest.fixture(scope="module")
def tiny_study(tiny_model_dir, tmp_path_factory):
    """A real profile of the tiny Llama (block genes, RTN 2/4/8/16) and a small NSGA-II study of it."""
    from profiling.models import load_model
    from profiling.sensitivity import prepare, run_profile

    loaded = load_model(str(tiny_model_dir))
    setup = prepare(rtn_settings(bits="2,4,8,16", group_size=32, calib_tokens=128, heldout_tokens=128, seq_len=32),
                    loaded=loaded)
    profile = run_profile(setup)
    url = f"sqlite:///{tmp_path_factory.mktemp('tiny-study') / 'e.db'}"
    db = open_database(url)
    run_search(SearchSettings(study_name="tiny", population=8, trials=16), profile, db)
    return SimpleNamespace(db=db, url=url, loaded=loaded, profile=profile, front=load_front(db, "tiny"),
                           folder=tiny_model_dir)


@pytest.fixture(scope="module")
def synthetic_study(tmp_path_factory):
    """A study of a synthetic 4-block profile (SmolLM2 shapes): 2-bit genes ruin it, so the PPL-rise cap
    matters, and no model is needed to export it."""
    from search.synthetic import synthetic_profile

    url = f"sqlite:///{tmp_path_factory.mktemp('synthetic-study') / 's.db'}"
    db = open_database(url)
    run_search(SearchSettings(study_name="syn", population=8, trials=32), synthetic_profile(blocks=4, granularity="block"),
               db)
    return SimpleNamespace(db=db, url=url, front=load_front(db, "syn"))


def export_settings(study: str, output, **kw) -> ExportSettings:
    """Export settings without measured refinement of the choices (``refine=0``): these tests are about
    choosing on the study's stored front and writing the files."""
    return ExportSettings(study=study, output=str(output), refine=0, **kw)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_export_writes_valid_artifacts_and_evaluate_measures_them(tiny_study, tmp_path, capsys):
    from storage.artifacts import load_artifact

    front = tiny_study.front
    # The artifacts name the storage they came from, password hidden (PostgreSQL does not run here: the
    # study is read from the SQLite database under a URL with a password).
    db = Database("postgresql://u:secret@h/db", tiny_study.db.optuna)
    out = tmp_path / "arts"
    settings = export_settings("tiny", out, validate=True, validate_points=3, heldout_tokens=128, seq_len=32)
    res = export_job(settings, db, loaded=tiny_study.loaded)
    assert listing(out) == ARCHETYPE_FILES + ["validation.csv", "validation.md"]
    assert sorted(p.name for p in res.paths) == listing(out)
    arts = {a.archetype: a for a in (load_artifact(p) for p in res.paths if p.suffix == ".json")}
    assert [(a.genes, a.memory_bytes) for a in res.artifacts] == [(arts[c.archetype].genes, c.memory_bytes)
                                                                  for c in res.choices]
    acc = arts["max-accuracy"]
    # the front is memory-ascending, so its last point has the lowest loss (8 bits may tie with 16 on a
    # tiny model: the front keeps the smaller)
    assert acc.source["trial"] == front.points[-1].trial_number and set(acc.genes.values()) <= {"8", "16"}
    assert "secret" not in json.dumps(acc.source) and acc.source["storage"] == "postgresql://u:***@h/db"
    assert acc.source["study"] == "tiny" and acc.quantizer == {"name": "rtn", "group_size": 32}
    assert acc.model_fingerprint == tiny_study.loaded.fingerprint
    assert acc.metrics["predicted"]["ppl_rise_pct"] == pytest.approx(0.0, abs=1e-3)
    held = acc.metrics["measured"]["heldout"]
    assert 0 <= held["kl"] < 1e-4 and held["memory_basis"] == "memory model" and held["tokens"] == 128
    assert arts["balanced"].selection["basis"] == "predicted"
    assert res.validation.fidelity["points"] >= 4  # archetypes + spread front points
    assert (out / "validation.md").read_text().startswith("| genome |")
    assert len((out / "validation.csv").read_text().splitlines()) == 1 + len(res.validation.rows)
    # the exported genomes measure the same through `empas evaluate`
    code, text, err = run_cli(capsys, "evaluate", *sorted(out.glob("*.json")), "--model", tiny_study.folder,
                              "--heldout-tokens", 128, "--seq-len", 32, "--json")
    assert code == 0, err
    data = json.loads(text)
    by_archetype = {r["name"].split(" ")[0]: r for r in data["rows"]}
    assert sorted(by_archetype) == sorted(arts)
    for name, row in by_archetype.items():
        assert row["ppl"] == pytest.approx(arts[name].metrics["measured"]["heldout"]["ppl"], rel=1e-5)
        assert row["memory_bytes"] == arts[name].memory_bytes
        assert row["predicted_ppl"] == pytest.approx(arts[name].metrics["predicted"]["ppl"])


def test_export_budgets_fail_before_writing(tiny_study, tmp_path):
    with pytest.raises(ArchetypeError, match="smallest achievable"):
        export_job(export_settings("tiny", tmp_path / "o", max_mib=1e-6), tiny_study.db)
    assert not (tmp_path / "o").exists()
    median = float(np.median([p.memory_bytes for p in tiny_study.front.points]))
    res = export_job(export_settings("tiny", tmp_path / "o", archetype="max-accuracy", max_mib=median / MIB),
                     tiny_study.db)
    assert [p.name for p in res.paths] == ["max-accuracy.json"] and listing(tmp_path / "o") == ["max-accuracy.json"]
    assert res.artifacts[0].memory_bytes <= median and res.skipped == {}
    # write=False chooses (and would validate) without touching the disk
    dry = export_job(export_settings("tiny", tmp_path / "dry"), tiny_study.db, write=False)
    assert len(dry.artifacts) == 3 and dry.paths == [] and not (tmp_path / "dry").exists()


def tight_budget_mib(front) -> float:
    """Just under max-compression's memory: every point that still fits is over the 25% PPL-rise cap."""
    memory, predicted, _ = front_arrays(front.points, front.profile.base_loss)
    (compression,) = select_archetypes(memory, predicted, front.profile.base_loss, ["max-compression"])
    assert memory.min() < compression.memory_bytes  # the front has smaller (ruined) points
    return (compression.memory_bytes - 1) / MIB


def test_export_under_a_tight_budget_writes_what_fits_and_reports_the_rest(synthetic_study, tmp_path, capsys):
    budget = tight_budget_mib(synthetic_study.front)
    out = tmp_path / "out"
    res = export_job(export_settings("syn", out, max_mib=budget), synthetic_study.db)
    assert listing(out) == ["balanced.json", "max-accuracy.json"]
    assert [c.archetype for c in res.choices] == ["max-accuracy", "balanced"]
    assert all(a.memory_bytes <= budget * MIB for a in res.artifacts)
    assert list(res.skipped) == ["max-compression"]
    assert "no point stays under 25.0% PPL rise" in res.skipped["max-compression"]
    # the CLI: the same files, one stderr line per skipped archetype, exit 0; JSON carries the reasons
    code, text, err = run_cli(capsys, "export", "--study", "syn", "--storage", synthetic_study.url,
                              "-o", tmp_path / "cli", "--max-mib", budget)
    assert code == 0, err
    assert listing(tmp_path / "cli") == ["balanced.json", "max-accuracy.json"]
    assert err.splitlines() == [f"empas: max-compression not exported: {res.skipped['max-compression']}"]
    assert "wrote 2 artifact(s)" in text and "max-compression" not in text
    code, text, err = run_cli(capsys, "export", "--study", "syn", "--storage", synthetic_study.url,
                              "-o", tmp_path / "json", "--max-mib", budget, "--json")
    assert code == 0 and json.loads(text)["skipped"] == res.skipped
    # one archetype asked for by name is not skipped but refused, and nothing is written
    code, _, err = run_cli(capsys, "export", "--study", "syn", "--storage", synthetic_study.url,
                           "-o", tmp_path / "one", "--max-mib", budget, "--archetype", "max-compression")
    assert code == 2 and "PPL rise" in err and err.count("\n") == 1 and not (tmp_path / "one").exists()


def test_exported_files_get_normal_permissions(synthetic_study, tmp_path):
    old = os.umask(0o022)
    try:
        res = export_job(export_settings("syn", tmp_path / "o"), synthetic_study.db)
    finally:
        os.umask(old)
    # what a plain open() gives under umask 022, not mkstemp's private 0600
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in res.paths} == dict.fromkeys(ARCHETYPE_FILES, 0o644)


def temp_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".tmp-" in p.name]


def test_export_interrupted_by_a_file_size_limit_leaves_nothing(synthetic_study, tmp_path):
    """A real write failure half-way (EFBIG from RLIMIT_FSIZE, set in a child process so the test runner
    is not limited): the first artifact is written in full, the second fails; none is left, nor any temp."""
    settings = export_settings("syn", tmp_path / "out")
    from storage.artifacts import save_artifact_bytes

    sizes = [len(save_artifact_bytes(a)) for a in export_job(settings, synthetic_study.db, write=False).artifacts]
    limit = sizes[0]
    if max(sizes[1:]) <= limit:  # then fail on the first file instead (still mid-write)
        limit = max(sizes) - 1
    assert max(sizes) > limit
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # The child runs the export job itself: the one-line CLI error is tested in-process below.
    child = ("import resource, sys\n"
             "from empas_tui.jobs.export import export_job\n"
             "from search.export_settings import ExportSettings\n"
             "from storage.atomic import WriteError\n"
             "from storage.database import open_database\n"
             "db = open_database(sys.argv[1], create=False)\n"
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
             "try:\n"
             "    export_job(ExportSettings(study='syn', output=sys.argv[2], refine=0), db)\n"
             "except WriteError as exc:\n"
             "    sys.exit(f'refused: {exc}')\n")
    proc = subprocess.run([sys.executable, "-c", child, synthetic_study.url, str(out)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 1 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert proc.stderr.startswith(f"refused: cannot write {out}: File too large"), proc.stderr
    assert proc.stderr.count("\n") == 1
    assert listing(out) == ["keep.txt"] and not temp_leftovers(tmp_path)


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder nobody can create files in: read-only mode, and for root (who ignores modes) the
    immutable attribute (skipped where neither works)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if not immutable:
            folder.chmod(0o755)
            pytest.skip("cannot make a folder unwritable here (root without chattr)")
    try:
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_export_into_an_unwritable_folder_fails_in_one_line(tiny_study, unwritable_folder, capsys):
    code, out, err = run_cli(capsys, "export", "--study", "tiny", "--storage", tiny_study.url, "-o", unwritable_folder)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("empas: error: cannot write") and "write somewhere else" in err
    assert listing(unwritable_folder) == ["keep.txt"]


def test_export_renames_nothing_when_a_target_is_in_the_way(synthetic_study, tmp_path):
    """A folder where the last artifact goes: refused before any file is written or renamed."""
    out = tmp_path / "out"
    (out / "max-compression.json").mkdir(parents=True)
    (out / "max-compression.json" / "x").write_text("x")
    with pytest.raises(ValueError, match="cannot write .*max-compression.json") as err:
        export_job(export_settings("syn", out), synthetic_study.db)
    assert "\n" not in str(err.value)
    assert listing(out) == ["max-compression.json"] and not temp_leftovers(out)


def test_evaluate_baselines_tables_and_csv(tiny_model_dir, tmp_path, capsys):
    csv_path = tmp_path / "rows.csv"
    code, out, err = run_cli(capsys, "evaluate", "--baselines", "--model", tiny_model_dir, "--group-size", 32,
                             "--heldout-tokens", 128, "--seq-len", 32, "--markdown", "--csv", csv_path)
    assert code == 0, err
    assert out.startswith("| genome |") and "| q4_k_m-mix | baseline |" in out and "memory model" in out
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 7 and lines[1].startswith("dense,baseline,16.0,")
    code, out, err = run_cli(capsys, "evaluate", "--baselines", "--model", tiny_model_dir, "--group-size", 32,
                             "--heldout-tokens", 128, "--seq-len", 32)
    assert code == 0, err
    assert "weights MiB (memory model)" in out and "uniform-2" in out


def test_evaluate_refuses_bad_artifacts(tiny_study, tmp_path, capsys):
    res = export_job(export_settings("tiny", tmp_path / "a", archetype="balanced"), tiny_study.db)
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
        code, out, err = run_cli(capsys, "evaluate", path, "--model", tiny_study.folder, "--heldout-tokens", 64,
                                 "--seq-len", 32)
        assert code == 2 and out == "" and message in err and err.count("\n") == 1, err
    # two artifacts of different models are refused before anything loads
    code, _, err = run_cli(capsys, "evaluate", good, other)
    assert code == 2 and "another model" in err
    code, _, err = run_cli(capsys, "evaluate")
    assert code == 2 and "nothing to evaluate" in err


def test_evaluate_directory_goes_to_checkpoint_measurement(tmp_path, capsys):
    """A folder is measured as a packed checkpoint; one that is none is refused in one line."""
    code, _, err = run_cli(capsys, "evaluate", tmp_path)
    assert code == 2 and err.count("\n") == 1, err
    assert "empas_packing.json" in err  # deploy's own refusal of a folder that is no checkpoint


def test_export_cli_argument_errors(tiny_study, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    for argv, message in [(["--max-mib", "-3"], "--max-mib"), (["--max-ppl-rise", "nan"], "--max-ppl-rise"),
                          (["--heldout-tokens", "0"], "--heldout-tokens"), (["-o", f], "not a folder")]:
        args = ["export", "--study", "tiny", "--storage", tiny_study.url, "-o", tmp_path / "out", *argv]
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_export_from_a_study_end_to_end(tiny_study, tmp_path, capsys):
    """`empas export` on a real study writes one artifact per archetype, `--validate` measures them."""
    from storage.artifacts import load_artifact

    out = tmp_path / "out"
    code, text, err = run_cli(capsys, "export", "--study", "tiny", "--storage", tiny_study.url, "-o", out,
                              "--validate", "--validate-points", 2, "--model", tiny_study.folder,
                              "--heldout-tokens", 64, "--seq-len", 32, "--json")
    assert code == 0, err
    data = json.loads(text)
    assert listing(out) == ARCHETYPE_FILES + ["validation.csv", "validation.md"]
    assert (out / "validation.md").read_text().startswith("| genome |")
    assert sorted(Path(p).name for p in data["written"]) == listing(out) and data["skipped"] == {}
    for path in data["written"]:
        if not path.endswith(".json"):
            continue
        art = load_artifact(path)
        assert art.source["study"] == "tiny" and isinstance(art.source["trial"], int)
        assert art.model_fingerprint == tiny_study.profile.model_fingerprint
        assert art.metrics["measured"]["heldout"]["tokens"] == 64
        # chosen on measurements: the front points near each archetype were measured on calibration text
        assert art.selection["basis"] == "measured" and art.metrics["measured"]["calibration"]["kl"] >= 0
    # the table form, one archetype under a budget, without the refinement: predicted
    code, text, err = run_cli(capsys, "export", "--study", "tiny", "--storage", tiny_study.url, "-o", tmp_path / "o2",
                              "--archetype", "max-accuracy", "--max-ppl-rise", 100, "--refine", 0)
    assert code == 0, err
    assert "max-accuracy" in text and "(pred.)" in text and "wrote 1 artifact" in text
    # refusals: one line, nothing written
    for argv, message in [(["--study", "nope"], "no study named"), (["--study", "tiny", "--max-mib", 0.01],
                                                                   "smallest achievable")]:
        code, _, err = run_cli(capsys, "export", *argv, "--storage", tiny_study.url, "-o", tmp_path / "o3")
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o3").exists()


def test_refinement_reports_its_progress(tiny_study, tmp_path):
    """The measured refinement of the choices takes a forward pass per front point: the export job
    reports each one (the TUI showed "loading the front..." for minutes without it)."""
    from empas_tui.jobs.export import export_job
    from storage.database import open_database

    events = []
    result = export_job(ExportSettings(study="tiny", output=str(tmp_path / "o"), model=str(tiny_study.folder)),
                        open_database(tiny_study.url), progress=events.append, write=False)
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("genome") == events[-1].done > 0
    assert [e.done for e in events if e.kind == "genome"] == list(range(1, events[-1].done + 1))
    assert all(e.total == events[0].total for e in events) and events[1].name.startswith("refining: trial ")
    assert any(c.basis == "measured" for c in result.choices) and not (tmp_path / "o").exists()
