"""Benchmark: SmolLM2-135M dense vs fp16 vs uniform 4-bit vs a mixed genome, packed for real.

For each model, in one run: checkpoint MiB (tensor bytes of its weight file), the memory objective
(predicted), resident MiB (parameters + buffers in memory), peak RSS of a fresh process through load +
greedy generation, held-out PPL (and the same genome's fake-quantised PPL, which it must equal), and
generation tokens/s on this machine. Each model is measured in its own child process.

The mixed genome is a stand-in for the "balanced" archetype until that exists: 8 bits for the
``--top`` blocks most sensitive at 4 bits by a quick KL profile on 128 calibration tokens, 4 bits
elsewhere. ``--artifact FILE`` uses an exported artifact instead.

    python bench/bench_deploy.py [--artifact FILE] [--threads 1] [--heldout-tokens 512] [--gen-tokens 32]

Prints a table and writes bench/results/deploy.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from profiling.corpus import build_token_sets  # noqa: E402
from profiling.inventory import build_inventory  # noqa: E402
from profiling.models import LoadedModel, load_model  # noqa: E402
from profiling.packed import as_shipped, hardware_string, heldout_loss, measure_checkpoint  # noqa: E402
from profiling.quantizer import RTNQuantizer  # noqa: E402
from profiling.runner import PrefixRunner, quantized_weights  # noqa: E402
from storage.artifacts import Artifact, load_artifact, save_artifact  # noqa: E402
from storage.checkpoint import pack_loaded  # noqa: E402

MIB = 1024 * 1024


def memory_objective(inv, quantizer, genes: dict[str, int]) -> int:
    """fixed bytes + sum of the genes' cost table entries, i.e. ``Profile.memory_bytes``."""
    return int(inv.fixed_bytes + sum(quantizer.weight_bytes(lin.out_features, lin.in_features, genes[g.name])
                                     for g in inv.genes for lin in g.linears))


def make_artifact(loaded, inv, quantizer, name: str, genes: dict[str, int], metrics: dict | None = None) -> Artifact:
    return Artifact(archetype=name, model_id=loaded.model_id, model_fingerprint=loaded.fingerprint,
                    quantizer=quantizer.settings(), granularity=inv.granularity, genes=genes,
                    memory_bytes=memory_objective(inv, quantizer, genes), metrics=metrics or {},
                    source={"bench": "bench/bench_deploy.py"})


