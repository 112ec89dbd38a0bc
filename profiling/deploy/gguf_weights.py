"""A GGUF's weights back in the Hugging Face model: what llama.cpp computes with, run in PyTorch.

Each tensor the layout knows is dequantised with gguf-py (bit-exact for the ggml types) and its q/k
rows are put back in Hugging Face order, so a PyTorch model can run exactly the file's weights: to
compare llama.cpp with PyTorch on identical weights, or to evaluate a downloaded GGUF with EMPAS's
PyTorch tools.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from .gguf_layout import GgufExportError, GgufLayout, TensorSpec, unpermute_rows
from .gguf_metadata import read_gguf


def file_weights(path: str | Path, layout: GgufLayout) -> Iterator[tuple[TensorSpec, np.ndarray]]:
    """(tensor, float32 values in HF layout) for every tensor of ``layout`` found in the file."""
    import gguf

    reader = read_gguf(path)
    found = {t.name: t for t in reader.tensors}
    missing = [t.name for t in layout.tensors if t.name not in found]
    if missing:
        raise GgufExportError(f"{path} lacks {len(missing)} tensors of this model (e.g. {missing[0]}): "
                              f"pass a GGUF of the same model")
    for spec in layout.tensors:
        t = found[spec.name]
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(spec.shape)
        yield spec, unpermute_rows(values, spec.rope_heads) if spec.rope_heads else values


def load_file_weights(model, path: str | Path, layout: GgufLayout) -> None:
    """Overwrite ``model``'s parameters in place with the file's (dequantised) weights."""
    import torch

    with torch.no_grad():
        for spec, values in file_weights(path, layout):
            param = model.get_parameter(spec.hf_name)
            param.copy_(torch.tensor(values, dtype=param.dtype))
