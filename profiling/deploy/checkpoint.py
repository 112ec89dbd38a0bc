"""Packed checkpoints: an artifact applied to its model and written to a folder that loads without
the original dense weights.

A checkpoint folder holds:

- ``model.safetensors``: every tensor once (tied weights once): for each packed linear ``qweight``
  (uint8, bit-packed codes), ``scales`` and ``zeros`` (fp16), its bias; every other parameter in 16 bits.
  Its tensor bytes equal the artifact's memory objective (fixed bytes + the genes' cost table).
- ``config.json`` (+ ``generation_config.json``) and the tokenizer files: what rebuilds the skeleton.
- ``empas_packing.json``: the manifest -- schema, model id and weights fingerprint, quantiser, genes ->
  bits, the packed modules' layout, tied weights, tensor bytes, the source artifact.

It is written into a temporary sibling folder and renamed into place, so a failure leaves nothing
half-written. :func:`load_packed` builds the model skeleton from ``config.json`` with empty (meta)
weights, swaps in :class:`PackedLinear` modules and assigns the stored tensors: the dense weights are
never materialised.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from storage.artifacts import Artifact, ArtifactError, load_artifact
from storage.atomic import atomic_folder, remove_stale_temps

from ..inventory import build_inventory
from ..models import load_model, quiet_transformers
from ..quantizers.rtn import RTNQuantizer, qtype_bits
from .packed_modules import PackedLinear, store_in_16bit, storage_dtype_for
from .packing import pack_model, set_submodule, skeleton_packed_module

SCHEMA = "empas.packed/1"
MANIFEST_NAME = "empas_packing.json"
WEIGHTS_NAME = "model.safetensors"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be written or read; the message names the fix."""


@dataclass
class PackedCheckpoint:
    model: torch.nn.Module
    tokenizer: object | None
    manifest: dict
    path: Path

    @property
    def genes(self) -> dict[str, str]:
        return self.manifest["genes"]

    @property
    def tensor_bytes(self) -> int:
        return int(self.manifest["tensor_bytes"])

    @property
    def average_bits(self) -> float:
        return float(self.manifest["average_bits"])


# -- sizes -----------------------------------------------------------------------------------------

def safetensors_tensor_bytes(path: str | Path) -> int:
    """Bytes of tensor data in a safetensors file, read from its header (not the file size)."""
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def weight_file_bytes(folder: str | Path) -> int | None:
    """Tensor bytes of a model folder's weights (safetensors headers; other weight files by size)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    total, found = 0, False
    for p in sorted(folder.iterdir()):
        if p.suffix == ".safetensors":
            total += safetensors_tensor_bytes(p)
            found = True
        elif p.suffix in (".bin", ".pt", ".pth", ".gguf"):
            total += p.stat().st_size
            found = True
    return total if found else None


# -- writing ---------------------------------------------------------------------------------------

def check_output_dir(out_dir: str | Path, force: bool = False) -> Path:
    """Refuse a non-empty output folder (``--force`` replaces a previous EMPAS checkpoint only)."""
    target = Path(out_dir).expanduser()
    remove_stale_temps(target)  # what a killed `empas apply` of this target left beside it
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"output {target} is a file: pass a folder path with -o")
    if target.is_dir() and any(target.iterdir()):
        if not force:
            raise CheckpointError(f"output folder {target} is not empty: choose another -o or pass --force")
        if not (target / MANIFEST_NAME).is_file():
            raise CheckpointError(f"output folder {target} is not empty and not an EMPAS checkpoint; "
                                  f"--force only replaces a checkpoint: choose another -o")
    return target


def _unique_state(model: torch.nn.Module, storage_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each shared tensor once (tied weights), floating parameters in 16 bits."""
    named = dict(model.named_parameters(remove_duplicate=False))
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first_key: dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        storage = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and storage in first_key:
            tied[key] = first_key[storage]
            continue
        first_key[storage] = key
        t = t.detach()
        if key in named and t.is_floating_point() and t.dtype != storage_dtype:
            t = t.to(storage_dtype)
        tensors[key] = t.contiguous()
    return tensors, tied


