"""Run jobs: EMPAS's GGUF files where users run them, llama.cpp (through llama-cpp-python).

- :func:`generate_gguf`: greedy text with prompt processing and generation timed apart;
- :func:`measure_gguf_files`: file bytes, load time, RSS, tokens/s and held-out PPL, each file in a
  fresh process (:mod:`profiling.deploy.gguf_measure`), on held-out text in the files' own vocabulary;
- :func:`open_gguf_server`: llama-cpp-python's OpenAI-compatible server, with limits;
- :func:`evaluate_gguf_files`: held-out PPL and mean KL to the model's F16 GGUF from llama.cpp's
  logits, beside EMPAS's own PyTorch measurement of the same file's weights (dequantised into the
  Hugging Face model), and llama.cpp's presets as baselines, made from the same F16 file;
- :func:`measure_in_llamacpp`: that evaluation of exported files with the presets, plus each file's
  generation speed (what the TUI's archetypes screen runs in a worker);
- :func:`preset_genomes`: the presets as per-weight genomes, for the PyTorch evaluation of ggml
  artifacts.

The F16 reference GGUF and the preset files are written once per model and kept under
``profiling.models.cache_dir()/gguf/<model fingerprint>/`` (atomically: a reader never sees half a
file). Nothing here prints.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger(__name__)

ARTIFACT_SUFFIX = ".json"
#: llama.cpp's metadata keys checked against the model before any file is measured
HPARAM_KEYS = {"block_count": "n_layers", "embedding_length": "n_embd", "attention.head_count": "n_head",
               "attention.head_count_kv": "n_head_kv"}
#: a file whose weights differ from the model's by more than this (relative squared error over all
#: matrices) is another model's: quantisation down to Q2_K stays far below it, unrelated weights near 2
ANOTHER_MODEL_REL_ERROR = 0.5
SPEED_PROMPT_TOKENS = 128


class RunError(ValueError):
    """Bad input to a run job; the message is one line naming the fix."""


class RunCancelled(RuntimeError):
    """``should_stop`` turned true between files."""


# -- files -----------------------------------------------------------------------------------------------

def is_gguf_target(path: str | Path) -> bool:
    """Whether a path given to generate / measure / serve means a GGUF: a ``.gguf`` name or any file
    (a packed checkpoint is a folder), so the GGUF checks answer for non-GGUF files."""
    p = Path(path)
    return p.suffix.lower() == ".gguf" or p.is_file()


def check_gguf_files(paths: Sequence[str | Path]) -> list[Path]:
    """Each path as an existing GGUF file, or a one-line error naming what to pass instead."""
    from profiling.deploy.llamacpp import _require_gguf

    if not paths:
        raise RunError("no GGUF files given: pass FILE.gguf (written by `empas export --format gguf`)")
    out = []
    for path in paths:
        p = Path(path)
        if p.suffix.lower() == ARTIFACT_SUFFIX:
            beside = p.with_suffix(".gguf")
            hint = (f"pass {beside}" if beside.is_file() else
                    f"write it with `empas export --format gguf` (it puts {beside.name} beside {p.name})")
            raise RunError(f"{p} is an artifact, not a GGUF; llama.cpp runs .gguf files: {hint}, or drop "
                           f"--engine llamacpp to measure the artifact in PyTorch")
        if p.is_dir():
            raise RunError(f"{p} is a folder (a packed checkpoint?): pass .gguf files, or drop --engine llamacpp")
        out.append(_require_gguf(p))
    return out


def artifact_beside(path: str | Path):
    """The artifact ``empas export --format gguf`` wrote beside ``path`` (same stem, ``.json``), or None."""
    from storage.artifacts import load_artifact

    candidate = Path(path).with_suffix(ARTIFACT_SUFFIX)
    return load_artifact(candidate) if candidate.is_file() else None


def _threads(threads: int | None) -> int:
    from profiling.deploy.llamacpp import default_threads

    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise RunError("--threads must be a positive integer")
    return threads


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RunError(f"{name} must be a positive integer")


# -- generate --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GgufGeneration:
    path: str
    generation: object  # profiling.deploy.llamacpp.Generation
    load_seconds: float
    chat: bool

    def to_dict(self) -> dict:
        g = self.generation
        return {"path": self.path, "text": g.text, "chat": self.chat, "prompt_tokens": g.prompt_tokens,
                "new_tokens": g.new_tokens, "prompt_seconds": g.prompt_seconds,
                "generation_seconds": g.generation_seconds, "prompt_tokens_per_s": g.prompt_tokens_per_s,
                "generation_tokens_per_s": g.generation_tokens_per_s, "load_seconds": self.load_seconds,
                "n_threads": g.n_threads, "hardware": g.hardware, "engine": "llama.cpp"}


def generate_gguf(path: str | Path, prompt: str, max_new_tokens: int = 64, threads: int | None = None,
                  chat: bool = False) -> GgufGeneration:
    """Greedy continuation of ``prompt`` in llama.cpp, timed (load, prompt, generation apart)."""
    from profiling.deploy.llamacpp import generate, timed_load

    _positive("--max-new-tokens", max_new_tokens)
    if not prompt.strip():
        raise RunError("--prompt is empty: pass some text to continue")
    (p,) = check_gguf_files([path])
    n_threads = _threads(threads)
    chat_margin = 256 if chat else 0  # the template's own tokens
    n_ctx = max(256, -(-(len(prompt.encode("utf-8")) + 2 + chat_margin + max_new_tokens) // 64) * 64)
    llm, load_seconds = timed_load(p, n_threads=n_threads, n_ctx=n_ctx)
    try:
        out = generate(llm, prompt, max_new_tokens, chat=chat)
    finally:
        llm.close()
    return GgufGeneration(path=str(p), generation=out, load_seconds=load_seconds, chat=chat)


# -- measure ---------------------------------------------------------------------------------------------

@dataclass
class GgufMeasurement:
    rows: list[dict]
    heldout_tokens: int
    seq_len: int
    tokens_source: str
    gen_tokens: int
    repeats: int
    n_threads: int
    hardware: str

    def to_dict(self) -> dict:
        return {"engine": "llama.cpp", "heldout_tokens": self.heldout_tokens, "seq_len": self.seq_len,
                "tokens_source": self.tokens_source, "gen_tokens": self.gen_tokens, "repeats": self.repeats,
                "n_threads": self.n_threads, "hardware": self.hardware, "rows": self.rows}


def _same_vocabulary(first, other, path: Path, first_path: Path) -> None:
    from profiling.deploy.llamacpp import TOKENIZER_PROBE

    if other.n_vocab != first.n_vocab or other(TOKENIZER_PROBE)["input_ids"] != first(TOKENIZER_PROBE)["input_ids"]:
        raise RunError(f"{path} has another vocabulary than {first_path}: their PPLs are not comparable; "
                       f"measure each model's files separately")


def measure_gguf_files(paths: Sequence[str | Path], heldout_tokens: int = 512, seq_len: int = 128,
                       text_file=None, gen_tokens: int = 32, threads: int | None = None, repeats: int = 3,
                       progress: Callable[[int, int, str], None] | None = None) -> GgufMeasurement:
    """Measure every file in its own process on the same held-out tokens (the first file's vocabulary;
    the others must tokenise the same)."""
    from profiling.deploy.gguf_measure import VocabTokenizer, measure_gguf
    from profiling.deploy.llamacpp import hardware_description
    from profiling.evaluation import heldout_tokens as make_heldout

    files = check_gguf_files(paths)
    _positive("--heldout-tokens", heldout_tokens)
    if isinstance(gen_tokens, bool) or not isinstance(gen_tokens, int) or gen_tokens < 0:
        raise RunError("--gen-tokens must be 0 or more")
    n_threads = _threads(threads)
    vocab = VocabTokenizer(files[0])
    try:
        for p in files[1:]:
            other = VocabTokenizer(p)
            try:
                _same_vocabulary(vocab, other, p, files[0])
            finally:
                other.close()
        tokens, source = make_heldout(vocab, heldout_tokens, seq_len, text_file, None)
        prompt = vocab.decode(tokens.reshape(-1)[:SPEED_PROMPT_TOKENS].tolist())
    finally:
        vocab.close()
    rows = []
    for i, p in enumerate(files):
        if progress:
            progress(i, len(files), p.name)
        rows.append(measure_gguf(p, tokens.numpy(), prompt, gen_tokens, n_threads, repeats))
    if progress:
        progress(len(files), len(files), "")
    return GgufMeasurement(rows=rows, heldout_tokens=int(tokens.numel()), seq_len=int(tokens.shape[1]),
                           tokens_source=source, gen_tokens=gen_tokens, repeats=repeats, n_threads=n_threads,
                           hardware=hardware_description())


# -- serve -----------------------------------------------------------------------------------------------

def open_gguf_server(path: str | Path, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
                     n_ctx: int = 2048, limits=None, api_key: str | None = None, verbose: bool = False):
    """A bound, loaded :class:`profiling.deploy.llamacpp_server.LlamaServer`; call ``.serve()``."""
    from profiling.deploy.llamacpp_server import LlamaServer, ServerLimits

    (p,) = check_gguf_files([path])
    return LlamaServer(p, host=host, port=port, n_threads=_threads(threads), n_ctx=n_ctx,
                       limits=limits or ServerLimits(), api_key=api_key, verbose=verbose)


# -- evaluate --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GgufEvaluateSettings:
    files: tuple[str, ...] = ()
    model: str | None = None  # default: the artifacts' model, else the embedded one
    baselines: bool = False  # F16 and llama.cpp's presets, from the same F16 file
    heldout_tokens: int = 2048
    seq_len: int = 128
    text_file: str | None = None
    threads: int | None = None  # llama.cpp threads (default: llama-cpp-python's)
    tokenizer_pre: str | None = None  # only to write the F16 file of a model with no GGUF to copy metadata from
    presets: tuple[str, ...] = ()  # default: every preset of profiling.deploy.presets

    def validate(self) -> "GgufEvaluateSettings":
        if not self.files and not self.baselines:
            raise RunError("nothing to evaluate: pass .gguf files and/or --baselines")
        _positive("--heldout-tokens", self.heldout_tokens)
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise RunError("--seq-len must be an integer of at least 2")
        _threads(self.threads)
        return self


@dataclass(frozen=True)
class GgufRow:
    """One file measured in both engines on the same held-out tokens."""

    name: str
    kind: str  # "reference", "baseline", "artifact", "file"
    path: str
    file_bytes: int
    llamacpp_loss: float
    llamacpp_kl: float
    torch_loss: float
    torch_kl: float
    llamacpp_seconds: float
    torch_seconds: float
    weights_rel_error: float  # the file's weights vs the model's (relative squared error)
    note: str = ""

    @property
    def llamacpp_ppl(self) -> float:
        return math.exp(self.llamacpp_loss)

    @property
    def torch_ppl(self) -> float:
        return math.exp(self.torch_loss)

    @property
    def kl_difference(self) -> float:
        return self.llamacpp_kl - self.torch_kl

    @property
    def ppl_difference(self) -> float:
        return self.llamacpp_ppl - self.torch_ppl

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "path": self.path, "file_bytes": self.file_bytes,
                "file_mb": round(self.file_bytes / 1e6, 3), "llamacpp_loss": self.llamacpp_loss,
                "llamacpp_ppl": self.llamacpp_ppl, "llamacpp_kl": self.llamacpp_kl, "torch_loss": self.torch_loss,
                "torch_ppl": self.torch_ppl, "torch_kl": self.torch_kl, "kl_difference": self.kl_difference,
                "ppl_difference": self.ppl_difference, "weights_rel_error": self.weights_rel_error,
                "llamacpp_seconds": round(self.llamacpp_seconds, 3), "torch_seconds": round(self.torch_seconds, 3),
                "note": self.note}


@dataclass
class GgufEvaluationResult:
    model_id: str
    model_fingerprint: str
    rows: list[GgufRow]
    heldout_tokens: int
    seq_len: int
    tokens_source: str
    reference: str  # the F16 GGUF every KL is measured against
    engines_f16_kl: float  # KL(PyTorch F16 || llama.cpp F16): the engines' own difference
    n_threads: int
    hardware: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"engine": "llama.cpp and PyTorch", "model": self.model_id, "model_fingerprint": self.model_fingerprint,
                "heldout_tokens": self.heldout_tokens, "seq_len": self.seq_len, "tokens_source": self.tokens_source,
                "reference": self.reference, "engines_f16_kl": self.engines_f16_kl, "n_threads": self.n_threads,
                "hardware": self.hardware, "rows": [r.to_dict() for r in self.rows], "notes": self.notes}


def reference_folder(fingerprint: str) -> Path:
    """Where the F16 reference and preset GGUFs of one model's weights are kept."""
    from profiling.models import cache_dir

    return cache_dir() / "gguf" / fingerprint