def mixed_genome(loaded, inv, quantizer, calibration, top: int) -> tuple[dict[str, int], dict]:
    """8 bits for the ``top`` blocks with the largest KL at 4 bits, 4 bits for the rest."""
    started = time.perf_counter()
    runner = PrefixRunner(loaded.model, inv, calibration)
    kl = {g.name: runner.kl_with([g], [4], quantizer) for g in inv.genes}
    chosen = sorted(kl, key=kl.get, reverse=True)[:top]
    genes = {g.name: 8 if g.name in chosen else 4 for g in inv.genes}
    return genes, {"predicted": {"kl_at_4_bits": kl, "raised_to_8": chosen,
                                 "profile_tokens": int(calibration.numel()),
                                 "profile_seconds": time.perf_counter() - started}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", default=None, help="genome to use as the mixed model (default: quick KL mix)")
    ap.add_argument("--top", type=int, default=6, help="blocks raised to 8 bits in the quick mix (default 6)")
    ap.add_argument("--heldout-tokens", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads everywhere (default 1: on this 2-core shared box 2 threads were 5-20x slower)")
    ap.add_argument("--keep", default=None, help="folder to keep the checkpoints in (default: a temp folder)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "deploy.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    loaded = load_model("default")
    inv = build_inventory(loaded.model, "block")
    quantizer = RTNQuantizer(64)
    tokens = build_token_sets(loaded.tokenizer, 128, args.heldout_tokens, args.seq_len)

    artifacts = [make_artifact(loaded, inv, quantizer, "fp16", {g.name: 16 for g in inv.genes}),
                 make_artifact(loaded, inv, quantizer, "uniform-4", {g.name: 4 for g in inv.genes})]
    if args.artifact:
        mixed = load_artifact(args.artifact)
        mixed.check_model(loaded.fingerprint, f" {args.artifact}")
        label = f"{mixed.archetype} ({Path(args.artifact).name})"
    else:
        genes, metrics = mixed_genome(loaded, inv, quantizer, tokens.calibration, args.top)
        mixed = make_artifact(loaded, inv, quantizer, f"mixed 8x{args.top}/4", genes, metrics)
        label = mixed.archetype
    artifacts.append(mixed)

    keep = Path(args.keep) if args.keep else None
    work = keep or Path(tempfile.mkdtemp(prefix="empas-bench-deploy-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for art, name in zip(artifacts, ["fp16 (every weight 16-bit)", "uniform-4", label]):
        bits = [art.genes[g.name] for g in inv.genes]
        with quantized_weights(loaded.model, inv.genes, bits, quantizer):
            profiled = heldout_loss(loaded.model, tokens.heldout)
        with as_shipped(loaded.model, inv, bits, quantizer):
            shipped = heldout_loss(loaded.model, tokens.heldout)
        art_path = save_artifact(art, work / f"{art.archetype.replace('/', '_').replace(' ', '_')}.json")
        out = work / art_path.stem
        copy_of = LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.model_id, loaded.fingerprint,
                              loaded.source_path)
        started = time.perf_counter()
        manifest = pack_loaded(copy_of, art, out, force=True, artifact_path=art_path)
        apply_seconds = time.perf_counter() - started
        del copy_of
        rows.append({"name": name, "path": str(out), "genes": art.genes, "memory_objective_bytes": art.memory_bytes,
                     "fake_quant_ppl": math.exp(profiled), "fake_quant_shipped_ppl": math.exp(shipped),
                     "apply_seconds": apply_seconds, "average_bits": manifest["average_bits"]})
    dense_row = {"name": "dense (fp32, as profiled)", "path": "default", "average_bits": None,
                 "memory_objective_bytes": memory_objective(inv, quantizer, {g.name: 16 for g in inv.genes})}
    del loaded  # the parent's memory does not count in the children's RSS, but keep the box light
    for row in [dense_row] + rows:
        print(f"measuring {row['name']} in a fresh process ...", file=sys.stderr, flush=True)
        row["measured"] = measure_checkpoint(row["path"], tokens.heldout, args.gen_tokens, threads=args.threads)
    rows = [dense_row] + rows

    result = {
        "command": "python bench/bench_deploy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "hardware": hardware_string(), "platform": platform.platform(),
        "threads": args.threads, "heldout_tokens": int(tokens.heldout.numel()), "seq_len": args.seq_len,
        "gen_tokens": args.gen_tokens, "model": "default (SmolLM2-135M-Instruct, dequantised Q4_1 GGUF)",
        "quantizer": quantizer.settings(), "seconds": time.perf_counter() - t0, "rows": rows,
    }
    if keep is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwrote {out}")
    return 0


def print_table(result: dict) -> None:
    print(f"SmolLM2-135M ({result['model']}); held-out {result['heldout_tokens']} tokens; "
          f"{result['gen_tokens']} greedy tokens; {result['hardware']}")
    print(f"{'model':26} {'avg bits':>8} {'ckpt MiB':>9} {'objective':>9} {'resident':>9} {'peak RSS':>9} "
          f"{'PPL':>8} {'PPL fq':>8} {'tok/s':>7}")
    for r in result["rows"]:
        m = r["measured"]
        avg = "-" if r.get("average_bits") is None else f"{r['average_bits']:.2f}"
        fq = r.get("fake_quant_shipped_ppl")
        print(f"{r['name'][:26]:26} {avg:>8} {m['checkpoint_bytes'] / MIB:9.1f} "
              f"{r['memory_objective_bytes'] / MIB:9.1f} {m['resident_bytes'] / MIB:9.1f} "
              f"{m['peak_rss_bytes'] / MIB:9.1f} {m['ppl']:8.3f} {'-' if fq is None else f'{fq:.3f}':>8} "
              f"{m['tokens_per_s']:7.2f}")
    base = result["rows"][0]["measured"]
    print(f"\ntok/s = best of 3 runs (all runs in the JSON). "
          f"All measured except 'objective' (the memory model, predicted; dense at 16 bits). Dense ckpt = "
          f"its fp32 safetensors. peak RSS includes the Python+torch runtime "
          f"(~{base['rss_baseline_bytes'] / MIB:.0f} MiB after imports). PPL fq = the genome fake-quantised on the dense "
          f"model with non-gene weights rounded to fp16 (what ships); as profiled (fp32 non-gene weights): "
          + ", ".join(f"{r['name']} {r['fake_quant_ppl']:.3f}" for r in result["rows"][1:]))


if __name__ == "__main__":
    sys.exit(main())
