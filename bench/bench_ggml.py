"""Benchmark: the ggml quantiser backend's speed and error per type, with and without an importance matrix.

1. Time to quantise float32 Gaussian matrices (out x in) 1536x576 (SmolLM2's gate/up: rows of 576, so
   no K-quants), 576x1536 (its down_proj) and 1536x1536 to each type through ggml's C code, with and
   without an importance vector, one thread, median of ``--repeats``; plus the time to dequantise
   (gguf.quants) and the whole ``fake_quantize``.
2. On SmolLM2-135M's ``model.layers.0.mlp.down_proj`` (576x1536; its weights lie on a Q4_1 grid, see
   design.md 1b): relative weight MSE ``|Q(W) - W|^2 / |W|^2`` and relative output MSE on held-out
   activations ``|X (Q(W) - W)^T|^2 / |X W^T|^2``, without and with the importance collected on the
   calibration tokens (mean x^2 per input column, as llama-imatrix).

    python bench/bench_ggml.py [--repeats 3] [--calib-tokens 512] [--out bench/results/ggml.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from profiling.corpus import build_token_sets  # noqa: E402
from profiling.imatrix import ImportanceCollector  # noqa: E402
from profiling.models import load_model  # noqa: E402
from profiling.quantizers.ggml import GgmlQuantizer  # noqa: E402
from profiling.quantizers.ggml_types import SUPPORTED  # noqa: E402
from storage.atomic import atomic_write_text  # noqa: E402

SHAPES = ((1536, 576), (576, 1536), (1536, 1536))
LAYER = "model.layers.0.mlp.down_proj"


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 2)


def timings(q: GgmlQuantizer, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for out_f, in_f in SHAPES:
        w = rng.standard_normal((out_f, in_f)).astype(np.float32)
        imp = (rng.random(in_f) ** 2 + 1e-3).astype(np.float32)
        wt, impt = torch.from_numpy(w), torch.from_numpy(imp)
        for label in q.qtypes:
            row = {"shape": f"{out_f}x{in_f}", "qtype": label}
            if not q.valid_for(label, out_f, in_f):
                rows.append({**row, "valid": False})
                continue
            data = q.quantize_bytes(w, label)
            rows.append({**row, "valid": True,
                         "quantize_ms": median_ms(lambda: q.quantize_bytes(w, label), repeats),
                         "quantize_imatrix_ms": median_ms(lambda: q.quantize_bytes(w, label, imp), repeats),
                         "dequantize_ms": median_ms(lambda: q.dequantize_bytes(data, label, w.shape), repeats),
                         "fake_quantize_imatrix_ms": median_ms(lambda: q.fake_quantize(wt, label, impt), repeats)})
            print(rows[-1], flush=True)
    return rows


@torch.no_grad()
def smollm_errors(q: GgmlQuantizer, calib_tokens: int) -> list[dict]:
    loaded = load_model("default")
    model = loaded.model.eval()
    tokens = build_token_sets(loaded.tokenizer, calib_tokens=calib_tokens, heldout_tokens=calib_tokens)
    with ImportanceCollector(model, [LAYER]) as calib:
        model(input_ids=tokens.calibration, use_cache=False)
    importance = calib.importance()[LAYER]
    held = []
    module = model.get_submodule(LAYER)
    handle = module.register_forward_pre_hook(lambda m, args: held.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        model(input_ids=tokens.heldout, use_cache=False)
    finally:
        handle.remove()
    x, w = torch.cat(held).double(), module.weight.detach()
    dense_out = (x @ w.double().T).square().sum().item()
    rows = []
    for label in q.qtypes:
        row = {"qtype": label, "bits_per_weight": q.bits_per_weight(label)}
        if not q.valid_for(label, *w.shape):
            rows.append({**row, "valid": False})
            continue
        for tag, imp in (("", None), ("_imatrix", importance)):
            fq = q.fake_quantize(w, label, imp).double()
            diff = fq - w.double()
            row["rel_mse" + tag] = diff.square().sum().item() / w.double().square().sum().item()
            row["rel_output_mse" + tag] = (x @ diff.T).square().sum().item() / dense_out
        rows.append({**row, "valid": True})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calib-tokens", type=int, default=512)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ggml.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    q = GgmlQuantizer([s.lower() for s in SUPPORTED], imatrix="calibration", threads=1)
    result = {"machine": platform.platform(), "processor": platform.processor(), "ggml": q.library_version,
              "threads": 1, "repeats": args.repeats, "timings": timings(q, args.repeats),
              "smollm2_layer": LAYER, "calib_tokens": args.calib_tokens, "errors": smollm_errors(q, args.calib_tokens)}
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