def _cached(path: Path, expected_types: dict[str, str]) -> bool:
    """A cached file is reused only if llama.cpp's parser reads the tensor types it must have."""
    from profiling.deploy.llamacpp import LlamaCppError, gguf_tensor_types

    if not path.is_file():
        return False
    try:
        return gguf_tensor_types(path) == expected_types
    except LlamaCppError:
        return False


def f16_reference(loaded, layout, metadata_gguf: Path | None = None, tokenizer_pre: str | None = None) -> Path:
    """The model's F16 GGUF (every matrix F16, vectors F32), written once into :func:`reference_folder`.
    Its metadata (hyper-parameters, tokenizer) comes from the model's own GGUF, else ``metadata_gguf``
    (a GGUF of this model: what is being evaluated), else the Hugging Face config and tokenizer."""
    from profiling.deploy.gguf_writer import export_gguf

    path = reference_folder(loaded.fingerprint) / "F16.gguf"
    if _cached(path, layout.resolve({})):
        return path
    from profiling.deploy.gguf_metadata import TokenizerError

    source = loaded.gguf_path or metadata_gguf
    try:
        export_gguf(path, loaded.model, loaded.tokenizer, {}, source_gguf=source, tokenizer_pre=tokenizer_pre)
    except TokenizerError as exc:
        if source is None and not tokenizer_pre and "tokenizer_pre" in str(exc):
            raise RunError("writing the model's F16 reference GGUF needs llama.cpp's name for its BPE "
                           "pre-tokenizer: pass --tokenizer-pre NAME (e.g. llama-bpe, smollm, gpt-2), or a .gguf of "
                           "this model to copy it from") from None
        raise
    log.info("wrote the F16 reference GGUF of %s to %s (once per model)", loaded.model_id, path)
    return path


