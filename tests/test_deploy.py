"""Packed checkpoints, the deploy commands and the HTTP endpoint, on tiny random models."""

import http.client
import json
import shutil
import socket
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from empas_tui.cli import main
from profiling.deploy.checkpoint import (MANIFEST_NAME, WEIGHTS_NAME, CheckpointError, apply_artifact, load_packed,
                                         safetensors_tensor_bytes, save_packed)
from profiling.deploy.generation import generate_text, heldout_loss
from profiling.deploy.measure import measure_loaded
from profiling.deploy.packed_modules import PackedLinear
from profiling.deploy.packing import as_shipped, pack_model, resident_bytes
from profiling.deploy.serve import InferenceService, ServeLimits, make_server, service_for
from profiling.inventory import build_inventory
from profiling.models import load_model
from profiling.quantizers.rtn import RTNQuantizer
from storage.artifacts import load_artifact, save_artifact
from storage.atomic import WriteError
from test_deploy_support import artifact_for, byte_tokenizer, save_model_folder, tiny_gpt2

GENOME = {"block.0": "2", "block.1": "16", "*": "3"}


@pytest.fixture
def tiny_setup(tmp_path):
    """A tiny Llama folder, an artifact for it (mixed 2/16/3 bits) and an output path."""
    folder = save_model_folder(make_tiny_llama(), tmp_path / "model")
    artifact = artifact_for(load_model(str(folder)), GENOME)
    path = save_artifact(artifact, tmp_path / "genome.json")
    return {"folder": folder, "artifact": artifact, "artifact_path": path, "out": tmp_path / "packed"}


