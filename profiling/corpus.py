"""Calibration and held-out token sets.

The default corpus is English built at run time from text every Python install carries: the docstrings
of a fixed list of standard-library modules (and their classes and functions). Modules are dealt
alternately to a *calibration* and a *held-out* pool, so the two sets share no sentence. A user text
file (``--text FILE``) is split instead by position: calibration sequences from its start, held-out
sequences from its end, never overlapping.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

# Documentation-rich modules that exist on every CPython >= 3.10 (no platform-only ones).
DEFAULT_CORPUS_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.message", "enum", "fractions", "functools", "getopt", "gettext", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html.parser", "http.client", "http.server", "imaplib", "inspect", "ipaddress",
    "itertools", "json", "logging", "mailbox", "netrc", "numbers", "operator", "optparse", "os",
    "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "sqlite3", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "zipfile",
)


class CorpusError(ValueError):
    pass


@dataclass(frozen=True)
class TokenSets:
    calibration: torch.Tensor  # (n_sequences, seq_len) int64
    heldout: torch.Tensor  # (n_sequences, seq_len) int64
    source: str  # "default" or the text file path
    fingerprint: str  # hash of the token ids of both sets

    @property
    def calibration_tokens(self) -> int:
        return self.calibration.numel()

    @property
    def heldout_tokens(self) -> int:
        return self.heldout.numel()


def _docstrings_of(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    docs = []
    seen: set[int] = set()

    def add(obj) -> None:
        doc = inspect.getdoc(obj)
        if doc and id(obj) not in seen and len(doc) > 80:
            seen.add(id(obj))
            docs.append(doc.strip())

    add(module)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            add(obj)
            if inspect.isclass(obj):
                for meth_name, meth in sorted(vars(obj).items()):
                    if not meth_name.startswith("_") and inspect.isfunction(meth):
                        add(meth)
    return docs


def default_corpus_texts() -> tuple[str, str]:
    """(calibration text, held-out text) from alternate standard-library modules' docstrings."""
    calibration, heldout = [], []
    for i, name in enumerate(DEFAULT_CORPUS_MODULES):
        (calibration if i % 2 == 0 else heldout).extend(_docstrings_of(name))
    return "\n\n".join(calibration), "\n\n".join(heldout)


def read_text_file(path: str | Path) -> str:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read text file {p}: {exc.strerror or exc}; pass an existing plain-text file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{p} is not UTF-8 text (byte {exc.start}): convert it, e.g. `iconv -t UTF-8`") from None
    if not text.strip():
        raise CorpusError(f"{p} is empty: pass a file with plain English text")
    return text


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _shape_for(tokens: int, seq_len: int) -> tuple[int, int]:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise CorpusError(f"token count {tokens!r} must be a positive integer (e.g. 512)")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 1:
        raise CorpusError(f"sequence length {seq_len!r} must be an integer > 1 (e.g. 128)")
    length = min(seq_len, tokens)
    return tokens // length, length


def _cut(ids: torch.Tensor, n_seq: int, length: int, what: str, available_hint: str) -> torch.Tensor:
    need = n_seq * length
    if ids.numel() < need:
        raise CorpusError(
            f"{what} needs {need} tokens but the text has only {ids.numel()}{available_hint}: "
            f"ask for fewer tokens or pass a longer --text file"
        )
    return ids[:need].reshape(n_seq, length).contiguous()


def validate_token_options(calib_tokens: int, heldout_tokens: int, seq_len: int, text_file=None) -> None:
    """Cheap checks of the options, so bad input fails before a model is loaded."""
    _shape_for(calib_tokens, seq_len)
    _shape_for(heldout_tokens, seq_len)
    if text_file is not None:
        read_text_file(text_file)


def build_token_sets(tokenizer, calib_tokens: int = 512, heldout_tokens: int = 512, seq_len: int = 128,
                     text_file: str | Path | None = None) -> TokenSets:
    """Deterministic, disjoint calibration and held-out token sets."""
    calib_shape = _shape_for(calib_tokens, seq_len)
    held_shape = _shape_for(heldout_tokens, seq_len)
    if text_file is None:
        calib_text, held_text = default_corpus_texts()
        calib = _cut(_tokenize(tokenizer, calib_text), *calib_shape, "calibration", " (default corpus)")
        held = _cut(_tokenize(tokenizer, held_text), *held_shape, "held-out set", " (default corpus)")
        source = "default"
    else:
        ids = _tokenize(tokenizer, read_text_file(text_file))
        need = calib_shape[0] * calib_shape[1] + held_shape[0] * held_shape[1]
        if ids.numel() < need:
            raise CorpusError(
                f"calibration + held-out need {need} tokens but {text_file} has only {ids.numel()}: "
                f"ask for fewer tokens (--calib-tokens/--heldout-tokens) or pass a longer file"
            )
        calib = _cut(ids, *calib_shape, "calibration", "")
        held = _cut(ids[ids.numel() - held_shape[0] * held_shape[1]:], *held_shape, "held-out set", "")
        source = str(Path(text_file).resolve())
    digest = hashlib.sha256()
    for t in (calib, held):
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return TokenSets(calibration=calib, heldout=held, source=source, fingerprint=digest.hexdigest()[:16])
