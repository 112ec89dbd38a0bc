"""The key/value metadata of a Llama-family GGUF: hyper-parameters and the tokenizer.

When the model came from a GGUF (the embedded SmolLM2 did), its own file already holds everything
llama.cpp needs, tokenizer included, so it is copied as it is. Otherwise the metadata comes from
gguf-py's converter helpers (``GGUFWriter.add_*``, ``gguf.Metadata``, the ``gguf.vocab`` classes that
llama.cpp's own converters use) over the Hugging Face config and the tokenizer saved to a temporary
folder. No tokenizer field is written by hand here: a GPT-2-style BPE tokenizer needs the name of its
llama.cpp pre-tokenizer (llama.cpp's converter finds it by hashing a probe text against a table that is
not part of any package), so the caller passes it, and the written file is checked by tokenising a probe
text in llama.cpp (:func:`profiling.deploy.llamacpp.check_tokenizer`).
"""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

from .gguf_layout import ARCH_NAME, GgufExportError, LlamaHparams

#: keys the writer sets itself, never copied from the source file
_WRITER_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


class TokenizerError(GgufExportError):
    """The model has no tokenizer llama.cpp can use."""


def hparams_of(model) -> LlamaHparams:
    """The Llama hyper-parameters of a transformers model (one-line error for other architectures)."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise GgufExportError(f"GGUF export supports Llama-family models (model_type 'llama'), not {model_type!r}")
    if getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0):
        raise GgufExportError("GGUF export does not support mixture-of-experts models yet")
    n_head = config.num_attention_heads
    return LlamaHparams(n_layers=config.num_hidden_layers, n_head=n_head,
                        n_head_kv=getattr(config, "num_key_value_heads", None) or n_head,
                        n_embd=config.hidden_size, n_vocab=model.get_input_embeddings().weight.shape[0])


# -- from the model's own GGUF ----------------------------------------------------------------------------

def metadata_from_gguf(path: str | Path, hparams: LlamaHparams) -> tuple[dict, int]:
    """(key -> GGUFValue, alignment) copied from ``path``, checked against the model's hyper-parameters."""
    p = Path(path)
    if not p.is_file():
        raise GgufExportError(f"{p} does not exist: pass an existing .gguf file")
    stat = p.stat()
    metadata, alignment = _cached_metadata(str(p.resolve()), stat.st_size, stat.st_mtime_ns, hparams)
    return dict(metadata), alignment


@lru_cache(maxsize=4)
def _cached_metadata(path: str, _size: int, _mtime_ns: int, hparams: LlamaHparams) -> tuple[dict, int]:
    """Reading a 49k-token vocabulary with gguf-py takes seconds: do it once per file version."""
    import gguf
    from gguf.gguf_writer import GGUFValue

    reader = read_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch != ARCH_NAME:
        raise GgufExportError(f"{path} is a {arch!r} GGUF; GGUF export supports {ARCH_NAME!r} models")
    expected = {"block_count": hparams.n_layers, "embedding_length": hparams.n_embd,
                "attention.head_count": hparams.n_head, "attention.head_count_kv": hparams.n_head_kv}
    for key, want in expected.items():
        have = _field(reader, f"{ARCH_NAME}.{key}")
        if have is not None and have != want:
            raise GgufExportError(f"{path} does not describe this model ({ARCH_NAME}.{key} is {have}, the model "
                                  f"has {want}): pass the GGUF the model was loaded from, or none")
    if _field(reader, "tokenizer.ggml.model") is None:
        raise TokenizerError(f"{path} has no tokenizer llama.cpp can use: it lacks tokenizer.ggml.model")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.data) != hparams.n_vocab:
        raise TokenizerError(f"{path} has no tokenizer llama.cpp can use: {len(tokens.data)} tokens for an "
                             f"embedding of {hparams.n_vocab} rows")
    metadata = {}
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "split.")) or field.name in _WRITER_KEYS:
            continue
        vtype = field.types[0]
        sub_type = None
        if vtype == gguf.GGUFValueType.ARRAY:
            if len(field.types) != 2:
                raise GgufExportError(f"{path}: key {field.name} is a nested array, which cannot be copied")
            sub_type = field.types[1]
        metadata[field.name] = GGUFValue(value=field.contents(), type=vtype, sub_type=sub_type)
    alignment = _field(reader, "general.alignment") or gguf.GGUF_DEFAULT_ALIGNMENT
    return metadata, int(alignment)


