"""The importance matrix: per input column of each linear, the mean of x^2 over calibration tokens.

This is what ``llama-imatrix`` collects (``tools/imatrix/imatrix.cpp``: it adds x^2 of every token row
entering a matrix multiplication to a per-column sum, counts the rows, and ``llama-quantize`` divides
the sum by the count), and what every ggml quantiser weights its rounding error by. Three jobs:

- :class:`ImportanceCollector`: forward pre-hooks on chosen linears (the LM head included), to install
  around a dense pass the profiler runs anyway; :func:`collect_importance` runs one itself.
- :func:`read_imatrix_file`: a ``llama-imatrix`` output, current GGUF format (``<name>.in_sum2`` and
  ``<name>.counts`` tensors) or the legacy ``.dat``, as GGUF tensor name -> importance vector.
- :func:`gguf_names` / :func:`importance_for_model`: GGUF tensor names of a transformers model's weights
  (``model.layers.3.mlp.down_proj`` -> ``blk.3.ffn_down.weight``) and a file's vectors keyed by the
  model's module paths, refusing a file made for another model.

Differences from ``llama-imatrix``: it ignores matrix multiplications of fewer than 16 token rows (its
generation-time guard) and accumulates in float32; the collector counts every row it is shown and sums
in float64 (float32 on MPS).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn


class ImatrixError(ValueError):
    """An importance matrix that cannot be used; the message names the fix."""


# -- collection -----------------------------------------------------------------------------------

class ImportanceCollector:
    """Sum of x^2 per input column and the number of token rows, for each module in ``module_paths``.

    Use as a context manager around forward passes (the hooks are removed on exit, also on errors)::

        with ImportanceCollector(model, paths) as collector:
            model(input_ids=tokens)
        importance = collector.importance()   # path -> float32 (in_features,) tensor on the CPU

    Several passes accumulate. The modules may be ``nn.Linear`` or any module whose first positional
    input has the input features last (GPT-2's ``Conv1D`` too).
    """

    def __init__(self, model: nn.Module, module_paths: Iterable[str]):
        self.model = model
        self.paths = list(dict.fromkeys(module_paths))
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {p: 0 for p in self.paths}
        self._handles: list = []

    def install(self) -> "ImportanceCollector":
        if self._handles:
            return self
        try:
            for path in self.paths:
                module = self.model.get_submodule(path)
                self._handles.append(module.register_forward_pre_hook(self._hook(path)))
        except AttributeError:
            self.remove()
            raise ImatrixError(f"the model has no module {path!r} to collect importance on") from None
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "ImportanceCollector":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _hook(self, path: str):
        def hook(_module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1])
            acc_dtype = torch.float32 if rows.device.type == "mps" else torch.float64
            column_sums = rows.to(torch.float32).square().sum(0).to(acc_dtype)
            if path in self.sums:
                self.sums[path] += column_sums
            else:
                self.sums[path] = column_sums
            self.counts[path] += rows.shape[0]
        return hook

    def importance(self) -> dict[str, torch.Tensor]:
        """module path -> mean of x^2 per input column (float32, CPU)."""
        missing = [p for p in self.paths if self.counts[p] == 0]
        if missing:
            raise ImatrixError(f"no calibration tokens reached {missing[0]}: run the dense pass inside the collector")
        return {p: (self.sums[p].cpu().double() / self.counts[p]).float() for p in self.paths}


@torch.no_grad()
def collect_importance(model: nn.Module, module_paths: Iterable[str], tokens: torch.Tensor,
                       batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """Importance of ``module_paths`` on ``tokens`` ((n_seq, seq_len) ids), one dense pass per batch."""
    device = next(model.parameters()).device
    tokens = tokens if tokens.dim() == 2 else tokens.reshape(1, -1)
    step = batch_size or tokens.shape[0]
    with ImportanceCollector(model, module_paths) as collector:
        for start in range(0, tokens.shape[0], step):
            model(input_ids=tokens[start:start + step].to(device), use_cache=False)
    return collector.importance()


# -- llama-imatrix files --------------------------------------------------------------------------

_SUMS, _COUNTS = ".in_sum2", ".counts"


def read_imatrix_file(path: str | Path) -> dict[str, np.ndarray]:
    """GGUF tensor name -> importance (float32) of a ``llama-imatrix`` file, as ``llama-quantize`` reads it.

    GGUF format: ``in_sum2 / counts`` per matrix (an expert tensor has one count per expert); a zero
    count gives ones. Legacy ``.dat``: the stored values divided by the entry's call count."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ImatrixError(f"cannot read importance matrix {path}: {exc.strerror}") from None
    try:
        entries = _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    except ImatrixError:
        raise
    except Exception as exc:  # a truncated or foreign file: the parsers raise many kinds
        raise ImatrixError(f"{path} is not a llama-imatrix file ({type(exc).__name__}: {exc}): pass the .gguf or "
                           f".dat that llama-imatrix wrote") from None
    if not entries:
        raise ImatrixError(f"importance matrix {path} has no entries: pass the .gguf or .dat that llama-imatrix wrote")
    return entries


def _read_gguf(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    sums, counts = {}, {}
    for tensor in reader.tensors:
        if tensor.name.endswith(_SUMS):
            sums[tensor.name[: -len(_SUMS)]] = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        elif tensor.name.endswith(_COUNTS):
            counts[tensor.name[: -len(_COUNTS)]] = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    out = {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise ImatrixError(f"{path} has {name}{_SUMS if name in sums else _COUNTS} without its pair: pass a "
                               f"complete llama-imatrix file")
        s, c = sums[name], np.rint(counts[name])
        if c.size == 0 or s.size % c.size:
            raise ImatrixError(f"{path}: {name} has {s.size} sums for {c.size} counts: pass a complete llama-imatrix file")
        per_matrix = s.reshape(c.size, -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.where(c[:, None] > 0, per_matrix / np.where(c > 0, c, 1)[:, None], 1.0)
        out[name] = mean.reshape(-1).astype(np.float32)
    return out


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ImatrixError(f"{path} ends early (byte {pos}): pass a complete llama-imatrix file")
        value = struct.unpack_from(fmt, data, pos)
        pos += size
        return value

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ImatrixError(f"{path} is not a llama-imatrix file (it says {n_entries} entries)")
    out = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length <= 4096:
            raise ImatrixError(f"{path} is not a llama-imatrix file (a name of {length} bytes)")
        name = bytes(take(f"<{length}s")[0]).decode("utf-8")
        ncall, nval = take("<ii")
        if nval < 1:
            raise ImatrixError(f"{path}: entry {name} has {nval} values: pass a complete llama-imatrix file")
        values = np.array(take(f"<{nval}f"), dtype=np.float32)
        out[name] = values / ncall if ncall > 0 else values
    return out


# -- names: transformers module paths <-> GGUF tensor names ----------------------------------------

_BLOCK = re.compile(r"^blk\.(\d+)\.")


def gguf_names(module_paths: Iterable[str], n_blocks: int, arch: str = "llama", tied: bool = False) -> dict[str, str]:
    """transformers module (or weight) path -> GGUF tensor name, e.g. ``blk.3.ffn_down.weight``.

    ``tied``: the LM head shares the token embedding, which GGUF stores once as ``token_embd.weight``."""
    from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, get_tensor_name_map

    by_name = {v: k for k, v in MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise ImatrixError(f"gguf does not know the architecture {arch!r}")
    name_map = get_tensor_name_map(MODEL_ARCH(by_name[arch]), n_blocks)
    out = {}
    for path in module_paths:
        key = path if path.endswith((".weight", ".bias")) else f"{path}.weight"
        name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ImatrixError(f"{path} has no GGUF tensor name for architecture {arch}")
        out[path] = "token_embd.weight" if tied and name == "output.weight" else name
    return out


def importance_for_model(entries: Mapping[str, np.ndarray], in_features: Mapping[str, int], n_blocks: int,
                         arch: str = "llama", tied: bool = False, source: str = "the importance matrix"
                         ) -> dict[str, torch.Tensor]:
    """A file's vectors (:func:`read_imatrix_file`) keyed by the model's module paths.

    ``in_features``: every quantisable linear of the model (module path -> input width), the LM head
    included. Every block linear must have an entry of its width, and every block entry of the file a
    linear; the LM head and the token embedding may have none (llama-imatrix collects the output
    projection only with ``--process-output``, the embedding never): they are left out of the result."""
    names = gguf_names(in_features, n_blocks, arch, tied)
    owner = {name: path for path, name in names.items()}

    def mismatch(detail: str) -> ImatrixError:
        return ImatrixError(f"importance matrix {source} was made for another model: {detail}; collect one for this "
                            f"model (llama-imatrix, or --imatrix calibration)")

    for name in entries:
        if name not in owner and (_BLOCK.match(name) or name not in ("output.weight", "token_embd.weight")):
            raise mismatch(f"it has {name}, which this {n_blocks}-block model does not")
    out = {}
    for path, name in names.items():
        vector = entries.get(name)
        if vector is None:
            if _BLOCK.match(name):
                raise mismatch(f"it has no entry for {name}")
            continue
        if vector.size != in_features[path]:
            raise mismatch(f"{name} has {vector.size} values, this model's has {in_features[path]} input columns")
        out[path] = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32))
    return out


def model_importance(model: nn.Module, inventory, tokens: torch.Tensor, source: str = "calibration"
                     ) -> dict[str, torch.Tensor]:
    """Importance of every gene weight of ``inventory``, keyed by its module path.

    ``source`` "calibration": collected on ``tokens`` in one dense pass; else the path of a
    ``llama-imatrix`` file (checked against the model). A tied embedding gets the statistics of the
    LM head's input, the other use of the same tensor (llama-imatrix never collects the embedding)."""
    from .inventory import tied_embeddings

    head = model.get_output_embeddings()
    head_path = next((p for p, m in model.named_modules() if m is head), None) if head is not None else None
    linears = {w.path: w.in_features for w in inventory.weights if w.kind != "embedding"}
    if head_path is not None and head_path not in linears:
        linears[head_path] = head.weight.shape[1]
    tied = tied_embeddings(model)
    if source == "calibration":
        out = collect_importance(model, list(linears), tokens)
    else:
        arch = getattr(getattr(model, "config", None), "model_type", "llama") or "llama"
        out = importance_for_model(read_imatrix_file(source), linears, inventory.n_blocks, arch, tied, source)
    for w in inventory.weights:
        if w.kind == "embedding" and tied and head_path in out:
            out[w.path] = out[head_path]
    return out


__all__ = ["ImatrixError", "ImportanceCollector", "collect_importance", "read_imatrix_file", "gguf_names",
           "importance_for_model", "model_importance"]
