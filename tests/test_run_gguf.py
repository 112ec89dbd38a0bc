"""EMPAS's GGUF files run where users run them, in real llama.cpp (llama-cpp-python), through the CLI
in-process: ``empas generate / measure / serve / evaluate`` on a tiny random Llama whose widths are
multiples of 256 (every K-quant fits), saved as a model folder with a real byte-level BPE tokenizer.

Checked: generation and measurement numbers are llama.cpp's own; the server answers an OpenAI
``/v1/completions`` request on 127.0.0.1 with llama.cpp's greedy text, enforces its limits and stops
cleanly on SIGINT; llama.cpp's KL to the F16 file agrees with PyTorch's on the same weights; the
presets made by llama-quantize are the baselines in both engines (PyTorch's fake-quantised presets have
exactly the loss of llama-quantize's files read back); every bad input fails in one line, exit 2,
leaving nothing behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from empas_tui.cli import main
from gguf_support import make_tiny_llama_256, save_bpe_tokenizer, torch_threads
from profiling.deploy.gguf_measure import VocabTokenizer
from profiling.deploy.gguf_writer import export_gguf, tensor_layout
from profiling.deploy.llamacpp import evaluate_gguf, generate, gguf_tensor_types, load_gguf
from profiling.deploy.presets import PRESETS, preset_genome
from profiling.evaluation import heldout_tokens

PRE = "gpt-2"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def isolated_cache(tmp_path_factory):
    """The F16 reference and presets are cached per model: a fresh cache, so writing them is tested."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("cache")
        mp.setenv("EMPAS_CACHE_DIR", str(cache))
        with torch_threads(1):
            yield cache


