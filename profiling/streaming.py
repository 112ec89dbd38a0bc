"""Models larger than memory: the decoder blocks stay on disk and are read one at a time.

The model is built as a skeleton on the meta device (accelerate's ``init_empty_weights``); what is
outside the blocks (embedding, final norm, head, rotary buffers) is read once and stays resident on
the device. Each decoder block gets a forward pre-hook that reads its weights from the safetensors
files (memory-mapped through ``safe_open``) onto the device in the compute dtype, and a forward hook
that sends them back to ``meta``; so any forward of the model, or of a block, streams, and at most one
block is resident at a time. That is the GPTQ-style sequential execution: the
:class:`~profiling.runner.PrefixRunner`'s dense pass caches the hidden states entering each block, and
a measurement re-runs blocks *k..end*, each read once.

A block's weights that a measurement quantises are quantised as the block is read
(:meth:`BlockStreamer.quantized`, used by :func:`~profiling.runner.quantized_weights` for any streamed
model), so profiling, evaluation and the measured search work unchanged on a streamed model.
:class:`StreamedRunner` adds :meth:`~StreamedRunner.kl_batch`: all the cells of one block measured in
one pass over blocks *k..end* (one hidden-state tensor per candidate), instead of one pass per cell.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .inventory import Gene, find_blocks, get_weight, set_weight, tied_embeddings
from .runner import PrefixRunner, _first_tensor, fake_quantize_as, quantized_weights
from .settings import SettingsError

STREAMER_ATTR = "_empas_streamer"
MIB = 1024 * 1024


class SafetensorsWeights:
    """The tensors of a safetensors folder by name; each read is memory-mapped from its file."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise SettingsError(f"{self.folder} has no *.safetensors files: streaming (--max-memory-mib) needs them; "
                                f"convert the model with save_pretrained(safe_serialization=True)")
        self.file_of: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    self.file_of[name] = f

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """``names`` -> CPU tensors, each file opened once; the file is unmapped when this returns."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.file_of]
        if missing:
            raise SettingsError(f"{self.folder} has no tensor {missing[0]!r}: streaming needs safetensors names "
                                f"that match the model's modules")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.file_of[n], []).append(n)
        out = {}
        for f, group in by_file.items():
            with safe_open(str(f), framework="pt") as fh:
                for n in group:
                    out[n] = fh.get_tensor(n)
        return out


class BlockStreamer:
    """Hooks that read each decoder block onto the device when it runs and drop it afterwards."""

    def __init__(self, model: nn.Module, weights: SafetensorsWeights, device: torch.device, dtype: torch.dtype):
        self.model, self.weights, self.device, self.dtype = model, weights, device, dtype
        self.blocks_path, self.blocks = find_blocks(model)
        self.resident: set[int] = set()
        self.pinned: set[int] = set()
        self.pending: dict[int, list[tuple]] = {}  # block -> [(weight ref, qtype, quantizer, importance)]
        self.reads = 0  # blocks read from disk (for tests and benchmarks)
        self.peak_resident = 0
        self._handles = []
        for index, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._before(index)))
            self._handles.append(block.register_forward_hook(self._after(index)))
        setattr(model, STREAMER_ATTR, self)

    def _before(self, index: int):
        def hook(_module, _args):
            self.load(index)
        return hook

    def _after(self, index: int):
        def hook(_module, _args, _output):
            if index not in self.pinned:
                self.release(index)
        return hook

    def load(self, index: int) -> None:
        if index in self.resident:
            return
        block = self.blocks[index]
        prefix = f"{self.blocks_path}.{index}."
        names = list(block.state_dict().keys())
        tensors = self.weights.read([prefix + n for n in names])
        state = {n: tensors[prefix + n].to(self.device, self.dtype) for n in names}
        block.load_state_dict(state, strict=True, assign=True)
        for p in block.parameters():
            p.requires_grad_(False)
        self.resident.add(index)
        self.reads += 1
        self.peak_resident = max(self.peak_resident, len(self.resident))
        for ref, qtype, quantizer, importance in self.pending.get(index, []):
            set_weight(self.model, ref, fake_quantize_as(quantizer, get_weight(self.model, ref).detach(), qtype,
                                                         importance))

    def release(self, index: int) -> None:
        if index in self.resident:
            self.blocks[index].to("meta")
            self.resident.discard(index)

    @contextlib.contextmanager
    def pinned_block(self, index: int) -> Iterator[nn.Module]:
        """Keep block ``index`` resident for several calls (a batch of candidates)."""
        self.load(index)
        self.pinned.add(index)
        try:
            yield self.blocks[index]
        finally:
            self.pinned.discard(index)
            self.release(index)

    @contextlib.contextmanager
    def quantized(self, genes, qtypes, quantizer, importance=None) -> Iterator[tuple[list, list]]:
        """Quantise the weights of genes in non-resident blocks as their block is read; yields the
        (genes, qtypes) left for the caller: those outside the blocks or in a resident block."""
        rest_genes, rest_qtypes, added = [], [], []
        for gene, qtype in zip(genes, qtypes):
            if qtype == quantizer.unquantized:
                continue
            if 0 <= gene.block < len(self.blocks) and gene.block not in self.resident:
                for ref in gene.weights:
                    imp = importance.get(ref.path) if importance else None
                    entry = (ref, qtype, quantizer, imp)
                    self.pending.setdefault(ref.block, []).append(entry)
                    added.append(entry)
            else:
                rest_genes.append(gene)
                rest_qtypes.append(qtype)
        try:
            yield rest_genes, rest_qtypes
        finally:
            for entry in added:
                self.pending[entry[0].block].remove(entry)
            self.pending = {k: v for k, v in self.pending.items() if v}


def streamer_of(model: nn.Module) -> BlockStreamer | None:
    return getattr(model, STREAMER_ATTR, None)


# -- sizes and the decision ------------------------------------------------------------------------

@dataclass(frozen=True)
class StreamPlan:
    """How big the model is in the compute dtype, and whether it is streamed."""

    total_bytes: int
    largest_block_bytes: int
    outside_blocks_bytes: int  # embedding, head (once if tied), norms: resident while streaming
    stream: bool

    @property
    def minimum_mib(self) -> int:
        """The smallest --max-memory-mib that streaming can hold: the resident rest plus one block."""
        return -(-(self.largest_block_bytes + self.outside_blocks_bytes) // MIB)

    def to_dict(self) -> dict:
        return {"total_mib": round(self.total_bytes / MIB, 1),
                "largest_block_mib": round(self.largest_block_bytes / MIB, 1),
                "outside_blocks_mib": round(self.outside_blocks_bytes / MIB, 1), "stream": self.stream}


def skeleton(folder: str | Path, dtype: torch.dtype) -> nn.Module:
    """The model of ``folder``'s config with every parameter on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cannot read the model config in {folder}: {str(exc).splitlines()[0]}") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def plan_for(model: nn.Module, dtype: torch.dtype, max_memory_mib: int | None, force: bool | None) -> StreamPlan:
    """Stream when forced or when the weights exceed the cap; refuse a cap below one block + the rest."""
    blocks_path, blocks = find_blocks(model)
    size = torch.finfo(dtype).bits // 8
    block_bytes = [sum(p.numel() for p in b.parameters()) * size for b in blocks]
    total = sum(p.numel() for p in model.parameters()) * size
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and head is not None and head.weight is not emb.weight:
        total -= head.weight.numel() * size  # the skeleton is not tied yet; the loaded model shares one tensor
    outside = total - sum(block_bytes)
    cap = None if max_memory_mib is None else max_memory_mib * MIB
    stream = bool(force) or (force is None and cap is not None and total > cap)
    plan = StreamPlan(total, max(block_bytes), outside, stream)
    if stream and cap is not None and cap < plan.largest_block_bytes + outside:
        raise SettingsError(f"--max-memory-mib {max_memory_mib} is smaller than one decoder block plus the "
                            f"embeddings and head ({plan.minimum_mib} MiB in {str(dtype).removeprefix('torch.')}): "
                            f"pass --max-memory-mib {plan.minimum_mib} or more")
    return plan