def read_gguf(path: str | Path):
    """``gguf.GGUFReader`` over ``path``, or a one-line error when it is not a GGUF file."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise GgufExportError(f"{p} does not exist: pass an existing .gguf file")
    try:
        return gguf.GGUFReader(p)
    except (ValueError, OSError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GgufExportError(f"{p} is not a readable GGUF file ({first}): pass a .gguf made by llama.cpp or EMPAS") from None


def _field(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


# -- from the Hugging Face config and tokenizer -----------------------------------------------------------

def metadata_from_hf(model, tokenizer, hparams: LlamaHparams, tokenizer_pre: str | None = None,
                     model_name: str | None = None, model_folder: str | Path | None = None) -> dict:
    """Key -> GGUFValue for a model without a GGUF, through gguf-py's converter helpers."""
    import gguf

    scratch = gguf.GGUFWriter(None, ARCH_NAME)  # collects key/values only, never opens a file
    folder = Path(model_folder) if model_folder and Path(model_folder).is_dir() else None
    total = sum(p.numel() for p in model.parameters())
    meta = gguf.Metadata.load(model_path=folder, model_name=model_name, total_params=total)
    if meta.name is None:
        meta.name = model_name or getattr(model.config, "name_or_path", None) or "model"
    scratch.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(scratch)
    _add_hparams(scratch, model.config, hparams)
    _add_tokenizer(scratch, tokenizer, hparams.n_vocab, tokenizer_pre)
    return {k: v for k, v in scratch.kv_data[0].items() if k not in _WRITER_KEYS}


def _add_hparams(w, config, hp: LlamaHparams) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or hp.n_embd // hp.n_head
    w.add_block_count(hp.n_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(hp.n_embd)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(hp.n_vocab)
    w.add_rope_dimension_count(head_dim)
    if head_dim * hp.n_head != hp.n_embd:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        w.add_rope_freq_base(float(theta))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type != "default":
        raise GgufExportError(f"GGUF export does not support rope scaling {rope_type!r} yet (only none and linear)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GgufExportError("GGUF export does not support Llama models with biases yet")


def _add_tokenizer(w, tokenizer, n_vocab: int, tokenizer_pre: str | None) -> None:
    """Tokens, merges and special ids the way llama.cpp's Llama converter does: SentencePiece first,
    then a Hugging Face Llama (byte-fallback BPE) tokenizer, then GPT-2-style BPE."""
    import gguf

    if tokenizer is None:
        raise TokenizerError("the model has no tokenizer llama.cpp can use: none was given; load the model "
                             "with its Hugging Face tokenizer, or pass the GGUF it came from")
    who = type(tokenizer).__name__
    if not hasattr(tokenizer, "save_pretrained"):
        raise TokenizerError(f"the model has no tokenizer llama.cpp can use: {who} cannot be saved "
                             f"(no save_pretrained); load the model with its Hugging Face tokenizer")
    with tempfile.TemporaryDirectory(prefix="empas-tokenizer-") as tmp:
        folder = Path(tmp)
        try:
            tokenizer.save_pretrained(folder)
        except Exception as exc:  # transformers raises many kinds here
            raise TokenizerError(f"the model has no tokenizer llama.cpp can use: saving {who} failed ({exc})") from None
        reasons = []
        for vocab_class in (gguf.SentencePieceVocab, gguf.LlamaHfVocab, gguf.BpeVocab):
            try:
                vocab = vocab_class(folder)
            except (FileNotFoundError, RuntimeError, TypeError, ValueError, KeyError, ImportError) as exc:
                reasons.append(f"{vocab_class.__name__}: {exc}")
                continue
            break
        else:
            raise TokenizerError(f"the model has no tokenizer llama.cpp can use: {'; '.join(reasons)}")
        if (folder / "tokenizer.model").is_file() and not isinstance(vocab, gguf.SentencePieceVocab):
            # the HF fallback gives every piece the same score, which llama.cpp's SentencePiece
            # tokenizer cannot split by: only the real model file gives the right tokens
            raise TokenizerError(f"the model has no tokenizer llama.cpp can use without sentencepiece: "
                                 f"{reasons[0]}; run `pip install sentencepiece`")
        tokens, scores, types = [], [], []
        for text, score, toktype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(toktype)
        if len(tokens) != n_vocab:
            raise TokenizerError(f"the model has no tokenizer llama.cpp can use: {who} has {len(tokens)} tokens "
                                 f"but the embedding has {n_vocab} rows")
        is_bpe = isinstance(vocab, gguf.BpeVocab)
        if is_bpe and not tokenizer_pre:
            raise TokenizerError(
                "the model has no tokenizer llama.cpp can use without its pre-tokenizer name: this GPT-2-style "
                "BPE tokenizer needs tokenizer_pre (llama.cpp's name for it, e.g. 'llama-bpe' for Llama 3, "
                "'smollm', 'gpt-2'; llama.cpp's convert_hf_to_gguf.py get_vocab_base_pre lists them)")
        w.add_tokenizer_model(vocab.tokenizer_model)
        w.add_tokenizer_pre(tokenizer_pre if is_bpe else "default")
        w.add_token_list(tokens)
        if not is_bpe:
            w.add_token_scores(scores)
        w.add_token_types(types)
        gguf.SpecialVocab(folder, load_merges=is_bpe, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
