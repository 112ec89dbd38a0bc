"""Devices, dtypes and streamed (block-by-block) execution.

The rules of ``--device``/``--dtype`` are checked on described hardware (no GPU needed); a tiny
random Llama saved as safetensors is profiled and evaluated both in memory and forced through the
streamed path, which must give the same numbers; bf16 on the CPU ranks genes like float32 and keeps
8-bit sensitivities above zero; bad input fails in one line and writes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cli_helpers import run_cli
from conftest import make_tiny_llama, rtn_settings
from profiling.devices import Hardware, resolve_device
from profiling.settings import SettingsError

NO_GPU = Hardware()
ONE_AMPERE = Hardware(cuda_devices=1, cuda_bf16=True)
ONE_VOLTA = Hardware(cuda_devices=1, cuda_bf16=False)


def test_auto_is_the_first_gpu_in_bf16_else_the_cpu_in_float32():
    cpu = resolve_device("auto", "auto", NO_GPU)
    assert (cpu.device, cpu.dtype) == (torch.device("cpu"), torch.float32)
    gpu = resolve_device("auto", "auto", ONE_AMPERE)
    assert (gpu.device, gpu.dtype) == (torch.device("cuda", 0), torch.bfloat16)
    assert resolve_device("cuda", "auto", ONE_VOLTA).dtype == torch.float16
    assert resolve_device("cpu", "bfloat16", ONE_AMPERE).describe() == "cpu bfloat16"
    assert resolve_device("cuda:0", "float32", ONE_AMPERE).device == torch.device("cuda", 0)


@pytest.mark.parametrize("device,dtype,hardware,needle", [
    ("cuda", "auto", NO_GPU, "pass --device cpu"),
    ("cuda:1", "auto", ONE_AMPERE, "pass --device cuda:0"),
    ("cuda:x", "auto", ONE_AMPERE, "cuda:N"),
    ("tpu", "auto", NO_GPU, "is not one of"),
    ("cpu:1", "auto", NO_GPU, "takes no index"),
    ("cpu", "float16", NO_GPU, "pass --dtype bfloat16 or float32"),
    ("auto", "float16", NO_GPU, "pass --dtype bfloat16 or float32"),
    ("cuda", "bfloat16", ONE_VOLTA, "pass --dtype float16"),
    ("mps", "auto", NO_GPU, "pass --device cpu"),
    ("cpu", "int8", NO_GPU, "is not one of"),
])
def test_impossible_device_or_dtype_is_refused_in_one_line(device, dtype, hardware, needle):
    with pytest.raises(SettingsError) as err:
        resolve_device(device, dtype, hardware)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, tiny_model_dir):
    """A 2-block Llama whose blocks are ~3.8 MiB each in float32 (so --max-memory-mib 1 is too small),
    with the tiny model's byte-level tokenizer."""
    import shutil

    folder = tmp_path_factory.mktemp("wide-model")
    for f in tiny_model_dir.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, folder / f.name)
    make_tiny_llama(layers=2, hidden=256, intermediate=1024).save_pretrained(folder)
    return folder


def _profile(settings):
    from profiling.sensitivity import prepare, run_profile

    setup = prepare(settings)
    return setup, run_profile(setup)


def _linear_settings(model_dir):
    return rtn_settings(model=str(model_dir), granularity="linear", bits="2,4,8,16", device="cpu")


@pytest.fixture(scope="module")
def fp32_profile(tiny_model_dir):
    """The in-memory float32 profile of the tiny model, per linear (shared by the comparisons)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _profile(_linear_settings(tiny_model_dir))
    finally:
        torch.set_num_threads(before)


def test_streamed_profile_equals_the_in_memory_one(tiny_model_dir, fp32_profile, one_torch_thread):
    """Per linear, four types: the same S (and base loss) when every block is read from disk as it runs;
    one block resident at a time; each block batch reads blocks k..end once, not once per cell."""
    memory_setup, memory = fp32_profile
    streamed_setup, streamed = _profile(_linear_settings(tiny_model_dir).with_(stream=True))
    assert not memory_setup.loaded.streamed and streamed_setup.loaded.streamed
    assert all(p.device.type == "meta" for p in streamed_setup.loaded.model.model.layers.parameters())
    np.testing.assert_allclose(streamed.sensitivity, memory.sensitivity, rtol=1e-5, atol=1e-9)
    assert streamed.base_loss == pytest.approx(memory.base_loss, rel=1e-6)
    assert (memory.sensitivity[:, 0] > 0).all()  # 2 bits measured above zero everywhere
    streamer = streamed_setup.loaded.weights
    assert streamer.peak_resident == 1
    n = streamed_setup.inventory.n_blocks
    # dense pass + prefix check (2n) + one pass over blocks k..end per block k
    assert streamer.reads == 2 * n + n * (n + 1) // 2
    assert streamed.key == memory.key  # streaming does not change what was measured


def test_streamed_evaluation_and_measured_kl_equal_the_in_memory_ones(tiny_model_dir, one_torch_thread):
    """Held-out PPL/KL of a mixed genome and the measured search's calibration KL, both paths."""
    from empas_tui.jobs.search import calibration_kl
    from profiling.evaluation import prepare_validation
    from profiling.genome import genome_from_mapping
    from profiling.sensitivity import prepare

    settings = _linear_settings(tiny_model_dir)
    results = []
    for s in (settings, settings.with_(stream=True)):
        setup = prepare(s)
        inv = setup.inventory
        genes = {g.name: ("2", "4", "8")[i % 3] for i, g in enumerate(inv.genes)}
        genome = genome_from_mapping(inv, genes, "mixed")
        validation = prepare_validation(setup.loaded, setup.quantizer, 128, 32)
        row = validation.run([genome]).rows[0]
        kl = calibration_kl(setup)([genes[g.name] for g in inv.genes])
        results.append((row.loss, row.kl, kl))
    (loss_m, kl_m, cal_m), (loss_s, kl_s, cal_s) = results
    assert kl_m > 0 and cal_m > 0
    assert loss_s == pytest.approx(loss_m, rel=1e-6)
    assert kl_s == pytest.approx(kl_m, rel=1e-5)
    assert cal_s == pytest.approx(cal_m, rel=1e-5)


