"""A genome -> a GGUF file llama.cpp loads (Llama-family models, dense float weights in HF layout).

Each matrix is quantised with the given quantise function at its genome type (F16 where the genome says
nothing), written straight to the file and dropped, so peak memory is one tensor. Norms stay F32. The
file appears only once complete (temp file in the target folder, fsync, rename).

Two things differ from the Hugging Face layout, exactly as in llama.cpp's own converter:

- names: ``gguf.get_tensor_name_map(MODEL_ARCH.LLAMA, n_blocks)`` (``blk.3.ffn_down.weight``...);
- q_proj / k_proj rows: Hugging Face stores each head's rotary halves apart, llama.cpp interleaved, so
  the rows are permuted back (:func:`permute_rows`, with the key/value head count for k). A row is
  quantised on its own (blocks run along the input dimension), so permuting rows before or after
  quantising gives the same bytes, and what EMPAS measured on the HF model is what the file holds.

Tied embeddings give one tensor, ``token_embd.weight``; llama.cpp uses it as the output layer too.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from storage.atomic import atomic_file
from .gguf_layout import (ARCH_NAME, DEFAULT_QTYPE, GgufExportError, GgufLayout, TensorSpec, permute_rows,
                          populate_writer)
from .gguf_metadata import hparams_of, metadata_from_gguf, metadata_from_hf

log = logging.getLogger(__name__)

#: (qtype label, weight (out, in) float32, importance (in,) or None) -> the packed rows (uint8 or bytes)
QuantizeFn = Callable[[str, np.ndarray, "np.ndarray | None"], "np.ndarray | bytes"]


def tensor_layout(model) -> GgufLayout:
    """The tensors of ``model``'s GGUF (names, shapes, blocks) without the key/value metadata: enough
    to read a GGUF's weights back, compare files with the model and build preset genomes, for any
    Llama-family model, tokenizer or not. :func:`gguf_layout_for` adds the metadata a writer needs."""
    import gguf

    hp = hparams_of(model)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp.n_layers)
    specs = []
    for hf_name, param in model.named_parameters():  # tied weights are yielded once
        mapped = tmap.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise GgufExportError(f"{hf_name} has no llama.cpp tensor name: this Llama variant is not supported")
        kind, name = mapped
        match = re.match(r"blk\.(\d+)\.", name)
        rope = {gguf.MODEL_TENSOR.ATTN_Q: hp.n_head, gguf.MODEL_TENSOR.ATTN_K: hp.n_head_kv}.get(kind)
        specs.append(TensorSpec(name=name, hf_name=hf_name, shape=tuple(int(d) for d in param.shape),
                                layer=int(match.group(1)) if match else None, rope_heads=rope))
    tied = not any(s.name == "output.weight" for s in specs)
    return GgufLayout(tensors=tuple(specs), metadata={}, hparams=hp, tied_embeddings=tied,
                      alignment=gguf.GGUF_DEFAULT_ALIGNMENT)


def gguf_layout_for(model, tokenizer=None, source_gguf: str | Path | None = None, tokenizer_pre: str | None = None,
                    model_name: str | None = None, model_folder: str | Path | None = None) -> GgufLayout:
    """The layout of ``model``'s GGUF. Metadata from ``source_gguf`` (the GGUF the model was loaded
    from) when given, else from the HF config and ``tokenizer`` (``tokenizer_pre`` for GPT-2-style BPE)."""
    tensors = tensor_layout(model)
    hp = tensors.hparams
    if source_gguf is not None:
        metadata, alignment = metadata_from_gguf(source_gguf, hp)
    else:
        metadata = metadata_from_hf(model, tokenizer, hp, tokenizer_pre, model_name=model_name,
                                    model_folder=model_folder)
        alignment = tensors.alignment
    return replace(tensors, metadata=metadata, alignment=alignment)


def tensor_values(model, spec: TensorSpec) -> np.ndarray:
    """The float32 values of one tensor in the file's row order."""
    import torch

    param = model.get_parameter(spec.hf_name)
    values = param.detach().to(device="cpu", dtype=torch.float32).numpy()
    return permute_rows(values, spec.rope_heads) if spec.rope_heads else values


