"""The ggml backend against llama.cpp itself: bytes equal to ``llama_model_quantize --pure`` output.

The reference is llama.cpp's own quantiser driver (``llama_model_quantize`` through llama-cpp-python's
ctypes binding) run on a tiny random Llama GGUF written here: hidden width 256 so the K-quants apply,
feed-forward width 576 so ``ffn_down`` exercises llama.cpp's shape fallbacks.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="the ggml backend needs llama-cpp-python")

from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType  # noqa: E402

from profiling.quantizers import Quantizer, gene_qtypes, make_quantizer  # noqa: E402
from profiling.quantizers.ggml import LIB_ENV, GgmlLibraryError, GgmlQuantizer, find_library  # noqa: E402
from profiling.quantizers.ggml_types import SUPPORTED, catalogue, fallback_for  # noqa: E402
from profiling.settings import QuantizerError, QuantizerSettings  # noqa: E402

LABELS = tuple(s.lower() for s in SUPPORTED)
HIDDEN, FFN, VOCAB, HEAD_DIM = 256, 576, 288, 64


# -- a tiny Llama GGUF and llama.cpp's quantiser ----------------------------------------------------

def tiny_llama_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """GGUF name -> (out, in) float32 weight of a one-block Llama, untied (so output.weight exists)."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output.weight": (VOCAB, HIDDEN),
              "blk.0.attn_q.weight": (HIDDEN, HIDDEN), "blk.0.attn_k.weight": (2 * HEAD_DIM, HIDDEN),
              "blk.0.attn_v.weight": (2 * HEAD_DIM, HIDDEN), "blk.0.attn_output.weight": (HIDDEN, HIDDEN),
              "blk.0.ffn_gate.weight": (FFN, HIDDEN), "blk.0.ffn_up.weight": (FFN, HIDDEN),
              "blk.0.ffn_down.weight": (HIDDEN, FFN)}
    weights = {name: (rng.standard_normal(shape) * 0.02).astype(np.float32) for name, shape in shapes.items()}
    weights["blk.0.attn_q.weight"][3, 7] = 0.5  # an outlier, so the importance-weighted search has work to do
    return weights


def write_llama_gguf(path, weights: dict[str, np.ndarray], source_type: str = "f32") -> None:
    """The metadata ``llama_model_quantize`` needs (it loads hparams, not the vocabulary) plus the tensors."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(1)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HIDDEN // HEAD_DIM)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(LlamaFileType.ALL_F32 if source_type == "f32" else LlamaFileType.MOSTLY_F16)
    for name, w in weights.items():
        writer.add_tensor(name, w if source_type == "f32" else w.astype(np.float16))
    for norm in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        writer.add_tensor(norm, np.ones(HIDDEN, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_file_type(label: str) -> int:
    """The llama.cpp file type whose base tensor type is ``label`` (with --pure every tensor gets it)."""
    name = catalogue()[label].name
    member = LlamaFileType.__members__.get(f"MOSTLY_{name}") or LlamaFileType[f"MOSTLY_{name}_M"]
    return int(member)


def llama_quantize(src, dst, label: str, importance: dict[str, np.ndarray] | None = None) -> dict:
    """Run llama.cpp's ``llama_model_quantize`` (pure, one thread); GGUF name -> ReaderTensor of the output."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_file_type(label)
    params.pure = True
    params.nthread = 1
    if importance is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()  # zeroed: the last ends the list
        for entry, (name, values) in zip(entries, importance.items()):
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = entries
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed for {label}"
    return {t.name: t for t in GGUFReader(str(dst)).tensors}


def stored_bytes(tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.data).view(np.uint8).reshape(int(tensor.shape[1]), -1)


