"""llama.cpp's quantisation presets as genomes: the type ``llama-quantize`` gives each tensor.

These are the baselines EMPAS's genomes compete with, so they follow ``llama_tensor_get_type`` in
llama.cpp's ``src/llama-quant.cpp`` (dense Llama models, no importance-matrix-only presets) rule by rule:

- the output matrix, and the token embedding when it is tied to the output: Q8_0 when the row length is
  not a multiple of the preset's block size, else Q6_K (unless the preset is Q8_0);
- ``attn_v``: Q2_K -> Q4_K if n_head / n_head_kv >= 4 else Q3_K; Q3_K_M -> Q5_K for the first two, else
  Q4_K; Q4_K_M and Q5_K_M -> Q6_K where ``use_more_bits``; an 80-layer GQA model (llama.cpp's "70B")
  gets Q5_K instead of Q3_K/Q4_K;
- ``ffn_down``: Q2_K -> Q3_K; Q3_K_M -> Q5_K below n/16, else Q4_K; Q4_K_M and Q5_K_M -> Q6_K where
  ``use_more_bits``; Q4_0 with an importance matrix -> Q4_1 below n/8;
- ``attn_output``: Q2_K -> Q3_K, Q3_K_M -> Q4_K;
- then the shape fallback (:func:`ggml_types.fallback_for`) when the row length does not fit the type.

``use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` (integer division). llama.cpp
counts ``attn_v`` and ``ffn_down`` tensors in its own tensor order, which visits blocks in increasing
order, so for a dense Llama the counter is the block index used here. The tests check every tensor
against what ``llama_model_quantize`` writes.
"""

from __future__ import annotations

from ..quantizers.ggml_types import fallback_for, ggml_type
from .gguf_layout import GgufExportError, GgufLayout, LlamaHparams

#: preset -> the type of every other quantised matrix (llama_ftype_get_default_type)
PRESET_BASE = {"Q8_0": "q8_0", "Q6_K": "q6_k", "Q5_K_M": "q5_k", "Q4_K_M": "q4_k", "Q3_K_M": "q3_k",
               "Q2_K": "q2_k", "Q4_0": "q4_0"}
PRESETS = tuple(PRESET_BASE)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _category(name: str) -> str:
    """llama.cpp's tensor category, by the same name tests (tensor_get_category)."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for part in ("attn_v.weight", "attn_k.weight", "attn_q.weight", "attn_output.weight", "ffn_up", "ffn_gate",
                 "ffn_down"):
        if part in name:
            return part.removesuffix(".weight")
    return "other"


def preset_tensor_type(preset: str, name: str, in_features: int, layer: int | None, hparams: LlamaHparams,
                       tied_embeddings: bool, has_imatrix: bool = False) -> str:
    """The qtype ``llama-quantize <preset>`` gives the matrix ``name`` with rows of ``in_features``."""
    key = preset.strip().upper()
    if key not in PRESET_BASE:
        raise GgufExportError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    if hparams.n_expert > 1:
        raise GgufExportError("preset genomes cover dense models; mixture-of-experts rules are not implemented")
    qtype = PRESET_BASE[key]
    category = _category(name)
    n = hparams.n_layers
    is_70b = n == 80 and hparams.n_head != hparams.n_head_kv  # llama.cpp's LLM_TYPE_70B for Llama
    if category == "output" or (tied_embeddings and category == "token_embd"):
        if in_features % ggml_type(qtype).block_size != 0:
            qtype = "q8_0"
        elif qtype != "q8_0":
            qtype = "q6_k"
    elif category == "attn_v":
        i = _layer(name, layer)
        if key == "Q2_K":
            qtype = "q4_k" if hparams.n_gqa >= 4 else "q3_k"
        elif key == "Q3_K_M":
            qtype = "q5_k" if i < 2 else "q4_k"
        elif key in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            qtype = "q6_k"
        if is_70b and qtype in ("q3_k", "q4_k"):
            qtype = "q5_k"
    elif category == "ffn_down":
        i = _layer(name, layer)
        if key == "Q2_K":
            qtype = "q3_k"
        elif key == "Q3_K_M":
            qtype = "q5_k" if i < n // 16 else "q4_k"
        elif key in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            qtype = "q6_k"
        elif key == "Q4_0" and has_imatrix and i < n // 8:
            qtype = "q4_1"
    elif category == "attn_output":
        qtype = {"Q2_K": "q3_k", "Q3_K_M": "q4_k"}.get(key, qtype)
    return fallback_for(qtype, in_features)


def _layer(name: str, layer: int | None) -> int:
    if layer is None:
        raise GgufExportError(f"{name} has no block index: preset rules need one for attn_v and ffn_down")
    return layer


def preset_genome(preset: str, layout: GgufLayout, has_imatrix: bool = False, by: str = "gguf") -> dict[str, str]:
    """Every matrix of ``layout`` -> its type under ``preset``, keyed by GGUF name (``by="gguf"``) or
    Hugging Face parameter path (``by="hf"``)."""
    if by not in ("gguf", "hf"):
        raise GgufExportError(f"by must be 'gguf' or 'hf', not {by!r}")
    return {(t.name if by == "gguf" else t.hf_name): preset_tensor_type(
        preset, t.name, t.in_features, t.layer, layout.hparams, layout.tied_embeddings, has_imatrix)
        for t in layout.matrices}

