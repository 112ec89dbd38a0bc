"""The importance matrix: collection on a real (tiny) Llama, llama-imatrix files, GGUF names."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from torch import nn

from profiling.imatrix import (ImatrixError, ImportanceCollector, collect_importance, gguf_names,
                               importance_for_model, read_imatrix_file)
from tests.conftest import make_tiny_llama


def linear_paths(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(layers=2)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 259, (3, 20), generator=torch.Generator().manual_seed(0))


# -- collection -----------------------------------------------------------------------------------

def direct_importance(model, tokens) -> dict[str, torch.Tensor]:
    """Mean x^2 per column recomputed from the block inputs and the MLP maths, without linear hooks."""
    mlp_inputs = {}
    handles = [layer.mlp.register_forward_pre_hook(lambda m, args, i=i: mlp_inputs.__setitem__(i, args[0]))
               for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            hidden_states = model(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        for h in handles:
            h.remove()

    def mean_sq(x):
        return x.double().reshape(-1, x.shape[-1]).square().mean(0)

    out = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            attn_in = mean_sq(layer.input_layernorm(hidden_states[i]))
            mlp = layer.mlp
            x = mlp_inputs[i]
            for name in ("q_proj", "k_proj", "v_proj"):
                out[f"model.layers.{i}.self_attn.{name}"] = attn_in
            for name in ("gate_proj", "up_proj"):
                out[f"model.layers.{i}.mlp.{name}"] = mean_sq(x)
            out[f"model.layers.{i}.mlp.down_proj"] = mean_sq(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        out["lm_head"] = mean_sq(hidden_states[-1])  # the final norm's output
    return out


def test_collected_importance_equals_a_direct_computation(model, tokens):
    paths = [p for p in linear_paths(model) if not p.endswith("o_proj")]
    importance = collect_importance(model, paths, tokens)
    expected = direct_importance(model, tokens)
    assert set(importance) == set(expected) == set(paths)
    for path, vector in importance.items():
        assert vector.dtype == torch.float32 and vector.shape == (model.get_submodule(path).in_features,)
        torch.testing.assert_close(vector.double(), expected[path], rtol=1e-5, atol=1e-9)


def test_batches_accumulate_like_one_pass_and_count_every_token(model, tokens):
    paths = linear_paths(model)
    whole = collect_importance(model, paths, tokens)
    with ImportanceCollector(model, paths) as collector, torch.no_grad():
        for row in tokens:
            model(input_ids=row[None], use_cache=False)
    assert all(collector.counts[p] == tokens.numel() for p in paths)
    for path, vector in collector.importance().items():
        torch.testing.assert_close(vector, whole[path], rtol=1e-5, atol=1e-9)
    batched = collect_importance(model, paths, tokens, batch_size=2)
    for path in paths:
        torch.testing.assert_close(batched[path], whole[path], rtol=1e-5, atol=1e-9)


def test_hooks_are_removed_even_when_the_pass_fails(model):
    paths = linear_paths(model)
    with pytest.raises(RuntimeError):
        with ImportanceCollector(model, paths):
            raise RuntimeError("interrupted")
    assert all(not model.get_submodule(p)._forward_pre_hooks for p in paths)
    with pytest.raises(ImatrixError, match="no module"):
        ImportanceCollector(model, ["model.layers.9.mlp.down_proj"]).install()
    with pytest.raises(ImatrixError, match="no calibration tokens"):
        ImportanceCollector(model, paths).importance()


# -- llama-imatrix files: the layouts of tools/imatrix/imatrix.cpp ------------------------------------

def write_gguf_imatrix(path, stats: dict[str, tuple[np.ndarray, np.ndarray]], chunk_size: int = 512) -> None:
    """save_imatrix(): per entry ``<name>.in_sum2`` (ne = [n/n_mat, n_mat]) and ``<name>.counts`` ([1, n_mat])."""
    writer = GGUFWriter(str(path), "llama")  # the writer always adds general.architecture; llama.cpp ignores it
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", ["calibration.txt"])
    writer.add_uint32("imatrix.chunk_count", 3)
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(stats):
        sums, counts = stats[name]
        writer.add_tensor(f"{name}.in_sum2", sums.reshape(counts.size, -1).astype(np.float32))
        writer.add_tensor(f"{name}.counts", counts.reshape(-1, 1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_legacy_imatrix(path, stats: dict[str, tuple[np.ndarray, np.ndarray]], chunk_size: int = 512) -> None:
    """save_imatrix_legacy(): n_entries, then per entry name, ncall, nval, (sum / count) * ncall."""
    blob = struct.pack("<i", len(stats))
    for name in sorted(stats):
        sums, counts = stats[name]
        ncall = (int(counts.max()) + chunk_size - 1) // chunk_size
        values = (sums / counts.astype(np.float32)) * np.float32(ncall)
        encoded = name.encode()
        blob += struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", ncall, values.size)
        blob += values.astype("<f4").tobytes()
    blob += struct.pack("<i", 3) + struct.pack("<i", 15) + b"calibration.txt"
    path.write_bytes(blob)


def raw_stats(model, tokens) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
    """What llama-imatrix would hold for the tiny model: GGUF name -> (sum of x^2, token count)."""
    paths = [p for p in linear_paths(model) if p != "lm_head"]
    names = gguf_names(paths, n_blocks=2)
    with ImportanceCollector(model, paths) as collector, torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    stats = {names[p]: (collector.sums[p].float().numpy(), np.array([collector.counts[p]])) for p in paths}
    return stats, names


def test_gguf_file_reads_back_as_sum_over_count(model, tokens, tmp_path):
    stats, _ = raw_stats(model, tokens)
    sums_2x = np.arange(8, dtype=np.float32)
    stats["blk.0.ffn_down_exps.weight"] = (sums_2x, np.array([4, 0]))  # two experts, one never routed
    write_gguf_imatrix(tmp_path / "imatrix.gguf", stats)
    read = read_imatrix_file(tmp_path / "imatrix.gguf")
    assert set(read) == set(stats)
    for name, (sums, counts) in stats.items():
        if counts.size == 1:
            np.testing.assert_allclose(read[name], sums / counts[0], rtol=1e-6)
    np.testing.assert_array_equal(read["blk.0.ffn_down_exps.weight"], [0, 0.25, 0.5, 0.75, 1, 1, 1, 1])


def test_legacy_dat_reads_back_like_the_gguf_format(model, tokens, tmp_path):
    stats, _ = raw_stats(model, tokens)
    write_gguf_imatrix(tmp_path / "imatrix.gguf", stats)
    write_legacy_imatrix(tmp_path / "imatrix.dat", stats)
    current, legacy = read_imatrix_file(tmp_path / "imatrix.gguf"), read_imatrix_file(tmp_path / "imatrix.dat")
    assert set(current) == set(legacy) == set(stats)
    for name in stats:
        np.testing.assert_allclose(legacy[name], current[name], rtol=1e-6)


def test_files_that_are_not_imatrices_are_refused_in_one_line(tmp_path):
    cases = {"empty.dat": b"", "text.dat": b"hello world, not an imatrix", "short.dat": struct.pack("<ii", 1, 12)}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    model_gguf = tmp_path / "model.gguf"
    writer = GGUFWriter(str(model_gguf), "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for path in [*(tmp_path / n for n in cases), model_gguf, tmp_path / "missing.gguf"]:
        with pytest.raises(ImatrixError) as info:
            read_imatrix_file(path)
        assert "\n" not in str(info.value), path


# -- GGUF names and matching a file to a model -----------------------------------------------------------

def test_gguf_names_of_a_llama():
    names = gguf_names(["model.layers.3.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj", "lm_head",
                        "model.embed_tokens"], n_blocks=4)
    assert names == {"model.layers.3.mlp.down_proj.weight": "blk.3.ffn_down.weight",
                     "model.layers.0.self_attn.k_proj": "blk.0.attn_k.weight", "lm_head": "output.weight",
                     "model.embed_tokens": "token_embd.weight"}
    assert gguf_names(["lm_head"], n_blocks=4, tied=True) == {"lm_head": "token_embd.weight"}
    with pytest.raises(ImatrixError, match="no GGUF tensor name"):
        gguf_names(["model.layers.0.mlp.not_a_linear"], n_blocks=4)


def test_importance_for_model_matches_names_and_widths(model, tokens, tmp_path):
    stats, names = raw_stats(model, tokens)
    write_gguf_imatrix(tmp_path / "ok.gguf", stats)
    widths = {p: model.get_submodule(p).in_features for p in linear_paths(model)}  # lm_head included
    matched = importance_for_model(read_imatrix_file(tmp_path / "ok.gguf"), widths, n_blocks=2, tied=True)
    assert set(matched) == set(names)  # no entry for the LM head: it is left out, not an error
    for path, vector in matched.items():
        np.testing.assert_allclose(vector.numpy(), stats[names[path]][0] / stats[names[path]][1][0], rtol=1e-6)

    def refused(entries: dict, n_blocks: int = 2) -> str:
        with pytest.raises(ImatrixError) as info:
            importance_for_model(entries, widths, n_blocks=n_blocks, tied=True, source="x.gguf")
        message = str(info.value)
        assert message.startswith("importance matrix x.gguf was made for another model: ") and "\n" not in message
        return message

    entries = read_imatrix_file(tmp_path / "ok.gguf")
    assert "blk.2.attn_q.weight" in refused({**entries, "blk.2.attn_q.weight": np.ones(96, np.float32)})
    assert "96 input columns" in refused({**entries, "blk.0.attn_q.weight": np.ones(64, np.float32)})
    assert "no entry for blk.1.ffn_down.weight" in refused(
        {k: v for k, v in entries.items() if k != "blk.1.ffn_down.weight"})
