"""Running a GGUF in llama.cpp (through llama-cpp-python): load, generate, logits, PPL / KL, quantise.

Everything runs on the CPU build that ``pip install llama-cpp-python`` makes. Timings are wall-clock in
this process, measured around llama.cpp's calls: prompt processing (one batched ``eval`` of the prompt)
and generation (greedy sampling plus one ``eval`` per new token) are timed apart, and every result says
how many threads and which CPU it ran on.

Held-out perplexity and KL use EMPAS's own definitions (:func:`profiling.runner.next_token_loss`,
:class:`profiling.runner.DenseReference`, whose KL sums in float64), over logits llama.cpp returns for
every position, so the numbers compare directly with the ones measured in PyTorch. Each sequence is
evaluated from an empty context, like the PyTorch side.

llama.cpp reports failures through its log; while a call runs, its error lines are captured so the
exception can say what went wrong in one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

import numpy as np

if TYPE_CHECKING:  # annotations only: a GGUF run needs no torch until it compares logits
    import torch

from storage.atomic import atomic_file
from .gguf_layout import GgufExportError, file_type_for, parse_tensor_types_text, tensor_types_text
from .gguf_metadata import TokenizerError

GGUF_MAGIC = b"GGUF"
#: a probe for tokenizer checks: words, digits, punctuation, whitespace runs, accents, CJK, emoji
TOKENIZER_PROBE = ("Hello world! The year 2024 had 365 days; 3.14159 is pi.\n\n\tIndented  text,  "
                   "naïve café, 東京, 🙂 — \"quotes\" and 'apostrophes' don't matter.")


class LlamaCppError(ValueError):
    """llama.cpp could not load, run or quantise a file; the message is one line naming the fix."""


# -- llama.cpp's log ---------------------------------------------------------------------------------

_capture_stack: list[list[str]] = []


def _make_log_callback():
    import llama_cpp

    @llama_cpp.llama_log_callback
    def callback(level, text, _user_data):
        if _capture_stack and level == 3:  # GGML_LOG_LEVEL_ERROR
            _capture_stack[-1].append(text.decode("utf-8", errors="replace"))
    return callback


_callback = None


@contextlib.contextmanager
def _llama_errors() -> Iterator[list[str]]:
    """Collect llama.cpp's error lines (and keep its other output quiet) while the block runs."""
    global _callback
    import llama_cpp
    from llama_cpp import _logger

    if _callback is None:
        _callback = _make_log_callback()
    lines: list[str] = []
    _capture_stack.append(lines)
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        _capture_stack.pop()
        if not _capture_stack:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _last_error(lines: list[str], fallback: str) -> str:
    text = " ".join(" ".join(lines).split())
    return text[-300:] if text else fallback