def plan_streaming(settings, placement) -> tuple[StreamPlan, tuple[str, str, str]]:
    """The :class:`StreamPlan` of ``settings``' model (its config only, no weights read) and
    (model id, folder, fingerprint)."""
    from .models import model_folder

    where = model_folder(settings.model)
    plan = plan_for(skeleton(where[1], placement.dtype), placement.dtype, settings.max_memory_mib, settings.stream)
    return plan, where


def load_streamed(where: tuple[str, str, str], placement):
    """A :class:`~profiling.models.LoadedModel` whose blocks are read from disk as they run."""
    from .models import LoadedModel, load_tokenizer

    model_id, folder, fingerprint = where
    device, dtype = placement.device, placement.dtype
    model = skeleton(folder, dtype)
    weights = SafetensorsWeights(folder)
    blocks_path, _ = find_blocks(model)
    head = model.get_output_embeddings()
    head_name = next((f"{n}.weight" for n, m in model.named_modules() if m is head), None) if head is not None else None
    # Tied as from_pretrained ties: by the config (save_pretrained writes the shared tensor once).
    tied = tied_embeddings(model) or (head_name is not None and bool(getattr(model.config, "tie_word_embeddings",
                                                                             False)))
    outside = [n for n, _ in model.named_parameters()
               if not n.startswith(blocks_path + ".") and not (tied and n == head_name)]
    tensors = weights.read(outside)
    model.load_state_dict({n: t.to(device, dtype) for n, t in tensors.items()}, strict=False, assign=True)
    if tied:  # assign replaced the shared parameter on one side only
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    for module in model.modules():  # rotary tables and other buffers, outside the blocks
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device.type != "meta":
                module._buffers[name] = buf.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    loaded = LoadedModel(model, load_tokenizer(folder), model_id=model_id, fingerprint=fingerprint,
                         source_path=folder)
    loaded.weights = BlockStreamer(model, weights, device, dtype)
    return loaded