def reference_logits(folder, genes, ids, granularity="block"):
    dense = load_model(str(folder))
    inv = build_inventory(dense.model, granularity)
    with torch.no_grad(), as_shipped(dense.model, inv, genes, RTNQuantizer(64)):
        return dense.model(input_ids=ids).logits


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("make", [make_tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_apply_then_load_without_dense_weights(tmp_path, make):
    folder = save_model_folder(make(), tmp_path / "model")
    artifact = artifact_for(load_model(str(folder)), GENOME)
    path = save_artifact(artifact, tmp_path / "genome.json")
    manifest = apply_artifact(path, tmp_path / "packed")
    # the checkpoint's tensor bytes are the memory objective (within 2%; here exactly)
    measured = safetensors_tensor_bytes(tmp_path / "packed" / WEIGHTS_NAME)
    assert measured == manifest["tensor_bytes"]
    assert abs(measured - artifact.memory_bytes) <= 0.02 * artifact.memory_bytes
    assert measured == artifact.memory_bytes
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    expected = reference_logits(folder, artifact.genes, ids)
    shutil.rmtree(folder)  # the dense weights are gone: loading must not need them
    checkpoint = load_packed(tmp_path / "packed")
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.model(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    assert sum(isinstance(m, PackedLinear) for m in checkpoint.model.modules()) == len(manifest["modules"]) > 0
    # resident: the file's tensors, plus norm/bias vectors upcast to fp32 and rotary tables (a few KB)
    assert measured <= resident_bytes(checkpoint.model) <= 1.05 * measured
    assert checkpoint.genes == artifact.genes and checkpoint.tokenizer is not None
    assert manifest["source_artifact"]["sha256"] and manifest["model"]["fingerprint"] == artifact.model_fingerprint
    assert not leftovers(tmp_path)


def test_generate_and_measure_in_process(tiny_setup):
    apply_artifact(tiny_setup["artifact_path"], tiny_setup["out"])
    ck = load_packed(tiny_setup["out"])
    out = generate_text(ck.model, ck.tokenizer, "Hello there", max_new_tokens=4)
    assert isinstance(out["text"], str) and 1 <= out["new_tokens"] <= 4 and out["tokens_per_s"] > 0
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    measured = measure_loaded(ck.model, ck.tokenizer, tokens, gen_tokens=2, repeats=1)
    assert measured["gen_tokens"] == 2 and measured["resident_bytes"] > 0 and measured["peak_rss_bytes"] > 0
    dense = load_model(str(tiny_setup["folder"]))
    inv = build_inventory(dense.model, "block")
    with as_shipped(dense.model, inv, tiny_setup["artifact"].genes, RTNQuantizer(64)):
        expected = heldout_loss(dense.model, tokens)
    assert measured["heldout_loss"] == pytest.approx(expected, rel=1e-6)


def test_fake_quant_reference_of_checkpoints(tiny_setup, capsys):
    """What `empas measure --dense` prints next to each packed PPL, and the table itself."""
    from empas_tui.cli.deploy import _fake_quant_losses, print_measure_table
    from profiling.deploy.checkpoint import read_manifest

    apply_artifact(tiny_setup["artifact_path"], tiny_setup["out"])
    ck = load_packed(tiny_setup["out"])
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    path = str(tiny_setup["out"])
    ref = _fake_quant_losses(str(tiny_setup["folder"]), [path], [read_manifest(path)], tokens)[path]
    assert ref["fake_quant_shipped_ppl"] == pytest.approx(2.718281828 ** heldout_loss(ck.model, tokens), rel=1e-6)
    assert ref["fake_quant_ppl"] == pytest.approx(ref["fake_quant_shipped_ppl"], rel=1e-2)
    row = {"name": path, **measure_loaded(ck.model, ck.tokenizer, tokens, gen_tokens=1, repeats=1), **ref,
           "average_bits": ck.average_bits, "checkpoint_bytes": ck.tensor_bytes,
           "memory_model_bytes": ck.manifest["memory_bytes"]}
    print_measure_table({"heldout_tokens": 32, "seq_len": 16, "gen_tokens": 1, "hardware": "cpu", "rows": [row]})
    printed = capsys.readouterr().out
    assert f"{ref['fake_quant_shipped_ppl']:.3f}" in printed and "+0.000%" in printed


def test_cli_apply_load_generate(tiny_setup, capsys):
    out = str(tiny_setup["out"])
    assert main(["apply", str(tiny_setup["artifact_path"]), "-o", out]) == 0
    assert "+0.000%" in capsys.readouterr().out
    assert main(["load", out, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["genes"] == 3 and summary["genes_by_bits"] == {"2": 1, "3": 1, "16": 1}
    assert summary["forward_check"] == "ok" and summary["tensor_bytes"] == tiny_setup["artifact"].memory_bytes
    assert main(["generate", out, "--prompt", "abc", "--max-new-tokens", "4", "--json"]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert generated["new_tokens"] >= 1 and isinstance(generated["text"], str)
    # --force replaces a previous checkpoint
    assert main(["apply", str(tiny_setup["artifact_path"]), "-o", out, "--force"]) == 0
    assert (Path(out) / MANIFEST_NAME).is_file() and not leftovers(Path(out).parent)


def test_cli_measure_in_a_fresh_process(tiny_setup, capsys):
    """`empas measure DIR --json`: the checkpoint is loaded and measured in a child process (honest RSS);
    its numbers equal the same measurements made here."""
    from empas_tui.cli.deploy import _heldout_tokens

    out = str(tiny_setup["out"])
    apply_artifact(tiny_setup["artifact_path"], out)
    assert main(["measure", out, "--json", "--heldout-tokens", "64", "--seq-len", "16", "--gen-tokens", "2",
                 "--threads", "1"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["heldout_tokens"] == 64 and table["seq_len"] == 16 and len(table["rows"]) == 1
    row = table["rows"][0]
    assert row["kind"] == "packed" and row["gen_tokens"] == 2 and len(row["tokens_per_s_runs"]) == 3
    assert row["checkpoint_bytes"] == row["memory_model_bytes"] == tiny_setup["artifact"].memory_bytes
    ck = load_packed(out)
    assert row["heldout_loss"] == pytest.approx(heldout_loss(ck.model, _heldout_tokens(out, 64, 16, None)), rel=1e-6)
    assert row["resident_bytes"] == resident_bytes(ck.model)
    # the child's own peak: its runtime and the model, not this test process's
    assert row["rss_baseline_bytes"] < row["peak_rss_bytes"] < row["peak_rss_with_eval_bytes"] + 1
    assert row["peak_rss_bytes"] > row["resident_bytes"]


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("empas: error: ") and "\n" not in err
    return err


def test_cli_bad_inputs(tiny_setup, tmp_path, capsys):
    out = str(tiny_setup["out"])
    err = one_line_error(capsys, ["apply", str(tmp_path / "missing.json"), "-o", out])
    assert "cannot read" in err
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"schema": "empas.artifact/1", "genes": ')
    assert "not valid JSON" in one_line_error(capsys, ["apply", str(corrupt), "-o", out])
    other = tiny_setup["artifact"]
    other.model_fingerprint = "f" * 64
    other_path = save_artifact(other, tmp_path / "other.json")
    assert "--model" in one_line_error(capsys, ["apply", str(other_path), "-o", out, "--model",
                                                str(tiny_setup["folder"])])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert "--force" in one_line_error(capsys, ["apply", str(tiny_setup["artifact_path"]), "-o", str(busy)])
    assert "not an EMPAS checkpoint" in one_line_error(
        capsys, ["apply", str(tiny_setup["artifact_path"]), "-o", str(busy), "--force"])
    assert (busy / "notes.txt").read_text() == "mine"
    # qtypes the packed RTN checkpoint cannot hold: a ggml artifact (it ships as GGUF) and a bit-width RTN
    # does not have (the artifact schema accepts any qtype string; the quantiser checks it on use)
    good = load_artifact(tiny_setup["artifact_path"])
    ggml = replace(good, quantizer={"name": "ggml", "importance": "calibration"}, genes=dict.fromkeys(good.genes, "q4_0"))
    assert "GGUF" in one_line_error(capsys, ["apply", str(save_artifact(ggml, tmp_path / "ggml.json")), "-o", out])
    nine = replace(good, genes={**good.genes, "block.1": "9"})
    assert "bit-width 9 is not supported" in one_line_error(
        capsys, ["apply", str(save_artifact(nine, tmp_path / "nine.json")), "-o", out])
    assert not Path(out).exists() and not leftovers(tmp_path)
    assert "no empas_packing.json" in one_line_error(capsys, ["load", str(busy)])
    assert "empty" in one_line_error(capsys, ["generate", str(busy), "--prompt", " "])


def test_cli_serve_refuses_a_busy_port(tiny_setup, capsys):
    """`empas serve` builds its service and server from the checkpoint; a port in use is one line."""
    apply_artifact(tiny_setup["artifact_path"], tiny_setup["out"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = one_line_error(capsys, ["serve", str(tiny_setup["out"]), "--port", str(port)])
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err
    assert "--port" in one_line_error(capsys, ["serve", str(tiny_setup["out"]), "--port", "70000"])


def test_corrupt_checkpoint_is_refused(tiny_setup):
    apply_artifact(tiny_setup["artifact_path"], tiny_setup["out"])
    weights = tiny_setup["out"] / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_packed(tiny_setup["out"])
    (tiny_setup["out"] / MANIFEST_NAME).write_text("{")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_packed(tiny_setup["out"])


class FailingTokenizer:
    """Saving the tokenizer fails half-way through writing the checkpoint."""

    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{")
        raise OSError(28, "No space left on device")


def test_failed_save_leaves_nothing(tmp_path):
    model = make_tiny_llama()
    with pytest.raises((OSError, WriteError)):  # a nameable failure (a full disk) is a one-line WriteError
        save_packed(model, FailingTokenizer(), tmp_path / "out", {"genes": {}})
    assert list(tmp_path.iterdir()) == []


# -- the HTTP endpoint --------------------------------------------------------------------------------

@pytest.fixture
def server():
    model = make_tiny_llama()
    pack_model(model, build_inventory(model, "block"), ["4", "8", "16"], RTNQuantizer(64))
    limits = ServeLimits(max_new_tokens=8, default_new_tokens=2, max_prompt_chars=50, max_prompt_tokens=40,
                         max_body_bytes=400)
    srv = make_server(InferenceService(model, byte_tokenizer(), limits, {"model": "tiny"}), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
    resp = conn.getresponse()
    status, payload = resp.status, json.loads(resp.read() or b"null")
    conn.close()
    return status, payload


def test_server_answers_and_rejects_bad_requests(server):
    status, health = request(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["limits"]["max_new_tokens"] == 8
    status, out = request(server, "POST", "/generate", {"prompt": "Hi", "max_new_tokens": 3})
    assert status == 200 and isinstance(out["text"], str) and 1 <= out["new_tokens"] <= 3
    bad = [
        (b"{not json", 400, "JSON"),
        ([1, 2], 400, "object"),
        ({"max_new_tokens": 3}, 400, "prompt"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "hi", "max_new_tokens": 9}, 400, "1 to 8"),
        ({"prompt": "hi", "max_new_tokens": "3"}, 400, "max_new_tokens"),
        ({"prompt": "hi", "temperature": 2}, 400, "unknown field"),
        ({"prompt": "x" * 51}, 413, "characters"),
        ({"prompt": "é" * 45}, 413, "tokens"),  # 45 chars, 90 byte tokens
        ({"prompt": "x" * 500}, 413, "bytes"),  # body over 400 bytes
    ]
    for body, code, words in bad:
        status, payload = request(server, "POST", "/generate", body)
        assert status == code and words in payload["error"], (body, status, payload)
    assert request(server, "POST", "/other", {"prompt": "hi"})[0] == 404
    assert request(server, "GET", "/")[0] == 404
    assert request(server, "PUT", "/generate", {"prompt": "hi"})[0] == 405
    # no Content-Length at all
    with socket.create_connection(("127.0.0.1", server), timeout=30) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b" 411 " in sock.recv(4096).split(b"\r\n", 1)[0] + b" "
    # still serving after all that
    assert request(server, "POST", "/generate", {"prompt": "ok"})[0] == 200


def test_service_for_checkpoint_reports_manifest(tiny_setup):
    apply_artifact(tiny_setup["artifact_path"], tiny_setup["out"])
    service = service_for(load_packed(tiny_setup["out"]), ServeLimits())
    assert service.info["genes"] == 3 and service.info["tensor_bytes"] == tiny_setup["artifact"].memory_bytes