def save_model(folder: Path, seed: int = 0, layers: int = 4) -> Path:
    model = make_tiny_llama_256(seed=seed, layers=layers)
    tokenizer = save_bpe_tokenizer(folder)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, loaded model): what ``--model DIR`` loads."""
    from profiling.models import load_model

    folder = save_model(tmp_path_factory.mktemp("tiny-model"))
    return folder, load_model(str(folder))


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """What ``empas export --format gguf`` leaves: balanced.gguf beside its artifact balanced.json; and a
    bare Q2_K-heavy GGUF with no artifact."""
    from profiling.inventory import build_inventory
    from profiling.quantizers.ggml import GgmlQuantizer
    from profiling.quantizers.ggml_types import SUPPORTED
    from storage.artifacts import Artifact, save_artifact

    folder, loaded = tiny
    out = tmp_path_factory.mktemp("export")
    quantizer = GgmlQuantizer(qtypes=[s.lower() for s in SUPPORTED], threads=1)
    inventory = build_inventory(loaded.model, "linear", include_embeddings=True)
    cycle = ["q4_k", "q6_k", "q3_k", "q5_k", "q8_0", "q4_0"]
    genes = {g.name: ("q6_k" if g.block < 0 else cycle[(g.block + i) % len(cycle)])
             for i, g in enumerate(inventory.genes)}
    genome = {g.weights[0].path: genes[g.name] for g in inventory.genes}
    balanced = export_gguf(out / "balanced.gguf", loaded.model, loaded.tokenizer, genome, quantize=quantizer,
                           tokenizer_pre=PRE)
    save_artifact(Artifact(archetype="balanced", model_id=loaded.model_id, model_fingerprint=loaded.fingerprint,
                           quantizer={"name": "ggml"}, granularity="linear", genes=genes,
                           memory_bytes=os.path.getsize(balanced)), out / "balanced.json")
    low = {g.weights[0].path: "q2_k" for g in inventory.genes}
    bare = export_gguf(out / "low.gguf", loaded.model, loaded.tokenizer, low, quantize=quantizer, tokenizer_pre=PRE)
    return balanced, bare


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys, *argv) -> dict:
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def one_line_error(capsys, *argv) -> str:
    code, out, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("empas: error: "), (code, out, err)
    return lines[0]


# -- generate / measure ----------------------------------------------------------------------------------

def test_generate_runs_in_llamacpp(exported, capsys):
    balanced, _ = exported
    out = run_json(capsys, "generate", balanced, "--prompt", "The history of", "--max-new-tokens", 8, "--threads", 1)
    llm = load_gguf(balanced, n_ctx=256)
    direct = generate(llm, "The history of", 8)
    llm.close()
    assert out["engine"] == "llama.cpp" and out["text"] == direct.text and out["new_tokens"] == direct.new_tokens
    assert out["prompt_tokens"] == direct.prompt_tokens and out["n_threads"] == 1 and out["hardware"]
    assert out["prompt_tokens_per_s"] > 0 and out["generation_tokens_per_s"] > 0 and out["load_seconds"] > 0

    code, text, err = run_cli(capsys, "generate", balanced, "--prompt", "The history of", "--max-new-tokens", 8,
                              "--threads", 1)
    assert code == 0 and text.rstrip("\n") == direct.text
    assert "llama.cpp, 1 thread on" in err and "tokens/s" in err and "measured" in err


def test_measure_gguf_files(exported, capsys):
    balanced, low = exported
    result = run_json(capsys, "measure", balanced, low, "--threads", 1, "--heldout-tokens", 256, "--gen-tokens", 8)
    assert result["engine"] == "llama.cpp" and result["n_threads"] == 1 and result["heldout_tokens"] == 256
    vocab = VocabTokenizer(balanced)
    tokens, _ = heldout_tokens(vocab, 256, 128)
    vocab.close()
    for row, path in zip(result["rows"], (balanced, low)):
        assert row["file_bytes"] == os.path.getsize(path) and row["load_seconds"] > 0
        assert 0 < row["rss_baseline_bytes"] < row["rss_after_load_bytes"] <= row["peak_rss_bytes"]
        assert row["new_tokens"] == 8 and row["prompt_tokens"] > 50
        assert row["prompt_tokens_per_s"] > 0 and row["generation_tokens_per_s"] > 0
        # the child's PPL is llama.cpp's, on the same held-out tokens
        assert row["ppl"] == pytest.approx(evaluate_gguf(path, tokens, n_threads=1).ppl, rel=1e-5)
    assert result["rows"][0]["ppl"] != result["rows"][1]["ppl"]

    code, table, _ = run_cli(capsys, "measure", balanced, "--threads", 1, "--heldout-tokens", 128, "--gen-tokens", 0)
    assert code == 0 and "file MB" in table.splitlines()[0] and "balanced.gguf" in table
    assert "1 thread on" in table and "fresh process" in table


# -- evaluate --------------------------------------------------------------------------------------------

def agree(row: dict) -> bool:
    """llama.cpp's KL is PyTorch's plus the kernels' own noise: 8-bit activations in quantised dot products."""
    return abs(row["kl_difference"]) <= 0.05 * row["torch_kl"] + 0.005


@pytest.fixture(scope="module")
def llamacpp_baselines(tiny, capsys_module):
    folder, _ = tiny
    return capsys_module("evaluate", "--engine", "llamacpp", "--baselines", "--model", folder, "--tokenizer-pre", PRE,
                         "--heldout-tokens", 128, "--threads", 1)


@pytest.fixture(scope="module")
def capsys_module():
    """A module-scoped CLI runner returning the parsed JSON (capsys is function-scoped)."""
    import contextlib
    import io

    def run(*argv) -> dict:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv] + ["--json"])
        assert code == 0, err.getvalue()
        return json.loads(out.getvalue())

    return run