# -- the runner ------------------------------------------------------------------------------------

class StreamedRunner(PrefixRunner):
    """A :class:`PrefixRunner` on a streamed model, measuring a block's cells in one pass."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.streamer = streamer_of(self.model)
        if self.streamer is None:
            raise ValueError("StreamedRunner needs a model from load_streamed")

    @torch.no_grad()
    def kl_batch(self, candidates: list[tuple[list[Gene], list[str]]], quantizer) -> list[float]:
        """KL of each candidate (genes, qtypes), all of whose quantised genes are in one block ``k``:
        blocks ``k..end`` are read once for the whole batch."""
        starts = {g.block for genes, qtypes in candidates for g, q in zip(genes, qtypes) if q != quantizer.unquantized}
        if len(starts) != 1 or not self.reuse_prefix or not 0 <= min(starts) < len(self.blocks):
            return [self.kl_with(genes, qtypes, quantizer) for genes, qtypes in candidates]
        start = starts.pop()
        hidden_in, rest, kwargs = self.block_inputs[start]
        with self.streamer.pinned_block(start) as block:
            hiddens = []
            for genes, qtypes in candidates:
                with quantized_weights(self.model, genes, qtypes, quantizer, self.importance):
                    hiddens.append(_first_tensor(block(hidden_in, *rest, **kwargs)))
        for index in range(start + 1, len(self.blocks)):
            _, rest, kwargs = self.block_inputs[index]
            with self.streamer.pinned_block(index) as block:
                hiddens = [_first_tensor(block(h, *rest, **kwargs)) for h in hiddens]
        out = []
        for h in hiddens:
            if self.final_norm is not None:
                h = self.final_norm(h)
            out.append(self.dense.mean_kl(self.lm_head(h)))
        return out


def make_runner(model: nn.Module, inventory, tokens: torch.Tensor, reuse_prefix: bool = True, importance=None):
    """The runner for ``model``: streamed when its blocks are on disk, else the in-memory one."""
    cls = StreamedRunner if streamer_of(model) is not None else PrefixRunner
    return cls(model, inventory, tokens, reuse_prefix=reuse_prefix, importance=importance)


__all__ = ["BlockStreamer", "SafetensorsWeights", "StreamPlan", "StreamedRunner", "load_streamed", "make_runner",
           "plan_for", "plan_streaming", "skeleton", "streamer_of"]