def _require_gguf(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise LlamaCppError(f"{p} does not exist: pass an existing .gguf file")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise LlamaCppError(f"{p} is not a GGUF file (it starts with {magic!r}, not b'GGUF'): pass a .gguf file")
    return p


# -- loading and running ------------------------------------------------------------------------------

def hardware_description() -> str:
    """The CPU this process runs on, for labelling timings."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} logical CPUs"


def load_gguf(path: str | Path, n_threads: int = 1, n_ctx: int = 512, logits_all: bool = False,
              vocab_only: bool = False):
    """A ``llama_cpp.Llama`` over ``path`` (verbose off), or a one-line :class:`LlamaCppError`."""
    p = _require_gguf(path)
    from llama_cpp import Llama

    with _llama_errors() as errors:
        try:
            return Llama(model_path=str(p), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=n_threads,
                         n_threads_batch=n_threads, logits_all=logits_all, vocab_only=vocab_only, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise LlamaCppError(f"llama.cpp cannot load {p}: {_last_error(errors, str(exc))}") from None


def timed_load(path: str | Path, n_threads: int = 1, n_ctx: int = 512, logits_all: bool = False):
    """(model, seconds): load time measured, as llama.cpp maps the file and builds its context."""
    start = time.perf_counter()
    llm = load_gguf(path, n_threads=n_threads, n_ctx=n_ctx, logits_all=logits_all)
    return llm, time.perf_counter() - start


@dataclass(frozen=True)
class Generation:
    """A greedy generation with its measured timings."""

    text: str
    prompt_tokens: int
    new_tokens: int
    prompt_seconds: float  # one batched eval of the prompt
    generation_seconds: float  # sampling + one eval per new token, after the prompt
    n_threads: int
    hardware: str

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else float("nan")

    @property
    def generation_tokens_per_s(self) -> float:
        return self.new_tokens / self.generation_seconds if self.generation_seconds > 0 else float("nan")


def default_threads() -> int:
    """llama-cpp-python's own default thread count (half the logical CPUs: about the physical cores)."""
    return max(1, (os.cpu_count() or 2) // 2)


def chat_prompt(llm, text: str) -> str:
    """``text`` as one user message in the file's own chat template (``tokenizer.chat_template``),
    rendered the way llama-cpp-python's chat completion renders it."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise LlamaCppError("this GGUF has no chat template (tokenizer.chat_template): drop --chat")

    def text_of(token: int) -> str:
        return llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    formatter = Jinja2ChatFormatter(template=template, eos_token=text_of(llm.token_eos()),
                                    bos_token=text_of(llm.token_bos()))
    try:
        return formatter(messages=[{"role": "user", "content": text}]).prompt
    except Exception as exc:  # jinja2 errors of a broken template
        raise LlamaCppError(f"the GGUF's chat template failed ({type(exc).__name__}: {exc}): drop --chat") from None


def generate(llm, prompt: str, max_new_tokens: int = 64, stop_at_eos: bool = True, chat: bool = False) -> Generation:
    """Greedy continuation of ``prompt`` (BOS added when the model's vocabulary asks for it). With
    ``chat``, the prompt is one user message in the file's chat template (special tokens parsed, no
    extra BOS: the template writes what it needs)."""
    if chat:
        ids = llm.tokenize(chat_prompt(llm, prompt).encode("utf-8"), add_bos=False, special=True)
    else:
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
    if not ids:
        raise LlamaCppError("the prompt is empty: pass some text")
    if len(ids) + max_new_tokens > llm.n_ctx():
        raise LlamaCppError(f"prompt ({len(ids)} tokens) + {max_new_tokens} new tokens exceed the context of "
                            f"{llm.n_ctx()}: load with a larger n_ctx or ask for fewer tokens")
    eos = llm.token_eos()
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prompt_done = time.perf_counter()
    out: list[int] = []
    for i in range(max_new_tokens):
        token = llm.sample(temp=0.0)
        if stop_at_eos and token == eos:
            break
        out.append(token)
        if i + 1 < max_new_tokens:
            llm.eval([token])
    end = time.perf_counter()
    return Generation(text=llm.detokenize(out).decode("utf-8", errors="replace"), prompt_tokens=len(ids),
                      new_tokens=len(out), prompt_seconds=prompt_done - start, generation_seconds=end - prompt_done,
                      n_threads=llm.n_threads, hardware=hardware_description())


def sequence_logits(llm, tokens) -> "torch.Tensor":
    """Logits at every position of each row of ``tokens`` (n_seq, seq_len), each row from an empty
    context: float32 tensor (n_seq, seq_len, vocab). ``llm`` must be loaded with ``logits_all=True``."""
    import torch

    rows = np.asarray(tokens, dtype=np.int64)
    if rows.ndim != 2:
        raise LlamaCppError(f"tokens must be (n_sequences, seq_len), got shape {rows.shape}")
    n_seq, length = rows.shape
    if length > llm.n_ctx():
        raise LlamaCppError(f"sequences of {length} tokens exceed the context of {llm.n_ctx()}: load with n_ctx >= {length}")
    if not getattr(llm, "_logits_all", True):
        raise LlamaCppError("the model was loaded without logits_all=True: reload it with load_gguf(..., logits_all=True)")
    out = torch.empty((n_seq, length, llm.n_vocab()), dtype=torch.float32)
    for i, row in enumerate(rows):
        llm.reset()
        llm.eval(row.tolist())
        out[i] = torch.from_numpy(np.array(llm.scores[:length], dtype=np.float32))
    llm.reset()
    return out


@dataclass(frozen=True)
class GgufEvaluation:
    """Held-out quality of one GGUF, measured in llama.cpp."""

    path: str
    file_bytes: int
    loss: float  # mean next-token cross-entropy (nats)
    ppl: float
    kl: float | None  # mean KL(reference || this file) per token, None without a reference
    tokens: int
    seconds: float  # evaluating all sequences (prompt processing only)
    n_threads: int
    hardware: str


def gguf_logits(path: str | Path, tokens, n_threads: int = 1) -> "torch.Tensor":
    """Load ``path`` and return :func:`sequence_logits` for ``tokens``."""
    length = int(np.asarray(tokens).shape[-1])
    llm = load_gguf(path, n_threads=n_threads, n_ctx=length, logits_all=True)
    try:
        return sequence_logits(llm, tokens)
    finally:
        llm.close()


def evaluate_gguf(path: str | Path, tokens, reference=None, n_threads: int = 1) -> GgufEvaluation:
    """Held-out loss/PPL of ``path`` on ``tokens`` (n_seq, seq_len) and, with ``reference`` (a
    :class:`profiling.runner.DenseReference`, e.g. of the F16 GGUF's logits), the mean KL to it."""
    import math

    import torch

    from ..runner import next_token_loss

    start = time.perf_counter()
    logits = gguf_logits(path, tokens, n_threads)
    seconds = time.perf_counter() - start
    tokens_t = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    loss = next_token_loss(logits, tokens_t)
    kl = reference.mean_kl(logits) if reference is not None else None
    return GgufEvaluation(path=str(path), file_bytes=os.path.getsize(path), loss=loss, ppl=math.exp(loss), kl=kl,
                          tokens=int(tokens_t.numel()), seconds=seconds, n_threads=n_threads,
                          hardware=hardware_description())


def reference_for(path: str | Path, tokens, n_threads: int = 1):
    """The :class:`profiling.runner.DenseReference` of a GGUF's logits (e.g. the F16 file's)."""
    from ..runner import DenseReference

    return DenseReference(gguf_logits(path, tokens, n_threads))


def check_tokenizer(path: str | Path, hf_tokenizer, text: str = TOKENIZER_PROBE) -> None:
    """Raise :class:`TokenizerError` unless llama.cpp tokenises ``text`` with ``path``'s vocabulary
    exactly as ``hf_tokenizer`` does (no special tokens on either side)."""
    llm = load_gguf(path, vocab_only=True)
    try:
        ours = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        llm.close()
    theirs = list(hf_tokenizer(text, add_special_tokens=False)["input_ids"])
    if ours != theirs:
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise TokenizerError(f"the model has no tokenizer llama.cpp can use as written: llama.cpp splits a probe "
                             f"text differently from {type(hf_tokenizer).__name__} (first difference at token "
                             f"{first}); pass the right tokenizer_pre, or the GGUF the model came from")


# -- reading a GGUF's tensor table in C -------------------------------------------------------------------

class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


_ggml_base_lib = None


def _ggml_base():
    """ggml's own GGUF parser in the shipped libggml-base (gguf-py's reader takes seconds on a 49k-token
    vocabulary; this takes milliseconds)."""
    global _ggml_base_lib
    if _ggml_base_lib is None:
        import llama_cpp

        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
        lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GgufInitParams]
        lib.gguf_init_from_file.restype = ctypes.c_void_p
        lib.gguf_free.argtypes = [ctypes.c_void_p]
        lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
        lib.gguf_get_n_tensors.restype = ctypes.c_int64
        lib.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.gguf_get_tensor_name.restype = ctypes.c_char_p
        lib.gguf_get_tensor_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.gguf_get_tensor_type.restype = ctypes.c_int
        _ggml_base_lib = lib
    return _ggml_base_lib


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """Tensor name -> type label ("q4_k", "f32"...) of a GGUF file, in file order."""
    from gguf.constants import GGMLQuantizationType

    p = _require_gguf(path)
    lib = _ggml_base()
    with _llama_errors() as errors:
        ctx = lib.gguf_init_from_file(str(p).encode("utf-8"), _GgufInitParams(True, None))
        if not ctx:
            raise LlamaCppError(f"llama.cpp cannot read the GGUF header of {p}: {_last_error(errors, 'corrupt file')}")
    try:
        out = {}
        for i in range(lib.gguf_get_n_tensors(ctx)):
            type_id = lib.gguf_get_tensor_type(ctx, i)
            try:
                label = GGMLQuantizationType(type_id).name.lower()
            except ValueError:
                label = f"type{type_id}"
            out[lib.gguf_get_tensor_name(ctx, i).decode("utf-8")] = label
        return out
    finally:
        lib.gguf_free(ctx)


# -- llama_model_quantize -----------------------------------------------------------------------------

_backend_ready = False


def _backend() -> None:
    global _backend_ready
    import llama_cpp

    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True


def _type_id(name: str) -> int:
    from gguf.constants import GGMLQuantizationType

    try:
        return int(GGMLQuantizationType[name.strip().upper()])
    except KeyError:
        raise LlamaCppError(f"unknown ggml type {name!r}: use e.g. Q4_K, Q6_K, Q8_0, F16") from None


def quantize_with_llamacpp(src_gguf: str | Path, dst: str | Path, preset_or_type: str, pure: bool = False,
                           imatrix: Mapping[str, np.ndarray] | None = None,
                           tensor_types: str | Mapping[str, str] | None = None, n_threads: int = 1) -> Path:
    """``llama-quantize`` through its C API: ``src_gguf`` (F16/F32 weights) -> ``dst`` at a preset
    ("Q4_K_M", "Q6_K"...) or, with ``pure``, one type for every matrix. ``imatrix``: GGUF tensor name ->
    importance per input column. ``tensor_types``: a ``--tensor-type-file`` text or GGUF name -> type,
    applied before llama.cpp's own rules (and its shape fallbacks after). Written atomically."""
    import llama_cpp

    src = _require_gguf(src_gguf)
    try:
        ftype = file_type_for(preset_or_type)
    except GgufExportError as exc:
        raise LlamaCppError(str(exc)) from None
    _backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads
    params.pure = pure
    keep_alive = []  # ctypes arrays and their buffers must outlive the call
    if tensor_types is not None:
        text = tensor_types if isinstance(tensor_types, str) else tensor_types_text(tensor_types)
        pairs = parse_tensor_types_text(text)
        overrides = (llama_cpp.llama_model_tensor_override * (len(pairs) + 1))()
        for i, (pattern, qtype) in enumerate(pairs):
            encoded = pattern.encode("utf-8")
            keep_alive.append(encoded)
            overrides[i].pattern = encoded
            overrides[i].type = _type_id(qtype)
        overrides[len(pairs)].pattern = None
        overrides[len(pairs)].type = llama_cpp.GGML_TYPE_COUNT
        keep_alive.append(overrides)
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            data = np.ascontiguousarray(values, dtype=np.float32)
            encoded = name.encode("utf-8")
            keep_alive += [data, encoded]
            entries[i].name = encoded
            entries[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = data.size
        entries[len(imatrix)].name = None
        keep_alive.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    with atomic_file(dst) as tmp, _llama_errors() as errors:
        rc = llama_cpp.llama_model_quantize(str(src).encode("utf-8"), str(tmp).encode("utf-8"), ctypes.byref(params))
        if rc != 0:
            raise LlamaCppError(f"llama.cpp could not quantise {src.name} to {preset_or_type}: "
                                f"{_last_error(errors, f'error code {rc}')}")
    return Path(dst)