@pytest.fixture(scope="module")
def quantizer():
    return GgmlQuantizer(LABELS, imatrix="calibration", threads=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ggml")
    weights = tiny_llama_tensors()
    rng = np.random.default_rng(1)
    importance = {name: (rng.random(w.shape[1]) ** 4 + 1e-3).astype(np.float32) for name, w in weights.items()}
    write_llama_gguf(folder / "f32.gguf", weights)
    return folder, weights, importance


# -- bytes equal to llama.cpp's -----------------------------------------------------------------------

@pytest.mark.parametrize("label", LABELS)
def test_bytes_equal_llama_quantize_with_and_without_imatrix(label, tiny, quantizer):
    folder, weights, importance = tiny
    for imatrix in (None, importance):
        out = llama_quantize(folder / "f32.gguf", folder / f"{label}.gguf", label, imatrix)
        for name, w in weights.items():
            stored = out[name]
            expected_label = fallback_for(label, w.shape[1])  # llama.cpp's own fallback for ffn_down (576)
            assert stored.tensor_type == GGMLQuantizationType(catalogue()[expected_label].type_id), name
            mine = quantizer.quantize_bytes(w, expected_label, None if imatrix is None else imatrix[name])
            assert np.array_equal(stored_bytes(stored), mine), (label, name, imatrix is not None)


def test_imatrix_changes_the_bytes(tiny, quantizer):
    _, weights, importance = tiny
    w = weights["blk.0.attn_q.weight"]
    for label in ("q4_k", "q2_k", "q4_0", "iq4_nl"):
        assert not np.array_equal(quantizer.quantize_bytes(w, label), quantizer.quantize_bytes(w, label, importance[
            "blk.0.attn_q.weight"])), label


@pytest.mark.parametrize("label", ["f16", "q8_0", "q4_k"])
def test_f16_source_is_quantised_from_its_float_values(label, tiny, quantizer):
    folder, weights, _ = tiny
    write_llama_gguf(folder / "f16.gguf", weights, source_type="f16")
    out = llama_quantize(folder / "f16.gguf", folder / f"f16-{label}.gguf", label)
    w = weights["blk.0.ffn_up.weight"].astype(np.float16).astype(np.float32)  # the values llama.cpp reads
    assert np.array_equal(stored_bytes(out["blk.0.ffn_up.weight"]), quantizer.quantize_bytes(w, label))


def test_threads_do_not_change_the_bytes(tiny):
    w = np.random.default_rng(3).standard_normal((1024, 512)).astype(np.float32)  # big enough to be split
    one, four = GgmlQuantizer(["q4_k", "f16"], threads=1), GgmlQuantizer(["q4_k", "f16"], threads=4)
    assert np.array_equal(one.quantize_bytes(w, "q4_k"), four.quantize_bytes(w, "q4_k"))


# -- dequantisation and fake quantisation -------------------------------------------------------------

class _TypeTraits(ctypes.Structure):  # struct ggml_type_traits in ggml.h
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


def ggml_to_float(data: np.ndarray, label: str) -> np.ndarray:
    """ggml's own dequantiser for ``label`` (the type traits' ``to_float``)."""
    lib = ctypes.CDLL(str(find_library()))
    lib.ggml_get_type_traits.argtypes, lib.ggml_get_type_traits.restype = [ctypes.c_int], ctypes.POINTER(_TypeTraits)
    traits = lib.ggml_get_type_traits(catalogue()[label].type_id).contents
    to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(traits.to_float)
    t = catalogue()[label]
    n = data.size // t.type_size * t.block_size
    out = np.empty(n, np.float32)
    src = np.ascontiguousarray(data)
    to_float(src.ctypes.data, out.ctypes.data, n)
    return out


@pytest.mark.parametrize("label", LABELS)
def test_dequantize_equals_ggml_to_float(label, tiny, quantizer):
    _, weights, importance = tiny
    w = weights["blk.0.attn_k.weight"]
    data = quantizer.quantize_bytes(w, label, importance["blk.0.attn_k.weight"])
    values = quantizer.dequantize_bytes(data, label, w.shape)
    assert values.dtype == np.float32 and values.shape == w.shape
    assert np.array_equal(values.reshape(-1), ggml_to_float(data, label))
    err = float(((values - w) ** 2).mean() / (w ** 2).mean())
    assert 0 <= err < 0.2, (label, err)  # Q2_K, the coarsest, is ~0.09 on Gaussian weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_keeps_shape_dtype_and_matches_the_bytes(dtype, tiny, quantizer):
    _, weights, importance = tiny
    w = torch.from_numpy(weights["blk.0.ffn_gate.weight"]).to(dtype)
    imp = torch.from_numpy(importance["blk.0.ffn_gate.weight"])
    for label in ("q4_k", "f16", "q8_0"):
        fq = quantizer.fake_quantize(w, label, imp)
        assert fq.shape == w.shape and fq.dtype == dtype and fq.device == w.device
        w32 = w.float().numpy()
        expected = quantizer.dequantize_bytes(quantizer.quantize_bytes(w32, label, imp.numpy()), label, w32.shape)
        assert torch.equal(fq, torch.from_numpy(expected).to(dtype)), label
    assert torch.equal(quantizer.fake_quantize(w, "f16"), w.to(torch.float16).to(dtype))


def test_importance_is_ignored_without_an_imatrix_setting(tiny):
    _, weights, importance = tiny
    w, imp = weights["blk.0.attn_q.weight"], importance["blk.0.attn_q.weight"]
    plain = GgmlQuantizer(["q4_k", "f16"], imatrix=None, threads=1)
    assert not plain.uses_importance
    assert np.array_equal(plain.quantize_bytes(w, "q4_k", imp), plain.quantize_bytes(w, "q4_k"))


# -- shapes, sizes, errors, settings -------------------------------------------------------------------

def test_valid_for_k_quants_needs_rows_of_256(quantizer):
    block_256 = {label for label, t in catalogue().items() if t.block_size == 256}
    assert block_256 == {"q6_k", "q5_k", "q4_k", "q3_k", "q2_k", "iq4_xs", "iq3_s"}
    for label in LABELS:
        assert quantizer.valid_for(label, 1536, 1536)
        assert quantizer.valid_for(label, 1536, 576) == (label not in block_256)
    assert not quantizer.valid_for("q4_k", 0, 1536) and not quantizer.valid_for("q7_x", 8, 256)
    assert gene_qtypes(quantizer, [(1536, 576), (576, 1536)]) == [q for q in quantizer.qtypes if q not in block_256]


@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (3, 64)])
def test_weight_bytes_equal_the_stored_bytes(shape, quantizer):
    w = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    for label in quantizer.qtypes:
        if quantizer.valid_for(label, *shape):
            data = quantizer.quantize_bytes(w, label)
            assert data.dtype == np.uint8 and data.shape[0] == shape[0]
            assert quantizer.weight_bytes(label, *shape) == data.size
            assert quantizer.bits_per_weight(label) == pytest.approx(8 * data.size / w.size)


