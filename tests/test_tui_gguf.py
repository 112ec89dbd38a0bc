"""Pilot-driven test of the GGUF path in the TUI on a tiny random Llama whose widths are multiples of
256 (every K-quant fits) with a real byte-level BPE tokenizer llama.cpp loads: a ggml study's
archetypes screen lists llama.cpp's presets with their exact file MB (and the profile's prediction
where its genes can express them), exports GGUF files llama.cpp loads, and measures them and the
presets in llama.cpp in a worker, at 80x24."""

from __future__ import annotations

import math

import pytest
from textual.widgets import DataTable, Footer, Input

from empas_tui.tui.app import EmpasApp
from gguf_support import make_tiny_llama_256, save_bpe_tokenizer, torch_threads
from tui_helpers import assert_fits, assert_wrapped, empty_storage, profile_small, screen_name, shown_text, wait_for

llama_cpp = pytest.importorskip("llama_cpp")

TYPES = "q8_0,q6_k,q4_k,q4_0,f16"


@pytest.fixture(scope="module")
def gguf_loaded(tmp_path_factory):
    """The tiny model as a user who passes its F16 ``.gguf`` has it: the GGUF's metadata and tokenizer
    are what an export copies (a BPE tokenizer alone would need --tokenizer-pre)."""
    from profiling.deploy.gguf_writer import export_gguf
    from profiling.models import LoadedModel

    folder = tmp_path_factory.mktemp("tiny-gguf-model")
    model = make_tiny_llama_256(layers=4)
    tokenizer = save_bpe_tokenizer(folder)
    path = export_gguf(folder / "tiny.gguf", model, tokenizer, {}, tokenizer_pre="gpt-2")
    return LoadedModel(model, tokenizer, model_id=str(path), fingerprint="gguf" * 16, source_path=str(folder))


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A fresh cache (the F16 reference and the preset files are written into it) and one torch thread."""
    monkeypatch.setenv("EMPAS_CACHE_DIR", str(tmp_path / "cache"))
    with torch_threads(1):
        yield


def table_rows(table: DataTable) -> list[list[str]]:
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


async def test_ggml_archetypes_presets_export_gguf_and_measure_in_llamacpp(tmp_path, gguf_loaded):
    from profiling.deploy.gguf_writer import gguf_layout_for
    from profiling.deploy.llamacpp import gguf_tensor_types
    from profiling.deploy.presets import PRESETS, preset_genome

    app = EmpasApp(storage=empty_storage(tmp_path), loader=lambda spec: gguf_loaded)
    size = (80, 24)
    async with app.run_test(size=size) as pilot:
        await profile_small(pilot, quantizer="ggml", qtypes=TYPES, model=gguf_loaded.model_id, study="gg",
                            include_embeddings="yes")
        assert app.screen.profile.memory_basis == "gguf file"
        await pilot.press("s")
        await wait_for(pilot, lambda: screen_name(app) == "SearchScreen", "the search screen")
        search = app.screen
        await wait_for(pilot, lambda: search.state == "done", "the search")
        # the presets the profile can predict are points on the Pareto plot
        await wait_for(pilot, lambda: search.presets, "the presets on the plot")
        plotted = {p.name for p in search.presets if p.predicted_loss is not None}
        assert "Q8_0" in plotted and "Q4_K_M" not in plotted  # Q4_K_M mixes types inside a block gene
        await pilot.press("a")
        await wait_for(pilot, lambda: screen_name(app) == "ArchetypesScreen" and app.screen.choices
                       and app.screen.presets, "the archetypes and presets")
        arch = app.screen
        profile = arch.front.profile

        # every preset with its exact file MB (the layout llama-quantize's files have) and bits
        layout = gguf_layout_for(gguf_loaded.model, gguf_loaded.tokenizer, gguf_loaded.gguf_path)
        presets = {r[0]: r for r in table_rows(arch.query_one("#baselines", DataTable))}
        assert set(presets) == set(PRESETS)
        for name in PRESETS:
            assert presets[name][1] == f"{layout.file_bytes(preset_genome(name, layout)) / 1e6:.2f}", name
        # Q8_0 is every matrix at q8_0: the profile predicts it; Q4_K_M raises attn_v/ffn_down in a block
        q8 = next(p for p in arch.presets if p.name == "Q8_0")
        assert q8.predicted_loss == pytest.approx(profile.predicted_loss(["q8_0"] * profile.n_genes))
        assert presets["Q8_0"][3] == f"{q8.predicted_loss - profile.base_loss:.3f}"
        assert presets["Q4_K_M"][3] == "n/a" and "Q4_K_M" in shown_text(arch.query_one("#baseline-notes"))
        near = shown_text(arch.query_one("#near-presets"))
        assert "nearest presets" in near and " MB" in near
        assert_wrapped(arch.query_one("#near-presets"), size)

        # export: GGUF files (+ tensor types and artifacts), all through export_job
        target = tmp_path / "exported"
        await pilot.press("e")
        assert screen_name(app) == "FolderPrompt"
        app.screen.query_one(Input).value = str(target)
        await pilot.press("enter")
        await wait_for(pilot, lambda: not arch.busy and arch.written, "the export")
        names = sorted(p.name for p in target.iterdir())
        for c in arch.choices:
            assert {f"{c.archetype}.gguf", f"{c.archetype}.json", f"{c.archetype}.tensor-types.txt"} <= set(names)
        rows = {r[0]: r for r in table_rows(arch.query_one("#arch-table", DataTable))}
        for c in arch.choices:
            path = target / f"{c.archetype}.gguf"
            assert arch.gguf_paths[c.archetype] == path
            assert path.stat().st_size == arch.point_of(c).memory_bytes  # the memory objective is the file
            assert rows[c.archetype][1] == f"{path.stat().st_size / 1e6:.2f}"
            assert len(gguf_tensor_types(path)) == len(layout.tensors)  # llama.cpp's parser reads it
        status = arch.query_one("#measure-status")
        assert "GGUF" in shown_text(status)

        # llama.cpp: the exported files and every preset, in a worker; the UI keeps answering
        assert arch.check_action("llamacpp", ()) is True
        await pilot.press("g")
        assert arch.busy == "llama.cpp" and arch.check_action("cancel", ()) is True
        await pilot.press("down")  # keys still work while the worker runs
        await wait_for(pilot, lambda: not arch.busy, "the llama.cpp measurement", limit=240)
        assert arch.llamacpp is not None, shown_text(status)
        rows = {r[0]: r for r in table_rows(arch.query_one("#arch-table", DataTable))}
        for c in arch.choices:
            ppl, rise, kl, speed = rows[c.archetype][4:8]
            assert math.isfinite(float(ppl)) and float(kl) >= 0 and float(speed) > 0, rows[c.archetype]
        presets = {r[0]: r for r in table_rows(arch.query_one("#baselines", DataTable))}
        for name in PRESETS:
            assert float(presets[name][4]) > 1 and float(presets[name][7]) > 0, presets[name]
        q8_row = next(r for r in arch.llamacpp.evaluation.rows if r.name == "Q8_0")
        assert presets["Q8_0"][6] == f"{q8_row.llamacpp_kl:.3f}"
        assert "llama.cpp" in shown_text(arch.query_one("#baselines-title"))
        # at 80x24 the status line and the key bar stay whole
        arch.query_one("#measure-status").scroll_visible(animate=False)
        await pilot.pause()
        assert_wrapped(status, size)
        assert_fits(arch, ("#measure-status",), size)
        assert_fits(arch, (Footer,), size)
        front, settings = arch.front, arch.settings

    # what `m` runs for the presets of a ggml study (the key's wiring is tested on an RTN study in
    # test_tui_search.py): dense and every preset, quantised from F16-rounded weights, on held-out tokens
    from empas_tui.jobs.baselines import measure_baselines

    result = measure_baselines(settings.with_(heldout_tokens=256), front, gguf_loaded)
    assert [r.name for r in result.rows] == ["dense", *PRESETS] and result.heldout_tokens == 256
    assert result.rows[0].kl == 0 and all(r.kl > 0 and math.isfinite(r.ppl) for r in result.rows[1:])
    by_name = {r.name: r for r in result.rows}
    assert by_name["Q2_K"].kl > by_name["Q4_K_M"].kl > by_name["Q8_0"].kl  # fewer bits, more damage
