"""What a Llama-family model's GGUF file holds, and its exact size for a genome, without writing it.

A :class:`GgufLayout` lists the file's tensors (GGUF name, the Hugging Face parameter it comes from,
shape, block index) and its key/value metadata. A *genome* names a qtype per weight; its keys may be
GGUF names (``blk.3.ffn_down.weight``), Hugging Face parameter paths
(``model.layers.3.mlp.down_proj.weight``) or module paths (``model.layers.3.mlp.down_proj``). Weights it
does not name get a default type (F16); norms and other vectors are always F32, as llama.cpp keeps them.

Size: a GGUF is a header, the key/value pairs and one info record per tensor (none of which depends on
the tensor types: a type is a fixed-width field), padded to the alignment, then each tensor's bytes
padded to the alignment. :meth:`GgufLayout.file_bytes` adds those up; the header part is measured once
by having gguf-py's own ``GGUFWriter`` write it (:func:`populate_writer` is shared with the real writer,
so the prediction and the file cannot drift apart).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Mapping

from ..quantizers.ggml_types import catalogue, fallback_for

ARCH_NAME = "llama"  # gguf.MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA]
DEFAULT_QTYPE = "f16"
VECTOR_QTYPE = "f32"  # norms (and biases) stay in F32, as llama.cpp's converter and quantiser keep them


class GgufExportError(ValueError):
    """A genome or model that cannot become a GGUF; the message is one line naming the fix."""


@dataclass(frozen=True)
class LlamaHparams:
    """The hyper-parameters llama.cpp's type rules look at."""

    n_layers: int
    n_head: int
    n_head_kv: int
    n_embd: int
    n_vocab: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv  # llama.cpp's hparams.n_gqa(): integer division


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the file. ``shape`` is numpy's order: ``(out_features, in_features)`` for a matrix,
    whose rows of ``in_features`` values are what ggml quantises block by block."""

    name: str  # GGUF name
    hf_name: str  # the Hugging Face parameter it is made from
    shape: tuple[int, ...]
    layer: int | None  # decoder block, None for token_embd / output / output_norm
    rope_heads: int | None = None  # q/k rows are reordered for llama.cpp's rotary layout (see permute_rows)

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) == 2

    @property
    def in_features(self) -> int:
        return self.shape[-1]

    @property
    def rows(self) -> int:
        n = 1
        for d in self.shape[:-1]:
            n *= d
        return n

    def nbytes(self, qtype: str) -> int:
        """Bytes of the tensor's data at ``qtype`` (before alignment padding)."""
        return self.rows * row_bytes(qtype, self.in_features)


def permute_rows(weight, n_heads: int):
    """HF q/k rows -> llama.cpp's order. Hugging Face keeps each head's two rotary halves apart
    (rows 0..d/2-1, then d/2..d-1); llama.cpp interleaves them, as its converter's ``permute`` does."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def unpermute_rows(weight, n_heads: int):
    """Inverse of :func:`permute_rows`: llama.cpp's q/k rows -> Hugging Face's."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def row_bytes(qtype: str, n: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype.upper()]]
    return n // block * size


def ggml_enum(qtype: str):
    from gguf.constants import GGMLQuantizationType

    return GGMLQuantizationType[qtype.upper()]


def pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


#: llama.cpp's own mapping from a file's dominant tensor type to its file type (llama-model-loader's
#: guess): the K-quants map to their _M mixes, the others to MOSTLY_<type>.
_FTYPE_ALIASES = {"q3_k": "MOSTLY_Q3_K_M", "q4_k": "MOSTLY_Q4_K_M", "q5_k": "MOSTLY_Q5_K_M"}