def preset_file(f16: Path, preset: str, layout, threads: int = 1) -> Path:
    """``llama_model_quantize`` of the F16 reference at ``preset``, kept beside it."""
    from profiling.deploy.llamacpp import quantize_with_llamacpp
    from profiling.deploy.presets import preset_genome

    path = f16.parent / f"{preset}.gguf"
    if _cached(path, layout.resolve(preset_genome(preset, layout))):
        return path
    quantize_with_llamacpp(f16, path, preset, n_threads=threads)
    log.info("quantised the F16 reference to %s with llama.cpp: %s (once per model)", preset, path)
    return path


def _model_for(files: list[Path], model: str | None):
    """(loaded model, artifacts by file, calibration) for ``files``: the artifacts' model (refusing other
    weights) when any file has one beside it, else ``model`` (default: the embedded model)."""
    from storage.artifacts import ArtifactError

    from .models import load_checked

    artifacts = {p: a for p in files if (a := artifact_beside(p)) is not None}
    first = next(iter(artifacts.items()), None)
    for p, art in artifacts.items():
        if art.model_fingerprint != first[1].model_fingerprint:
            raise ArtifactError(f"{p} is for another model ({art.model_id}, weights {art.model_fingerprint[:12]}) "
                                f"than {first[0]} ({first[1].model_fingerprint[:12]}): evaluate them separately")
    if first is None:
        return load_checked(model, "default", None), artifacts, None
    art = first[1]
    loaded = load_checked(model, art.model_id, art.model_fingerprint)
    calibration = art.source.get("calibration") if isinstance(art.source.get("calibration"), dict) else None
    return loaded, artifacts, calibration