def save_packed(model: torch.nn.Module, tokenizer, out_dir: str | Path, manifest: dict, force: bool = False,
                storage_dtype: torch.dtype = torch.float16) -> dict:
    """Write a packed model atomically: temp folder next to ``out_dir``, then rename into place.

    ``manifest`` gets ``tensor_bytes`` (measured from the written file) and ``tied`` added.
    """
    from safetensors.torch import save_file

    target = check_output_dir(out_dir, force)
    with atomic_folder(target) as tmp:
        tensors, tied = _unique_state(model, storage_dtype)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "empas": SCHEMA})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = storage_dtype
        config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        manifest = {**manifest, "schema": SCHEMA, "tied": tied, "storage_dtype": str(storage_dtype).replace("torch.", ""),
                    "tensor_bytes": safetensors_tensor_bytes(tmp / WEIGHTS_NAME),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return manifest


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pack_loaded(loaded, artifact: Artifact, out_dir: str | Path, force: bool = False,
                artifact_path: str | Path | None = None) -> dict:
    """Pack an already loaded model (it is modified in place) with ``artifact``'s genome and save it."""
    artifact.check_model(loaded.fingerprint, f" {artifact_path}" if artifact_path else "")
    if artifact.quantizer.get("name") != "rtn":
        raise ArtifactError(f"artifact{f' {artifact_path}' if artifact_path else ''} uses the "
                            f"{artifact.quantizer.get('name')} quantiser: it ships as a GGUF file "
                            f"(`empas export --format gguf`), not a packed checkpoint")
    quantizer = RTNQuantizer(int(artifact.quantizer["group_size"]))
    inventory = build_inventory(loaded.model, artifact.granularity)
    storage_dtype = storage_dtype_for(loaded.model)
    params = {g.name: g.params for g in inventory.genes}
    layout = pack_model(loaded.model, inventory, artifact.genes, quantizer, storage_dtype=storage_dtype)
    genes = {name: artifact.genes[name] for name in inventory.gene_names()}
    manifest = {
        "model": {"id": loaded.model_id, "fingerprint": loaded.fingerprint,
                  "architectures": list(getattr(loaded.model.config, "architectures", None) or [])},
        "quantizer": quantizer.settings(), "granularity": artifact.granularity, "genes": genes,
        "gene_params": params, "modules": layout,
        "average_bits": sum(params[n] * qtype_bits(q) for n, q in genes.items()) / sum(params.values()),
        "memory_bytes": int(artifact.memory_bytes),
        "memory_model_bytes": int(inventory.fixed_bytes + sum(
            sum(quantizer.weight_bytes(genes[g.name], lin.out_features, lin.in_features) for lin in g.weights)
            for g in inventory.genes)),
        "source_artifact": {"path": str(Path(artifact_path).resolve()) if artifact_path else None,
                            "sha256": file_sha256(artifact_path) if artifact_path else None,
                            "archetype": artifact.archetype, "source": artifact.source, "metrics": artifact.metrics},
    }
    return save_packed(loaded.model, loaded.tokenizer, out_dir, manifest, force, storage_dtype)


def apply_artifact(artifact_path: str | Path, out_dir: str | Path, model: str | None = None, force: bool = False,
                   progress: Callable[[str], None] | None = None) -> dict:
    """``empas apply``: load the artifact's model (or ``model``), refuse other weights, pack, save.

    Cheap checks (artifact, output folder) run before the model is loaded.
    """
    say = progress or (lambda _msg: None)
    artifact = load_artifact(artifact_path)
    check_output_dir(out_dir, force)
    say(f"loading model {model or artifact.model_id}")
    loaded = load_model(model or artifact.model_id)
    say(f"packing {len(artifact.genes)} genes")
    return pack_loaded(loaded, artifact, out_dir, force, artifact_path)


# -- reading ---------------------------------------------------------------------------------------

def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder: pass a checkpoint written by `empas apply`")
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no {MANIFEST_NAME}: pass a checkpoint written by `empas apply`") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable ({type(exc).__name__}): re-create it with `empas apply`") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise CheckpointError(f"{path}: unknown schema (expected {SCHEMA}): re-create it with `empas apply`")
    for key in ("modules", "genes", "quantizer", "tied"):
        if not isinstance(manifest.get(key), dict):
            raise CheckpointError(f"{path}: missing {key!r}: re-create it with `empas apply`")
    return manifest