def test_invalid_type_for_a_shape_is_a_one_line_error_naming_the_valid_ones(quantizer):
    w = torch.zeros(1536, 576)
    with pytest.raises(QuantizerError) as info:
        quantizer.fake_quantize(w, "q4_k")
    message = str(info.value)
    assert "\n" not in message and "q4_k" in message and "576" in message and "256" in message
    assert "q5_0" in message and "q4_0" in message and "q3_k" not in message.split("use one of", 1)[1]
    for call in (lambda: quantizer.weight_bytes("q6_k", 1536, 576), lambda: quantizer.bits_per_weight("q7_x"),
                 lambda: GgmlQuantizer(["q4_k"], threads=1).fake_quantize(torch.zeros(4, 256), "q8_0")):
        with pytest.raises(QuantizerError) as info:
            call()
        assert "\n" not in str(info.value)


def test_bad_values_are_refused_before_ggml_sees_them(quantizer):
    w = np.zeros((4, 256), np.float32)
    w[1, 3] = np.nan
    with pytest.raises(QuantizerError, match="NaN"):
        quantizer.quantize_bytes(w, "iq3_s")  # ggml would abort the process here
    ok = np.ones((4, 256), np.float32)
    for bad in (np.ones(255, np.float32), -np.ones(256, np.float32), np.full(256, np.inf, np.float32)):
        with pytest.raises(QuantizerError, match="importance"):
            quantizer.quantize_bytes(ok, "q4_k", bad)


def test_settings_identify_values_not_the_type_list(tmp_path):
    a = GgmlQuantizer(["q4_k", "f16"], imatrix="calibration", threads=1)
    b = GgmlQuantizer(["q8_0", "q2_k", "f16"], imatrix="calibration", threads=1)
    assert a.settings() == b.settings() and a.settings()["name"] == "ggml"
    assert GgmlQuantizer(["q4_k", "f16"], imatrix=None).settings()["imatrix"] is None
    path = tmp_path / "imatrix.dat"
    path.write_bytes(b"one")
    first = GgmlQuantizer(["q4_k", "f16"], imatrix=str(path)).settings()
    path.write_bytes(b"two")
    second = GgmlQuantizer(["q4_k", "f16"], imatrix=str(path)).settings()
    assert first["imatrix"]["sha256"] != second["imatrix"]["sha256"] and str(path) not in str(first)


def test_from_settings_and_make_quantizer():
    settings = QuantizerSettings.parse("ggml", "q4_k,Q6_K,f16", imatrix=None)
    q = make_quantizer(settings)
    assert isinstance(q, GgmlQuantizer) and isinstance(q, Quantizer) and q.qtypes == ("f16", "q6_k", "q4_k") and q.unquantized == "f16"
    assert q.bits_per_weight("q4_k") == 4.5 and q.bits_per_weight("f16") == 16
    default = make_quantizer(QuantizerSettings.parse("ggml"))
    assert default.uses_importance and "iq3_s" not in default.qtypes


def test_library_override_must_point_at_the_library(tmp_path, monkeypatch):
    monkeypatch.setenv(LIB_ENV, str(tmp_path))
    with pytest.raises(GgmlLibraryError) as info:
        find_library()
    assert LIB_ENV in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setenv(LIB_ENV, str(Path(llama_cpp.__file__).parent / "lib"))
    assert find_library().name.startswith("libggml-base")