def gguf_py_quantize(qtype: str, weight: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """gguf-py's own quantisers (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0; byte-identical to ggml's without an
    importance matrix). Other types need EMPAS's ggml quantiser (``profiling.quantizers.ggml``)."""
    import gguf

    if importance is not None:
        raise GgufExportError("gguf-py's quantisers take no importance matrix: use the ggml quantiser "
                              "(profiling.quantizers.ggml) or pass importance=None")
    try:
        return gguf.quants.quantize(np.ascontiguousarray(weight, dtype=np.float32), gguf.GGMLQuantizationType[qtype.upper()])
    except NotImplementedError:
        raise GgufExportError(f"gguf-py cannot quantise to {qtype}: pass the ggml quantiser's quantize function "
                              f"(profiling.quantizers.ggml), or use q8_0, q5_1, q5_0, q4_1, q4_0") from None


def quantize_fn(quantizer) -> QuantizeFn:
    """A quantise function from EMPAS's ggml quantiser (anything with ``quantize_bytes(w, qtype, imp)``)."""
    return lambda qtype, weight, importance=None: quantizer.quantize_bytes(weight, qtype, importance)


def default_quantize(use_importance: bool = False) -> QuantizeFn:
    """ggml's C quantisers (EMPAS's ggml backend, every supported type; importance used when asked),
    or gguf-py's (fewer types, no importance) where llama-cpp-python's libggml-base is missing."""
    try:
        from ..quantizers.ggml import GgmlQuantizer
        from ..quantizers.ggml_types import SUPPORTED

        quantizer = GgmlQuantizer(qtypes=[s.lower() for s in SUPPORTED],
                                  imatrix="calibration" if use_importance else None, threads=1)
    except (ImportError, ValueError) as exc:  # no library: GgmlLibraryError is a ValueError
        log.info("ggml quantiser unavailable (%s): using gguf-py's quantisers", exc)
        return gguf_py_quantize
    return quantize_fn(quantizer)


def write_gguf(path: str | Path, model, layout: GgufLayout, genome: Mapping[str, str],
               quantize: QuantizeFn | object | None = None, importance: Mapping[str, np.ndarray] | None = None,
               default: str = DEFAULT_QTYPE, verify: Callable[[Path], None] | None = None,
               progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Write ``model`` at ``genome`` to ``path``; returns the path. ``quantize``: a :data:`QuantizeFn`, a
    quantiser with ``quantize_bytes`` (EMPAS's ``GgmlQuantizer``: what was profiled is what ships) or
    None for :func:`default_quantize`. ``importance`` maps tensor (GGUF or HF name) -> mean x^2 per input
    column. ``verify(tmp_path)`` runs on the complete temp file before it is
    renamed into place (raise to abandon it). ``progress(done, total, tensor_name)`` after each tensor."""
    import gguf

    types = layout.resolve(genome, default)
    imp = {layout.tensor(k).name: v for k, v in (importance or {}).items()}
    if quantize is None:
        quantize = default_quantize(use_importance=bool(imp))
    elif hasattr(quantize, "quantize_bytes"):
        quantize = quantize_fn(quantize)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH_NAME)
        try:
            populate_writer(writer, layout, types)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for done, spec in enumerate(layout.tensors, 1):
                writer.write_tensor_data(_packed(model, spec, types[spec.name], quantize, imp.get(spec.name)))
                if progress is not None:
                    progress(done, len(layout.tensors), spec.name)
        finally:
            writer.close()
        if verify is not None:
            verify(tmp)
    return Path(path)


def _packed(model, spec: TensorSpec, qtype: str, quantize: QuantizeFn, importance) -> np.ndarray:
    values = tensor_values(model, spec)
    if qtype == "f32":
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == "f16":
        return values.astype(np.float16)
    packed = quantize(qtype, np.ascontiguousarray(values, dtype=np.float32), importance)
    packed = np.frombuffer(packed, dtype=np.uint8) if isinstance(packed, (bytes, bytearray)) else np.asarray(packed)
    if packed.dtype != np.uint8 or packed.nbytes != spec.nbytes(qtype):
        raise GgufExportError(f"the quantiser returned {packed.nbytes} bytes ({packed.dtype}) for {spec.name} at "
                              f"{qtype}, expected {spec.nbytes(qtype)} uint8: check the quantise function")
    return packed


def export_gguf(path: str | Path, model, tokenizer, genome: Mapping[str, str], source_gguf: str | Path | None = None,
                quantize: QuantizeFn | object | None = None, importance: Mapping[str, np.ndarray] | None = None,
                tokenizer_pre: str | None = None, default: str = DEFAULT_QTYPE, model_name: str | None = None,
                model_folder: str | Path | None = None, progress=None) -> Path:
    """Layout + write in one call. Without ``source_gguf`` the tokenizer written from the HF one is
    checked in llama.cpp (same ids on a probe text) before the file is put in place."""
    layout = gguf_layout_for(model, tokenizer, source_gguf, tokenizer_pre, model_name, model_folder)
    verify = None
    if source_gguf is None:
        try:
            from .llamacpp import check_tokenizer
        except ImportError:  # pragma: no cover - llama-cpp-python is optional for writing
            log.warning("llama-cpp-python is not installed: the GGUF's tokenizer is not checked")
        else:
            def verify(tmp: Path) -> None:
                check_tokenizer(tmp, tokenizer)
    return write_gguf(path, model, layout, genome, quantize, importance, default, verify, progress)


def gguf_file_bytes(model, genome: Mapping[str, str], tokenizer=None, source_gguf: str | Path | None = None,
                    tokenizer_pre: str | None = None, default: str = DEFAULT_QTYPE) -> int:
    """The exact byte size of the GGUF :func:`export_gguf` would write (build the layout once and call
    ``layout.file_bytes`` when sizing many genomes)."""
    return gguf_layout_for(model, tokenizer, source_gguf, tokenizer_pre).file_bytes(genome, default)