def test_evaluate_gguf_llamacpp_beside_pytorch(tiny, exported, capsys, tmp_path, isolated_cache):
    folder, loaded = tiny
    balanced, low = exported
    csv_path = tmp_path / "rows.csv"
    result = run_json(capsys, "evaluate", balanced, low, "--model", folder, "--heldout-tokens", 256, "--threads", 1,
                      "--csv", csv_path)  # engine inferred from the files
    assert result["model_fingerprint"] == loaded.fingerprint and result["heldout_tokens"] == 256
    reference = isolated_cache / "gguf" / loaded.fingerprint / "F16.gguf"
    assert result["reference"] == str(reference) and reference.is_file()
    assert result["engines_f16_kl"] < 1e-4  # the F16 file: the engines agree up to float rounding
    art, bare = result["rows"]
    assert art["kind"] == "artifact" and art["name"] == "balanced (balanced.gguf)" and bare["kind"] == "file"
    for row, path in zip((art, bare), (balanced, low)):
        assert row["file_bytes"] == os.path.getsize(path)
        assert row["llamacpp_kl"] > 0 and row["torch_kl"] > 0 and agree(row), row
        assert row["llamacpp_ppl"] == pytest.approx(row["torch_ppl"], rel=0.05)
        assert row["kl_difference"] == pytest.approx(row["llamacpp_kl"] - row["torch_kl"])
    assert bare["torch_kl"] > 3 * art["torch_kl"] and bare["llamacpp_kl"] > 3 * art["llamacpp_kl"]  # Q2_K vs mixed
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("name,kind,path,file_bytes") and len(lines) == 3

    mtime = reference.stat().st_mtime_ns
    code, table, _ = run_cli(capsys, "evaluate", "--engine", "llamacpp", balanced, "--heldout-tokens", 128,
                             "--threads", 1, "--markdown")  # the model from the artifact beside the file
    assert code == 0 and reference.stat().st_mtime_ns == mtime  # the cached reference is reused
    assert table.startswith("| file | kind | file MB | PPL llama.cpp | PPL PyTorch | ΔPPL | KL llama.cpp")
    assert "balanced (balanced.gguf)" in table and "1 thread on" in table


def test_presets_are_the_llamacpp_baselines(tiny, llamacpp_baselines, isolated_cache):
    _, loaded = tiny
    rows = {r["name"]: r for r in llamacpp_baselines["rows"]}
    assert list(rows) == ["F16", *PRESETS]
    assert rows["F16"]["llamacpp_kl"] == 0 and rows["F16"]["torch_kl"] == 0
    layout = tensor_layout(loaded.model)
    folder = isolated_cache / "gguf" / loaded.fingerprint
    for preset in PRESETS:
        path = folder / f"{preset}.gguf"
        assert rows[preset]["path"] == str(path) and rows[preset]["file_bytes"] == os.path.getsize(path)
        assert gguf_tensor_types(path) == layout.resolve(preset_genome(preset, layout))  # llama-quantize's types
        assert rows[preset]["weights_rel_error"] < 0.5 and agree(rows[preset]), rows[preset]
    for engine in ("llamacpp_kl", "torch_kl"):
        assert rows["Q8_0"][engine] < rows["Q4_K_M"][engine] < rows["Q2_K"][engine]
    assert rows["Q8_0"]["file_bytes"] > rows["Q4_K_M"]["file_bytes"] > rows["Q2_K"]["file_bytes"]


def test_pytorch_engine_offers_presets_for_ggml_artifacts(tiny, exported, llamacpp_baselines, capsys):
    folder, _ = tiny
    balanced, _ = exported
    result = run_json(capsys, "evaluate", balanced.with_suffix(".json"), "--baselines", "--heldout-tokens", 128)
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows)[:len(PRESETS) + 1] == ["dense", *PRESETS] and "balanced (balanced.json)" in rows
    llamacpp_rows = {r["name"]: r for r in llamacpp_baselines["rows"]}
    for name in PRESETS:
        # the ggml quantiser at preset_genome's types on the F16-rounded weights = llama-quantize's file
        # (made from the F16 file), read back: the same weights, the same loss
        assert rows[name]["kind"] == "baseline"
        assert rows[name]["ppl"] == pytest.approx(llamacpp_rows[name]["torch_ppl"], rel=1e-5), name
    assert rows["dense"]["kl"] == 0 and rows["dense"]["ppl"] == pytest.approx(llamacpp_rows["F16"]["torch_ppl"], rel=1e-3)