def _structure_mismatch(path: Path, layout) -> str | None:
    """Why ``path`` cannot hold this model's weights (hyper-parameters, tensors), or None. Cheap:
    llama.cpp's own parser and vocabulary-only load, no tensor data read."""
    from profiling.deploy.llamacpp import gguf_tensor_types, load_gguf

    llm = load_gguf(path, vocab_only=True)
    try:
        meta, n_vocab = dict(llm.metadata), llm.n_vocab()
    finally:
        llm.close()
    arch = meta.get("general.architecture")
    if arch != "llama":
        return f"it is a {arch!r} model, not a Llama"
    hp = layout.hparams
    for key, attr in HPARAM_KEYS.items():
        have = meta.get(f"llama.{key}")
        if have is not None and str(have) != str(getattr(hp, attr)):
            return f"llama.{key} is {have}, the model has {getattr(hp, attr)}"
    if n_vocab != hp.n_vocab:
        return f"its vocabulary has {n_vocab} tokens, the model's {hp.n_vocab}"
    names = set(gguf_tensor_types(path))
    expected = {t.name for t in layout.tensors}
    if names != expected:
        missing = sorted(expected - names) or sorted(names - expected)
        return f"its tensors differ (e.g. {missing[0]})"
    return None


class _TorchEngine:
    """The Hugging Face model running a GGUF's dequantised weights; the model's own weights are put
    back by :meth:`restore`."""

    def __init__(self, model, layout, tokens, batch: int = 4):
        import torch

        self.model, self.layout, self.tokens, self.batch = model, layout, tokens, batch
        with torch.no_grad():
            self.originals = {t.hf_name: model.get_parameter(t.hf_name).detach().clone() for t in layout.tensors}
        self.references: list | None = None

    def load(self, path: Path, model_id: str) -> float:
        """Put the file's weights in the model; their relative squared error to the model's own."""
        import torch

        from profiling.deploy.gguf_layout import GgufExportError
        from profiling.deploy.gguf_weights import file_weights

        diff = norm = 0.0
        try:
            with torch.no_grad():
                for spec, values in file_weights(path, self.layout):
                    param = self.model.get_parameter(spec.hf_name)
                    param.copy_(torch.tensor(values, dtype=param.dtype))
                    if spec.is_matrix:
                        original = self.originals[spec.hf_name].double()
                        diff += float((param.double() - original).square().sum())
                        norm += float(original.square().sum())
        except (GgufExportError, ValueError) as exc:
            raise RunError(f"{path} is not a GGUF of {model_id} ({str(exc).splitlines()[0][:120]}): pass --model "
                           f"with the model it was made from") from None
        return diff / norm if norm > 0 else 0.0

    def logits(self):
        import torch

        with torch.no_grad():
            for start in range(0, self.tokens.shape[0], self.batch):
                chunk = self.tokens[start:start + self.batch]
                yield chunk, self.model(input_ids=chunk, use_cache=False).logits.float()

    def measure(self) -> tuple[float, float]:
        """(loss, mean KL to the references) of the weights in the model now."""
        from profiling.runner import next_token_loss

        loss = kl = 0.0
        n = self.tokens.shape[0]
        for i, (chunk, logits) in enumerate(self.logits()):
            loss += next_token_loss(logits, chunk) * chunk.shape[0]
            kl += self.references[i].mean_kl(logits) * chunk.shape[0]
        return loss / n, kl / n

    def set_f16_reference(self) -> None:
        """The references: the model with every matrix rounded to F16, vectors as they are, which is
        exactly what the F16 GGUF holds (its writer rounds the same float32 values the same way)."""
        import torch

        from profiling.runner import DenseReference

        self.restore()
        with torch.no_grad():
            for spec in self.layout.matrices:
                param = self.model.get_parameter(spec.hf_name)
                param.copy_(param.to(torch.float16).to(param.dtype))
        self.references = [DenseReference(logits) for _, logits in self.logits()]

    def kl_to(self, logits) -> float:
        """Mean KL(references || ``logits``) for logits of all tokens, (n_tokens, vocab) in order."""
        per_seq = self.tokens.shape[1]
        total, start = 0.0, 0
        for ref in self.references:
            total += ref.mean_kl(logits[start:start + ref.n_tokens]) * ref.n_tokens
            start += ref.n_tokens
        return total / (self.tokens.shape[0] * per_seq)

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            for name, value in self.originals.items():
                self.model.get_parameter(name).copy_(value)