def load_packed(folder: str | Path, dtype: torch.dtype | str = torch.float32, with_tokenizer: bool = True) -> PackedCheckpoint:
    """Load a packed checkpoint without ever building the dense weights.

    ``dtype`` is the compute dtype (fp32 by default: fast on CPUs and equal to the fake-quantised
    measurement); 16-bit matrices stay in their storage dtype either way.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    compute = DTYPES[dtype] if isinstance(dtype, str) else dtype
    storage = DTYPES.get(manifest.get("storage_dtype", "float16"), torch.float16)
    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights():  # parameters on the meta device, buffers (rotary tables) real
            model = AutoModelForCausalLM.from_config(config, dtype=compute)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot rebuild the model from {folder}/config.json: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    quantizer = manifest["quantizer"]
    for path, spec in manifest["modules"].items():
        try:
            old = model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"{folder}: packed module {path} is not in the model: re-create it with `empas apply`") from None
        set_submodule(model, path, skeleton_packed_module(spec, int(quantizer["group_size"]), compute))
        del old
    try:
        state = load_file(str(folder / WEIGHTS_NAME))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}: re-create it with `empas apply`") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{folder}/{WEIGHTS_NAME} is unreadable ({type(exc).__name__}): "
                              f"re-create it with `empas apply`") from None
    expected = set(model.state_dict().keys())
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise CheckpointError(f"{folder}: tensor {unexpected[0]} does not fit the model: re-create it with `empas apply`")
    store_in_16bit(model, storage, compute)  # class swaps first; meta dtypes do not matter
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{folder}: tensors do not fit the model ({str(exc).strip().splitlines()[-1][:120]}): "
                              f"re-create it with `empas apply`") from None
    for dropped, kept in manifest["tied"].items():
        _set_tensor(model, dropped, _get_tensor(model, kept))
    store_in_16bit(model, storage, compute)  # now on real tensors: small vectors to the compute dtype
    missing = [n for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
               if t.device.type == "meta"]
    if missing:
        raise CheckpointError(f"{folder}: tensor {missing[0]} is missing from {WEIGHTS_NAME}: re-create it with `empas apply`")
    for m in model.modules():
        if isinstance(m, PackedLinear) and m.qweight.dtype != torch.uint8:
            raise CheckpointError(f"{folder}: corrupt packed weights: re-create it with `empas apply`")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = load_tokenizer(folder) if with_tokenizer else None
    return PackedCheckpoint(model=model, tokenizer=tokenizer, manifest=manifest, path=folder)


def _get_tensor(model: torch.nn.Module, key: str) -> torch.Tensor:
    module_path, _, name = key.rpartition(".")
    return getattr(model.get_submodule(module_path) if module_path else model, name)


def _set_tensor(model: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    if name in module._parameters:
        module._parameters[name] = value
    else:
        module._buffers[name] = value


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot load the tokenizer in {folder} ({type(exc).__name__}): "
                              f"re-create the checkpoint with `empas apply`") from None


__all__ = ["ArtifactError", "CheckpointError", "MANIFEST_NAME", "PackedCheckpoint", "apply_artifact",
           "check_output_dir", "load_packed", "pack_loaded", "read_manifest", "safetensors_tensor_bytes",
           "save_packed", "weight_file_bytes"]