# -- serve -----------------------------------------------------------------------------------------------

def post(url: str, body: bytes | dict, timeout: float = 60, key: str | None = "s3cret") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_answers_openai_completions_and_stops_cleanly(exported):
    balanced, _ = exported
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "empas_tui", "serve", str(balanced), "--port", "0", "--threads",
                             "1", "--max-new-tokens", "16", "--max-prompt-chars", "1000", "--api-key", "s3cret"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "serving" in line and "http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split("on ", 1)[1].split()[0]
        port = int(url.rsplit(":", 1)[1])
        status, _ = post(url + "/v1/completions", {"prompt": "x", "max_tokens": 2}, key=None)
        assert status == 401  # --api-key: no token, no completion
        status, answer = post(url + "/v1/completions", {"prompt": "The history of", "max_tokens": 6, "temperature": 0})
        llm = load_gguf(balanced, n_ctx=256)
        direct = generate(llm, "The history of", 6, stop_at_eos=False)
        llm.close()
        assert status == 200 and answer["object"] == "text_completion"
        assert answer["choices"][0]["text"] == direct.text and answer["usage"]["completion_tokens"] == 6
        status, answer = post(url + "/v1/completions", {"prompt": "x", "max_tokens": 17})
        assert status == 400 and "max_tokens" in answer["error"]["message"]
        status, answer = post(url + "/v1/completions", {"prompt": "x" * 10_000})
        assert status == 413
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        rest = proc.stderr.read()
        assert "server stopped" in rest and "Traceback" not in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with socket.socket() as sock:  # the port is free again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))


def test_serve_on_a_busy_port(exported, capsys):
    balanced, _ = exported
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        started = time.perf_counter()
        line = one_line_error(capsys, "serve", balanced, "--port", port, "--threads", 1)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "pick another --port" in line
    assert time.perf_counter() - started < 10  # refused before the model loads


# -- bad input -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def not_a_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "fake.gguf"
    path.write_text("this is text, not a GGUF\n")
    return path


@pytest.mark.parametrize("command", [
    ["generate", "{f}", "--prompt", "x"], ["measure", "{f}"], ["serve", "{f}", "--port", "0"],
    ["evaluate", "--engine", "llamacpp", "{f}"], ["evaluate", "{f}"]])
def test_not_a_gguf_and_missing_files(command, not_a_gguf, tmp_path, capsys):
    line = one_line_error(capsys, *[c.format(f=not_a_gguf) for c in command])
    assert "is not a GGUF file" in line and "pass a .gguf file" in line
    missing = tmp_path / "missing.gguf"
    line = one_line_error(capsys, *[c.format(f=missing) for c in command])
    assert f"{missing} does not exist" in line


def test_llamacpp_engine_on_artifacts_says_what_to_pass(exported, tmp_path, capsys):
    balanced, _ = exported
    line = one_line_error(capsys, "evaluate", "--engine", "llamacpp", balanced.with_suffix(".json"))
    assert "is an artifact, not a GGUF" in line and f"pass {balanced}" in line
    lone = tmp_path / "alone.json"
    lone.write_text(balanced.with_suffix(".json").read_text())
    line = one_line_error(capsys, "evaluate", "--engine", "llamacpp", lone)
    assert "empas export --format gguf" in line
    line = one_line_error(capsys, "evaluate", "--engine", "pytorch", balanced)
    assert "is a GGUF: drop --engine pytorch" in line
    line = one_line_error(capsys, "evaluate", balanced, balanced.with_suffix(".json"))
    assert "separate runs" in line
    line = one_line_error(capsys, "measure", balanced, tmp_path)
    assert "mixed" in line