def evaluate_gguf_files(settings: GgufEvaluateSettings, progress: Callable[[int, int, str], None] | None = None,
                        should_stop: Callable[[], bool] | None = None, loaded=None) -> GgufEvaluationResult:
    """Every file (and, with ``baselines``, F16 and the presets) in llama.cpp and in PyTorch."""
    from profiling.deploy.gguf_writer import tensor_layout
    from profiling.deploy.llamacpp import evaluate_gguf, hardware_description, reference_for
    from profiling.deploy.presets import PRESETS
    from profiling.evaluation import heldout_tokens

    from .export import model_notes

    settings.validate()
    files = check_gguf_files(settings.files) if settings.files else []
    threads = _threads(settings.threads)
    if loaded is None:
        loaded, artifacts, calibration = _model_for(files, settings.model)
    else:
        artifacts = {p: a for p in files if (a := artifact_beside(p)) is not None}
        for p, art in artifacts.items():
            art.check_model(loaded.fingerprint, where=f" beside {p}")
        first = next(iter(artifacts.values()), None)
        calibration = first.source.get("calibration") if first and isinstance(first.source.get("calibration"), dict) \
            else None
    layout = tensor_layout(loaded.model)
    for p in files:  # all files checked before any is measured
        why = _structure_mismatch(p, layout)
        if why:
            raise RunError(f"{p} is not a GGUF of {loaded.model_id} ({why}): pass --model with the model it was "
                           f"made from")
    tokens, source = heldout_tokens(loaded.tokenizer, settings.heldout_tokens, settings.seq_len,
                                    settings.text_file, calibration)
    targets: list[tuple[str, str, Path, str]] = []  # (name, kind, path, note)
    for p in files:
        art = artifacts.get(p)
        if art is not None:
            targets.append((f"{art.archetype} ({p.name})", "artifact", p, f"artifact {p.with_suffix('.json').name}"))
        else:
            targets.append((p.name, "file", p, ""))
    presets = tuple(settings.presets or PRESETS) if settings.baselines else ()
    total = 2 * len(files) + (2 + 2 * len(presets) if settings.baselines else 0) + 1
    done = 0

    def step(name: str) -> None:
        nonlocal done
        if should_stop and should_stop():
            raise RunCancelled("evaluation cancelled")
        if progress:
            progress(done, total, name)
        done += 1

    torch_engine = _TorchEngine(loaded.model, layout, tokens)
    torch_side: dict[Path, tuple[float, float, float, float]] = {}  # path -> (loss, kl, rel error, seconds)

    def measure_in_torch(path: Path, check: bool) -> None:
        started = time.perf_counter()
        rel_error = torch_engine.load(path, loaded.model_id)
        if check and rel_error > ANOTHER_MODEL_REL_ERROR:
            raise RunError(f"{path} is not a GGUF of {loaded.model_id} (its weights differ from the model's by "
                           f"{rel_error:.2f} relative squared error): pass --model with the model it was made from")
        loss, kl = torch_engine.measure()
        torch_side[path] = (loss, kl, rel_error, time.perf_counter() - started)

    rows = []
    try:
        torch_engine.set_f16_reference()
        for name, _, path, _ in targets:  # PyTorch first: every file is checked before anything is written
            step(f"{name} in PyTorch")
            measure_in_torch(path, check=True)
        step("F16 reference")
        torch_engine.restore()  # the F16 file is written from the model's own weights
        f16 = f16_reference(loaded, layout, files[0] if files else None, settings.tokenizer_pre)
        if settings.baselines:
            baselines = [("F16", "baseline", f16, "llama.cpp F16: every matrix F16, vectors F32")]
            for preset in presets:
                step(f"quantising {preset}")
                baselines.append((preset, "baseline", preset_file(f16, preset, layout, threads),
                                  f"llama-quantize {preset} of the F16 file"))
            for name, _, path, _ in baselines:
                step(f"{name} in PyTorch")
                measure_in_torch(path, check=False)
            targets = baselines + targets
        llama_reference = reference_for(f16, tokens, n_threads=threads)
        engines_f16_kl = torch_engine.kl_to(llama_reference.logprobs)
        for name, kind, path, note in targets:
            step(f"{name} in llama.cpp")
            ev = evaluate_gguf(path, tokens, reference=llama_reference, n_threads=threads)
            loss, kl, rel_error, seconds = torch_side[path]
            rows.append(GgufRow(name=name, kind=kind, path=str(path), file_bytes=ev.file_bytes,
                                llamacpp_loss=ev.loss, llamacpp_kl=ev.kl, torch_loss=loss, torch_kl=kl,
                                llamacpp_seconds=ev.seconds, torch_seconds=seconds, weights_rel_error=rel_error,
                                note=note))
    finally:
        torch_engine.restore()
    if progress:
        progress(total, total, "")
    return GgufEvaluationResult(model_id=loaded.model_id, model_fingerprint=loaded.fingerprint, rows=rows,
                                heldout_tokens=int(tokens.numel()), seq_len=int(tokens.shape[1]),
                                tokens_source=source, reference=str(f16), engines_f16_kl=engines_f16_kl,
                                n_threads=threads, hardware=hardware_description(), notes=model_notes(loaded.model_id))


