"""Command-line options built from the engine's settings modules, and back.

Every default shown in ``--help`` comes from :mod:`profiling.settings` / :mod:`search.settings`, the
same values the TUI's setup form starts with. Options default to ``None`` in argparse so a command
knows which ones the user gave (a resumed study refuses a contradicting one).
"""

from __future__ import annotations

import argparse

from profiling import settings as ps
from profiling.settings import ProfileSettings, QuantizerSettings

PROFILE_FIELDS = {"model": "model", "granularity": "granularity", "metric": "metric", "profile_mode": "mode", "calib_tokens": "calib_tokens",
                  "heldout_tokens": "heldout_tokens", "seq_len": "seq_len", "text": "text_file",
                  "include_embeddings": "include_embeddings", "device": "device", "dtype": "dtype",
                  "max_memory_mib": "max_memory_mib", "stream": "stream"}


def add_storage_option(p) -> None:
    p.add_argument("--storage", default=None,
                   help="SQLite file or SQLAlchemy URL for profiles and studies "
                        "(default: $EMPAS_STORAGE or ./empas.db)")


def add_model_options(p) -> None:
    """The options of a profile: model, genes, quantiser, metric, tokens, device."""
    from profiling.quantizers.ggml_types import DEFAULT_TYPES

    p.add_argument("--model", default=None,
                   help="Hugging Face id, local folder or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--granularity", choices=ps.GRANULARITIES, default=None,
                   help=f"one gene per decoder block or per linear layer (default: {ps.DEFAULT_GRANULARITY})")
    p.add_argument("--quantizer", choices=ps.QUANTIZER_NAMES, default=None,
                   help=f"ggml: llama.cpp's types, ships as GGUF; rtn: EMPAS's round-to-nearest, ships as a packed "
                        f"checkpoint (default: {ps.DEFAULT_QUANTIZER})")
    p.add_argument("--types", default=None, metavar="LIST",
                   help="ggml types offered to each gene, comma-separated (default: "
                        f"{','.join(t.lower() for t in DEFAULT_TYPES)}; each gene gets the ones that fit its shape)")
    p.add_argument("--bits", default=None, metavar="LIST",
                   help=f"rtn bit-widths, 2-8 or 16 (default: {','.join(ps.DEFAULT_RTN_BITS)})")
    p.add_argument("--group-size", type=int, default=None,
                   help=f"rtn group size in input columns (default {ps.DEFAULT_GROUP_SIZE})")
    p.add_argument("--imatrix", default=None, metavar="FILE",
                   help="ggml: importance matrix from llama-imatrix (default: collected on the calibration text)")
    p.add_argument("--include-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="make the token embedding and output head genes (default: yes with ggml, no with rtn)")
    p.add_argument("--metric", choices=ps.METRICS, default=None,
                   help="sensitivity metric: measured KL (default) or the fast Fisher estimate")
    p.add_argument("--profile-mode", choices=ps.PROFILE_MODES, default=None,
                   help=f"how a KL profile is measured: fast (screen, skip the cells that cannot matter, measure "
                        f"the rest exactly) or exact (every cell on every token) (default: {ps.DEFAULT_PROFILE_MODE})")
    p.add_argument("--calib-tokens", type=int, default=None,
                   help=f"calibration tokens (default {ps.DEFAULT_CALIB_TOKENS})")
    p.add_argument("--heldout-tokens", type=int, default=None,
                   help=f"held-out tokens (default {ps.DEFAULT_HELDOUT_TOKENS})")
    p.add_argument("--seq-len", type=int, default=None, help=f"tokens per sequence (default {ps.DEFAULT_SEQ_LEN})")
    p.add_argument("--text", default=None, help="plain-text file for calibration/held-out (default: built-in corpus)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda[:N] or mps (default auto)")
    p.add_argument("--dtype", default=None, choices=ps.DTYPES,
                   help="compute dtype (default auto: bfloat16 on a GPU, float32 on the CPU)")
    add_memory_options(p)


def add_memory_options(p) -> None:
    p.add_argument("--max-memory-mib", type=int, default=None, metavar="N",
                   help="cap on resident weights: a model larger than N MiB runs block by block from its "
                        "safetensors files (default: no cap, the whole model in memory)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="always run block by block from disk (default: only when over --max-memory-mib)")


def check_placement(settings: ProfileSettings) -> None:
    """Device, dtype and memory cap checked against this machine and the model's config (no weights
    read), so a bad one fails before anything is written."""
    if settings.device == "auto" and settings.dtype == "auto" and settings.max_memory_mib is None \
            and not settings.stream:
        return
    from profiling.devices import resolve_device

    placement = resolve_device(settings.device, settings.dtype)
    if settings.max_memory_mib is not None or settings.stream:
        from profiling.streaming import plan_streaming

        plan, _ = plan_streaming(settings, placement)
        if plan.stream and settings.metric == "fisher":
            raise ps.SettingsError(ps.STREAMED_FISHER)


def explicit_profile_options(args) -> set[str]:
    """Which profile options the user gave (``qtypes`` for --bits/--types/--quantizer)."""
    given = {name for name in PROFILE_FIELDS if getattr(args, name, None) is not None}
    if any(getattr(args, k, None) is not None for k in ("bits", "types", "quantizer", "group_size", "imatrix")):
        given.add("qtypes")
    return given


def profile_settings(args) -> ProfileSettings:
    """The :class:`ProfileSettings` of the flags (defaults from the settings module), validated."""
    name = args.quantizer
    if name is None:
        name = "rtn" if (args.bits is not None or args.group_size is not None) and args.types is None \
            else ps.DEFAULT_QUANTIZER
    if name == "rtn" and args.types is not None:
        raise ps.QuantizerError("--types lists ggml types: pass --bits with --quantizer rtn")
    if name == "ggml" and (args.bits is not None or args.group_size is not None):
        raise ps.QuantizerError("--bits and --group-size are RTN options: pass --types with --quantizer ggml")
    imatrix = "calibration" if args.imatrix is None else args.imatrix
    quantizer = QuantizerSettings.parse(name, args.bits if name == "rtn" else args.types, args.group_size,
                                        imatrix=imatrix if name == "ggml" else None)
    kwargs = {field: getattr(args, opt) for opt, field in PROFILE_FIELDS.items() if getattr(args, opt, None) is not None}
    settings = ProfileSettings(quantizer=quantizer, **kwargs).validate()
    check_placement(settings)
    return settings