def test_gguf_of_another_model(tiny, exported, tmp_path_factory, tmp_path, capsys, isolated_cache):
    folder, loaded = tiny
    balanced, low = exported
    other = save_model(tmp_path_factory.mktemp("other-model"), seed=1)  # same shapes, other weights
    csv_path = tmp_path / "rows.csv"
    # with an artifact beside it: its fingerprint refuses the other model's weights
    line = one_line_error(capsys, "evaluate", balanced, "--model", other, "--threads", 1, "--csv", csv_path)
    assert "is not the one these genomes were made for" in line and f"pass --model {loaded.model_id}" in line
    # without one: the file's weights are compared with the model's
    line = one_line_error(capsys, "evaluate", low, "--model", other, "--threads", 1, "--heldout-tokens", 128,
                          "--csv", csv_path)
    assert f"{low} is not a GGUF of {other}" in line and "its weights differ" in line and "pass --model" in line
    from profiling.models import load_model

    assert not (isolated_cache / "gguf" / load_model(str(other)).fingerprint).exists()  # refused before writing
    # another shape is refused before anything is read or measured
    two = load_model(str(save_model(tmp_path_factory.mktemp("two-layers"), layers=2)))
    short = export_gguf(tmp_path / "two.gguf", two.model, two.tokenizer, {}, tokenizer_pre=PRE)
    line = one_line_error(capsys, "evaluate", short, "--model", folder, "--csv", csv_path)
    assert "llama.block_count is 2, the model has 4" in line
    assert not csv_path.exists()
    assert not (isolated_cache / "gguf" / two.fingerprint).exists()


def test_f16_reference_of_a_bpe_model_needs_its_pre_tokenizer(tmp_path_factory, capsys):
    folder = save_model(tmp_path_factory.mktemp("fresh-model"), seed=2)
    line = one_line_error(capsys, "evaluate", "--engine", "llamacpp", "--baselines", "--model", folder,
                          "--heldout-tokens", 128)
    assert "pass --tokenizer-pre NAME" in line


def test_chat_without_a_template(exported, capsys):
    balanced, _ = exported
    line = one_line_error(capsys, "generate", balanced, "--prompt", "Hi", "--chat", "--threads", 1)
    assert "no chat template" in line and "drop --chat" in line


def test_server_limits_queue_and_default_tokens():
    """The limits in front of llama-cpp-python's app, around a plain ASGI app that holds the model
    until released: a generating request finding the queue full gets 503 + Retry-After; one naming no
    max_tokens gets the default; other paths pass untouched."""
    import asyncio

    from profiling.deploy.llamacpp_server import LimitsMiddleware, ServerLimits

    async def scenario():
        release, seen = asyncio.Event(), []

        async def app(scope, receive, send):
            message = await receive()
            seen.append(json.loads(message["body"]) if message["body"] else None)
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        limits = LimitsMiddleware(app, ServerLimits(max_new_tokens=32, default_new_tokens=8, max_queue=1))

        async def call(path, body):
            sent = []
            messages = iter([{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}])

            async def receive():
                return next(messages, {"type": "http.disconnect"})

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-type", b"application/json")]}
            await limits(scope, receive, send)
            start = sent[0]
            return start["status"], dict(start["headers"]), sent[1]["body"]

        running = asyncio.create_task(call("/v1/completions", {"prompt": "a"}))
        waiting = asyncio.create_task(call("/v1/chat/completions", {"messages": [], "max_tokens": 4}))
        await asyncio.sleep(0.05)
        status, headers, body = await call("/v1/completions", {"prompt": "c", "max_tokens": 4})
        assert status == 503 and int(headers[b"retry-after"]) >= 1 and b"busy" in body
        release.set()
        assert (await running)[0] == 200 and (await waiting)[0] == 200
        assert seen[0]["max_tokens"] == 8 and seen[1]["max_tokens"] == 4
        status, _, _ = await call("/extras/tokenize", {"input": "x"})  # not a generating path: no max_tokens added
        assert status == 200 and seen[-1] == {"input": "x"}

    asyncio.run(scenario())