#: the prompt the speed of every file is measured with (the same for all, so their tokens/s compare)
SPEED_PROMPT = "The history of the city begins with a small settlement by the river, where"


@dataclass
class LlamaCppRun:
    """Exported files and the presets measured in llama.cpp: the evaluation (held-out PPL, KL to the F16
    file, in both engines) and each file's greedy generation speed on this machine."""

    evaluation: GgufEvaluationResult
    generation_tokens_per_s: dict[str, float]  # file path -> measured tokens/s
    gen_tokens: int
    n_threads: int


def measure_in_llamacpp(files: Sequence[str | Path], loaded, presets: Sequence[str] = (), heldout_tokens: int = 512,
                        seq_len: int = 128, text_file=None, threads: int | None = None, gen_tokens: int = 32,
                        progress: Callable[[int, int, str], None] | None = None,
                        should_stop: Callable[[], bool] | None = None) -> LlamaCppRun:
    """:func:`evaluate_gguf_files` of ``files`` with F16 and the presets as baselines, then the
    generation speed of every file measured (``gen_tokens`` greedy tokens after a warm-up, one thread
    count for all). ``should_stop`` is checked between files (:class:`RunCancelled`)."""
    from profiling.deploy.llamacpp import generate, timed_load
    from profiling.deploy.presets import PRESETS

    _positive("gen_tokens", gen_tokens)
    n_threads = _threads(threads)
    presets = tuple(presets or PRESETS)
    n_speed = len(files) + 1 + len(presets)
    offset = {"total": None}

    def eval_progress(done: int, total: int, name: str) -> None:
        offset["total"] = total
        if progress:
            progress(done, total + n_speed, name)

    settings = GgufEvaluateSettings(files=tuple(str(f) for f in files), baselines=True, heldout_tokens=heldout_tokens,
                                    seq_len=seq_len, text_file=text_file, threads=n_threads, presets=presets)
    evaluation = evaluate_gguf_files(settings, progress=eval_progress, should_stop=should_stop, loaded=loaded)
    first = offset["total"] or 0
    speeds: dict[str, float] = {}
    for i, row in enumerate(evaluation.rows):
        if should_stop and should_stop():
            raise RunCancelled("measurement cancelled")
        if progress:
            progress(first + i, first + n_speed, f"{row.name}: tokens/s")
        llm, _ = timed_load(row.path, n_threads=n_threads, n_ctx=256 + gen_tokens)
        try:
            generate(llm, SPEED_PROMPT, 2, stop_at_eos=False)  # warm-up: first-call allocations
            speeds[row.path] = generate(llm, SPEED_PROMPT, gen_tokens, stop_at_eos=False).generation_tokens_per_s
        finally:
            llm.close()
    if progress:
        progress(first + n_speed, first + n_speed, "")
    return LlamaCppRun(evaluation=evaluation, generation_tokens_per_s=speeds, gen_tokens=gen_tokens,
                       n_threads=n_threads)