def file_type_for(name: str) -> int:
    """The ``llama_ftype`` value for a preset ("Q4_K_M", "q8_0", "F16") or a tensor type ("q4_k")."""
    from gguf.constants import LlamaFileType

    key = name.strip().lower()
    member = _FTYPE_ALIASES.get(key, "MOSTLY_" + key.upper())
    if key == "f32":
        member = "ALL_F32"
    try:
        return int(LlamaFileType[member])
    except KeyError:
        raise GgufExportError(f"{name!r} is not a llama.cpp file type: use e.g. Q4_K_M, Q6_K, Q8_0 or F16") from None


@dataclass
class GgufLayout:
    """Tensors and metadata of one model's GGUF. ``metadata`` maps key -> ``gguf.GGUFValue`` and excludes
    what the writer sets itself (``GGUF.*``, ``general.architecture``, ``general.file_type``,
    ``general.quantization_version``, ``general.alignment``)."""

    tensors: tuple[TensorSpec, ...]
    metadata: dict
    hparams: LlamaHparams
    tied_embeddings: bool
    alignment: int = 32

    def __post_init__(self) -> None:
        self._by_name = {t.name: t for t in self.tensors}
        aliases = {}
        for t in self.tensors:
            aliases[t.hf_name] = t.name
            if t.hf_name.endswith(".weight"):  # the module path, as the inventory names linears
                aliases[t.hf_name.removesuffix(".weight")] = t.name
        if self.tied_embeddings:  # the LM head *is* the embedding: one tensor, token_embd
            aliases["lm_head.weight"] = aliases["lm_head"] = "token_embd.weight"
        self._aliases = aliases

    # -- names -------------------------------------------------------------------------------
    def tensor(self, key: str) -> TensorSpec:
        """The tensor a genome key names (GGUF name, HF parameter path or module path)."""
        name = key if key in self._by_name else self._aliases.get(key)
        if name is None:
            raise GgufExportError(f"genome names {key!r}, which is no tensor of this model: use GGUF names "
                                  f"(e.g. blk.0.ffn_down.weight) or HF paths (model.layers.0.mlp.down_proj)")
        return self._by_name[name]

    @property
    def matrices(self) -> list[TensorSpec]:
        return [t for t in self.tensors if t.is_matrix]

    # -- genomes -----------------------------------------------------------------------------
    def resolve(self, genome: Mapping[str, str], default: str = DEFAULT_QTYPE) -> dict[str, str]:
        """GGUF name -> qtype label for every tensor; checks each type exists and fits its rows."""
        known = catalogue()
        out = {t.name: (default if t.is_matrix else VECTOR_QTYPE) for t in self.tensors}
        given: dict[str, tuple[str, str]] = {}
        for key, qtype in genome.items():
            spec = self.tensor(key)
            label = str(qtype).strip().lower()
            if not spec.is_matrix:
                raise GgufExportError(f"{key} is a vector (a norm or bias): llama.cpp keeps it in F32, "
                                      f"leave it out of the genome")
            if spec.name in given and given[spec.name][1] != label:
                raise GgufExportError(f"genome gives {spec.name} two types ({given[spec.name][0]}={given[spec.name][1]}, "
                                      f"{key}={label}): name each tensor once")
            given[spec.name] = (key, label)
            out[spec.name] = label
        for name, label in out.items():
            spec = self._by_name[name]
            if not spec.is_matrix:
                continue
            if label not in known:
                raise GgufExportError(f"unknown type {label!r} for {name}: choose from {', '.join(known)}")
            if not known[label].fits(spec.in_features):
                raise GgufExportError(
                    f"{label} does not fit {name} (rows of {spec.in_features} are not a multiple of "
                    f"{known[label].block_size}): use {fallback_for(label, spec.in_features)}, as llama.cpp would")
        return out

    def tensor_bytes(self, key: str, qtype: str) -> int:
        """Bytes one tensor takes in the file at ``qtype``, alignment padding included."""
        return pad(self.tensor(key).nbytes(qtype), self.alignment)

    def file_bytes(self, genome: Mapping[str, str], default: str = DEFAULT_QTYPE) -> int:
        """The exact size of the GGUF this genome gives (what ``os.path.getsize`` will say)."""
        types = self.resolve(genome, default)
        return pad(self.metadata_bytes, self.alignment) + sum(
            pad(self._by_name[n].nbytes(q), self.alignment) for n, q in types.items())

    def file_type(self, types: Mapping[str, str]) -> int:
        """``general.file_type``: llama.cpp's own guess rule (the type of the most matrices), so a mixed
        genome is labelled by what dominates it; vectors are not counted (they are F32 in every file)."""
        counts = Counter(types[t.name] for t in self.matrices)
        dominant = max(sorted(counts), key=lambda q: counts[q]) if counts else DEFAULT_QTYPE
        return file_type_for(dominant)

    @cached_property
    def metadata_bytes(self) -> int:
        """Bytes before the first tensor's data (header, key/values, tensor infos), unpadded."""
        import gguf

        types = {t.name: (DEFAULT_QTYPE if t.is_matrix else VECTOR_QTYPE) for t in self.tensors}
        fd, tmp = tempfile.mkstemp(prefix=".empas-gguf-meta-", suffix=".tmp")
        os.close(fd)
        try:
            writer = gguf.GGUFWriter(tmp, ARCH_NAME)
            populate_writer(writer, self, types)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            writer.close()
            return os.path.getsize(tmp)
        finally:
            os.unlink(tmp)


