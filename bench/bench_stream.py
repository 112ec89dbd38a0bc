"""Benchmark: peak RSS of profiling a 1.1 B model streamed block by block vs in memory.

A random Llama with TinyLlama-1.1B's shapes (hidden 2048, 22 layers, intermediate 5632, vocab 32000,
4 KV heads) is written to a safetensors folder under /tmp, one shard per block, without ever holding
the whole model in memory (float32: ~4.4 GB on disk). Then, each in its own child process so the peak
RSS is the child's own, interleaved (streamed, in-memory, streamed, ...): load, dense pass, and the
KL cells of the linear genes of the last ``--genes-blocks`` blocks. The streamed run is capped by
``--max-memory-mib``; the S values of both paths are compared. The folder is removed afterwards.

    flock /tmp/empas-bench.lock python bench/bench_stream.py [--rounds 1] [--out bench/results/stream.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                 tie_word_embeddings=False, rms_norm_eps=1e-5)


def write_random_model(folder: Path, layers: int, seed: int = 0) -> int:
    """A random Llama (TinyLlama shapes) as sharded safetensors + a byte-level tokenizer; returns bytes."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(**{**TINYLLAMA, "num_hidden_layers": layers})
    config.save_pretrained(folder)
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)} | {"<unk>": 256, "<pad>": 257, "<eos>": 258}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    shards: dict[str, dict[str, tuple]] = {}
    for name, shape in shapes.items():
        shard = f"block-{int(name.split('.')[2]):03d}" if name.startswith("model.layers.") else "rest"
        shards.setdefault(shard, {})[name] = shape
    weight_map, total = {}, 0
    for shard, tensors in shards.items():
        data = {}
        for name, shape in tensors.items():
            if len(shape) == 1:  # norms
                data[name] = torch.ones(shape)
            else:
                data[name] = torch.randn(shape, generator=gen) * 0.02
            total += data[name].numel() * 4
        file = f"model-{shard}.safetensors"
        save_file(data, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in tensors})
        del data
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def child(args) -> None:
    """One measured run (in its own process): profile the chosen cells, print a JSON line."""
    import torch

    from profiling.sensitivity import kl_sensitivity, prepare
    from profiling.settings import ProfileSettings, QuantizerSettings
    from profiling.streaming import make_runner

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    settings = ProfileSettings(model=args.folder, granularity="linear",
                               quantizer=QuantizerSettings.parse("rtn", args.bits, 64),
                               calib_tokens=args.calib_tokens, heldout_tokens=args.seq_len, seq_len=args.seq_len,
                               device="cpu", dtype="float32",
                               max_memory_mib=args.max_memory_mib if args.mode == "streamed" else None,
                               stream=args.mode == "streamed")
    setup = prepare(settings)
    loaded_s = time.perf_counter() - started
    inv = setup.inventory
    first = inv.n_blocks - args.genes_blocks
    skip = {(i, q) for i, g in enumerate(inv.genes) if g.block < first for q in setup.quantizer.qtypes}
    runner = make_runner(setup.loaded.model, inv, setup.tokens.calibration)
    dense_s = time.perf_counter() - started - loaded_s
    values = kl_sensitivity(runner, inv, setup.quantizer, list(setup.quantizer.qtypes), skip)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "mode": args.mode, "peak_rss_mib": round(peak_kib / 1024, 1), "load_s": round(loaded_s, 2),
        "dense_pass_s": round(dense_s, 2), "cells": len(values),
        "cells_s": round(time.perf_counter() - started - loaded_s - dense_s, 2),
        "block_reads": getattr(setup.loaded.weights, "reads", None),
        "plan": setup.stream_plan.to_dict() if setup.stream_plan else None,
        "S": {f"{inv.genes[i].name}@{q}": v for (i, q), v in sorted(values.items())},
        "base_loss": runner.base_loss}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--max-memory-mib", type=int, default=1024)
    ap.add_argument("--genes-blocks", type=int, default=2, help="profile the linears of the last N blocks")
    ap.add_argument("--bits", default="4,16")
    ap.add_argument("--calib-tokens", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the random model is written (default: a /tmp folder)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "stream.json"))
    ap.add_argument("--child", choices=["streamed", "in-memory"], dest="mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        child(args)
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="empas-bench-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        t = time.perf_counter()
        total = write_random_model(work, args.layers)
        write_s = time.perf_counter() - t
        print(f"wrote {total / 2**30:.2f} GiB random model to {work} in {write_s:.0f} s", flush=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads),
                   EMPAS_CACHE_DIR=str(work / "cache"))
        for _ in range(args.rounds):
            for mode in ("streamed", "in-memory"):
                cmd = [sys.executable, __file__, "--child", mode, "--folder", str(work), *forwarded(args)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    raise SystemExit(f"{mode} run failed:\n{out.stderr[-3000:]}")
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = runs[-1]
                print(f"{mode:10} peak RSS {r['peak_rss_mib']:8.0f} MiB  load {r['load_s']:6.1f} s  "
                      f"dense {r['dense_pass_s']:6.1f} s  {r['cells']} cells {r['cells_s']:6.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    streamed = [r for r in runs if r["mode"] == "streamed"]
    memory = [r for r in runs if r["mode"] == "in-memory"]
    s_diff = max(abs(a - b) / max(abs(b), 1e-12) for x, y in zip(streamed, memory)
                 for a, b in zip(x["S"].values(), y["S"].values()) if b > 0)
    result = {
        "model": f"random Llama, TinyLlama-1.1B shapes, {args.layers} layers, float32 ({total / 2**30:.2f} GiB)",
        "max_memory_mib": args.max_memory_mib, "calib_tokens": args.calib_tokens, "bits": args.bits,
        "genes": f"linears of the last {args.genes_blocks} blocks", "threads": args.threads,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "write_s": round(write_s, 1),
        "peak_rss_mib": {"streamed": max(r["peak_rss_mib"] for r in streamed),
                         "in_memory": max(r["peak_rss_mib"] for r in memory)},
        "rss_ratio_streamed_over_in_memory": round(max(r["peak_rss_mib"] for r in streamed)
                                                   / max(r["peak_rss_mib"] for r in memory), 3),
        "max_relative_S_difference": s_diff,
        "runs": [{k: v for k, v in r.items() if k != "S"} for r in runs],
    }
    print(f"peak RSS streamed/in-memory = {result['rss_ratio_streamed_over_in_memory']:.3f}; "
          f"max relative S difference {s_diff:.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from storage.atomic import atomic_write_text

    atomic_write_text(Path(args.out), json.dumps(result, indent=1))
    print(f"wrote {args.out}")


def forwarded(args) -> list[str]:
    return ["--max-memory-mib", str(args.max_memory_mib), "--genes-blocks", str(args.genes_blocks), "--bits", args.bits,
            "--calib-tokens", str(args.calib_tokens), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]


if __name__ == "__main__":
    main()