# -- presets as genomes (the PyTorch evaluation of ggml artifacts) --------------------------------------------

def preset_genomes(model, weights, presets: Sequence[str] = ()) -> list:
    """llama.cpp's presets as :class:`profiling.genome.Genome` over ``weights`` (an inventory's
    WeightRefs), after "dense" (every weight unquantised, "f16": the weights as loaded, which the memory
    model counts at 16 bits): the baselines of a ggml artifact, fake-quantised with the ggml quantiser
    exactly as ``llama-quantize`` would store them. Weights the inventory does not hold (an embedding
    that is no gene) stay as the model has them."""
    from profiling.deploy.gguf_writer import tensor_layout
    from profiling.deploy.presets import PRESETS, preset_genome
    from profiling.genome import Genome

    layout = tensor_layout(model)
    refs = tuple(weights)
    specs = [layout.tensor(ref.path) for ref in refs]
    out = [Genome(name="dense", weights=refs, qtypes=tuple("f16" for _ in refs), kind="baseline",
                  note="every weight unquantised")]
    for preset in presets or PRESETS:
        types = preset_genome(preset, layout)
        out.append(Genome(name=preset, weights=refs, qtypes=tuple(types[s.name] for s in specs), kind="baseline",
                          note=f"llama.cpp's {preset} rules (llama_tensor_get_type), shape fallbacks included"))
    return out