def populate_writer(writer, layout: GgufLayout, types: Mapping[str, str]) -> None:
    """Put the layout's key/values and tensor infos (at ``types``) into a fresh ``gguf.GGUFWriter``."""
    import numpy as np
    from gguf.constants import GGML_QUANT_VERSION

    for key, value in layout.metadata.items():
        writer.add_key_value(key, value.value, value.type, sub_type=value.sub_type)
    writer.add_file_type(layout.file_type(types))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    if layout.alignment != 32:
        writer.add_custom_alignment(layout.alignment)
    for t in layout.tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes(types[t.name]),
                               raw_dtype=ggml_enum(types[t.name]))


# -- llama-quantize --tensor-type-file -------------------------------------------------------------------

def tensor_types_text(types: Mapping[str, str]) -> str:
    """A ``llama-quantize --tensor-type-file`` for GGUF name -> qtype: one ``^name$=TYPE`` per matrix.

    llama-quantize reads whitespace-separated ``regex=type`` items, lower-cases the regex and applies the
    first whose ``std::regex_search`` matches a tensor name; anchoring each regex to one whole name makes
    the order irrelevant. Vectors (F32) are left out: llama-quantize never quantises them.
    Note that llama-quantize applies overrides only when its ftype argument is a quantised one (pass
    e.g. Q8_0, not F16), and still applies its shape fallbacks afterwards.
    """
    known = catalogue()
    lines = []
    for name, qtype in types.items():
        label = str(qtype).strip().lower()
        if label == VECTOR_QTYPE:
            continue
        if label not in known:
            raise GgufExportError(f"unknown type {label!r} for {name}: choose from {', '.join(known)}")
        if not re.fullmatch(r"[a-z0-9_.]+", name):
            raise GgufExportError(f"{name!r} is not a GGUF tensor name: resolve the genome with GgufLayout.resolve first")
        lines.append(f"^{re.escape(name)}$={known[label].name}")
    return "\n".join(lines) + ("\n" if lines else "")


def parse_tensor_types_text(text: str) -> list[tuple[str, str]]:
    """``(regex, type name)`` pairs from a tensor-type file, read the way llama-quantize reads it."""
    pairs = []
    for item in text.split():
        pattern, sep, qtype = item.partition("=")
        if not sep or not pattern or not qtype:
            raise GgufExportError(f"malformed tensor type {item!r}: write regex=type, e.g. ^blk\\.0\\.attn_v\\.weight$=Q6_K")
        pairs.append((pattern.lower(), qtype))
    return pairs