def test_bf16_on_the_cpu_ranks_genes_like_float32(tiny_model_dir, fp32_profile, one_torch_thread):
    """The model computes in bf16, the quantiser and the KL in float32: 8-bit cells stay above zero
    (the KL fix holds) and S ranks genes as in float32."""
    from profiling.sensitivity import correlations

    _, fp32 = fp32_profile
    bf16_setup, bf16 = _profile(_linear_settings(tiny_model_dir).with_(dtype="bfloat16"))
    assert next(bf16_setup.loaded.model.parameters()).dtype == torch.bfloat16
    assert bf16.extra["compute_dtype"] == "bfloat16" and bf16.key != fp32.key  # stored apart
    assert (bf16.sensitivity[:, 2] > 0).all()  # 8 bits
    for column in range(2):  # 2 and 4 bits
        rho = correlations(list(fp32.sensitivity[:, column]), list(bf16.sensitivity[:, column]))["spearman"]
        assert rho >= 0.95, (column, rho)  # measured 0.99 (2 bits), 0.98 (4 bits)


def test_a_cap_below_one_block_is_refused_and_a_large_one_keeps_the_model_in_memory(wide_model_dir):
    from profiling.devices import resolve_device
    from profiling.streaming import plan_streaming

    placement = resolve_device("cpu", "float32")
    settings = rtn_settings(model=str(wide_model_dir), device="cpu")
    with pytest.raises(SettingsError, match=r"pass --max-memory-mib \d+ or more"):
        plan_streaming(settings.with_(max_memory_mib=1), placement)
    plan, _ = plan_streaming(settings.with_(max_memory_mib=10_000), placement)
    assert not plan.stream and plan.largest_block_bytes > 1024 * 1024
    plan, _ = plan_streaming(settings.with_(max_memory_mib=plan.minimum_mib), placement)
    assert plan.stream  # the whole model does not fit, one block plus the rest does


@pytest.mark.parametrize("flags,needle", [
    (["--device", "cuda"], "pass --device cpu"),
    (["--device", "tpu"], "is not one of"),
    (["--device", "cpu", "--dtype", "float16"], "pass --dtype bfloat16 or float32"),
    (["--max-memory-mib", "1"], "pass --max-memory-mib"),
    (["--max-memory-mib", "0"], "positive whole number"),
    (["--stream", "--metric", "fisher", "--max-memory-mib", "100"], "--metric fisher needs the whole model"),
])
def test_bad_device_dtype_or_memory_is_one_line_and_writes_nothing(flags, needle, wide_model_dir, tmp_path,
                                                                   capsys, monkeypatch):
    if flags[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "never.db"
    code, out, err = run_cli(capsys, "profile", "--model", str(wide_model_dir), "--quantizer", "rtn",
                             "--bits", "2,16", "--storage", str(db), *flags)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("empas: error:") and needle in lines[0], err
    assert out == "" and not db.exists() and list(tmp_path.iterdir()) == []


def test_evaluate_refuses_an_impossible_device_before_loading(capsys, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "evaluate", "--baselines", "--device", "cuda")
    assert code == 2 and err.count("\n") == 1 and "pass --device cpu" in err, err
    assert list(tmp_path.iterdir()) == []


def test_cli_profile_streamed_under_a_cap_prints_the_in_memory_numbers(tiny_model_dir, tmp_path, capsys,
                                                                      one_torch_thread):
    """`empas profile --max-memory-mib N --stream` end to end: same S as without; both stored under the
    same profile key (streaming changes how, not what, is measured)."""
    import json

    base = ["profile", "--model", str(tiny_model_dir), "--quantizer", "rtn", "--bits", "2,4,16", "--group-size", "32",
            "--calib-tokens", "64", "--seq-len", "32", "--device", "cpu", "--json"]
    code, out, err = run_cli(capsys, *base, "--storage", str(tmp_path / "a.db"))
    assert code == 0, err
    memory = json.loads(out)
    code, out, err = run_cli(capsys, *base, "--storage", str(tmp_path / "b.db"), "--max-memory-mib", "1", "--stream")
    assert code == 0, err
    streamed = json.loads(out)
    assert streamed["profile_key"] == memory["profile_key"] and streamed["reused_entries"] == 0
    for gene, row in memory["S"].items():
        for q, v in row.items():
            assert streamed["S"][gene][q] == pytest.approx(v, rel=1e-5, abs=1e-12)