#: every type a preset can give a tensor (the quantiser must offer them to measure the presets)
PRESET_QTYPES = ("f16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "q3_k", "q2_k")


class F16SourceQuantizer:
    """A quantiser applied to weights first rounded to F16, as ``llama-quantize`` quantises a model's
    F16 GGUF: the presets measured in PyTorch are then exactly llama.cpp's preset files (EMPAS's own
    export quantises the weights as loaded, without that rounding)."""

    def __init__(self, quantizer):
        self.inner = quantizer

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def fake_quantize(self, weight, qtype: str, importance=None):
        import torch

        return self.inner.fake_quantize(weight.to(torch.float16).to(weight.dtype), qtype, importance)


def validate_with_presets(setup, presets: Sequence, genomes: Sequence, progress=None, should_stop=None):
    """``setup.run`` of ``genomes`` and, on the same dense references, of the preset ``presets`` quantised
    from F16 weights (:class:`F16SourceQuantizer`): one :class:`profiling.evaluation.ValidationResult`,
    presets first."""
    from dataclasses import replace

    result = setup.run(list(genomes), progress=progress, should_stop=should_stop)
    preset_setup = replace(setup, quantizer=F16SourceQuantizer(setup.quantizer))  # shares the references
    baseline = preset_setup.run(list(presets), progress=progress, should_stop=should_stop)
    return replace(result, rows=baseline.rows + result.rows)
