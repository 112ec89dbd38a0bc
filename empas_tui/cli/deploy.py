"""Deployment commands: ``empas apply`` (artifact -> packed checkpoint), ``empas load`` (check one),
``empas measure`` (measured memory, PPL and speed side by side with the dense model), ``empas generate``
and ``empas serve`` (a small HTTP endpoint on 127.0.0.1).

``measure``, ``generate`` and ``serve`` take a GGUF file too: llama.cpp runs it (:mod:`.gguf`).
The engine does the work (:mod:`profiling.deploy`); this module parses options and prints.
"""

from __future__ import annotations

import math
import sys

from .output import print_json

MIB = 1024 * 1024


def register(sub) -> None:
    p = sub.add_parser("apply", help="pack a model with an artifact's bit-widths into a loadable checkpoint",
                       description="Load the artifact's model (refusing other weights), quantise every gene at its "
                                   "bit-width with the profiling quantiser, and save a packed checkpoint folder "
                                   "(safetensors + config + tokenizer + empas_packing.json), written atomically.")
    p.add_argument("artifact", metavar="FILE.json", help="artifact exported by `empas export`")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="checkpoint folder to create")
    p.add_argument("--model", default=None, help="model to pack (default: the artifact's model id); its weights "
                                                 "must match the artifact's fingerprint")
    p.add_argument("--force", action="store_true", help="replace DIR if it holds a previous EMPAS checkpoint")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(handler=run_apply)

    p = sub.add_parser("load", help="load a packed checkpoint (without the dense weights) and summarise it")
    p.add_argument("checkpoint", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run_load)

    p = sub.add_parser("measure", help="measure packed checkpoints or GGUF files: memory, PPL, tokens/s",
                       description="Each model is measured in a fresh Python process so its RSS is honest. "
                                   "With --dense the dense model is measured in the same run, and each genome's "
                                   "fake-quantised PPL is computed for comparison. A .gguf runs in llama.cpp: file "
                                   "bytes, load time, RSS, prompt and generation tokens/s, held-out PPL.")
    p.add_argument("checkpoints", nargs="+", metavar="DIR|FILE.gguf")
    add_measure_options(p)
    p.set_defaults(handler=run_measure)

    p = sub.add_parser("generate", help="greedy text generation with a packed checkpoint or a GGUF (llama.cpp)")
    p.add_argument("checkpoint", metavar="DIR|FILE.gguf")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--threads", type=int, default=None, help=GGUF_THREADS_HELP)
    p.add_argument("--json", action="store_true", help="print text and timing as JSON")
    p.set_defaults(handler=run_generate)

    p = sub.add_parser("serve", help="serve a packed checkpoint (POST /generate) or a GGUF (llama.cpp's "
                                     "OpenAI-compatible /v1/completions) over HTTP")
    p.add_argument("checkpoint", metavar="DIR|FILE.gguf")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="largest max_new_tokens a request may ask")
    p.add_argument("--max-prompt-chars", type=int, default=8000, help="longest prompt in characters")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="longest prompt in tokens (a GGUF's context "
                                                                        "holds this plus --max-new-tokens)")
    add_serve_limit_options(p)
    p.add_argument("--threads", type=int, default=None, help=GGUF_THREADS_HELP)
    p.add_argument("--api-key", default=None, help="GGUF: require this bearer token on every request")
    p.add_argument("--verbose", action="store_true", help="log each request on stderr")
    p.set_defaults(handler=run_serve)


def add_serve_limit_options(p) -> None:
    """Queue and time limits every ``empas serve`` backend takes (profiling.deploy.http_limits)."""
    from profiling.deploy.http_limits import ServeLimits

    d = ServeLimits()
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests that may wait for the model; more get 503 + Retry-After (default {d.max_queue})")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout_s, metavar="S",
                   help=f"seconds from a request's arrival to its answer; generation stops there and returns "
                        f"the text so far (default {d.request_timeout_s:g})")
    p.add_argument("--read-timeout", type=float, default=d.read_timeout_s, metavar="S",
                   help=f"seconds a client has to send its whole request (default {d.read_timeout_s:g})")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help=f"open connections at once; more get 503 (default {d.max_connections})")


def serve_limits(args, **sizes):
    """ServeLimits from the ``serve`` options (``sizes``: the backend's own prompt/body limits)."""
    from profiling.deploy.http_limits import ServeLimits

    return ServeLimits(max_queue=args.max_queue, request_timeout_s=args.request_timeout,
                       read_timeout_s=args.read_timeout, max_connections=args.max_connections, **sizes).check()


def add_measure_options(p) -> None:
    p.add_argument("--dense", action="store_true",
                   help="also measure the dense model (the checkpoints' source model) in the same run")
    p.add_argument("--model", default=None, help="dense model for --dense (default: the checkpoints' model id)")
    p.add_argument("--heldout-tokens", type=int, default=512, help="held-out tokens for PPL (default 512)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--text", default=None, help="plain-text file for the held-out set (default: built-in corpus)")
    p.add_argument("--gen-tokens", type=int, default=32, help="new tokens generated for tokens/s (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each measuring process (llama.cpp "
                                                              "threads for GGUF files: default half the CPUs)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


GGUF_THREADS_HELP = "llama.cpp threads for a .gguf (default: half the logical CPUs, llama-cpp-python's default)"


def _gguf_targets(paths) -> bool:
    """True for GGUF files, False for packed checkpoint folders; one line when they are mixed."""
    from ..jobs.run import is_gguf_target

    kinds = {is_gguf_target(p) for p in paths}
    if len(kinds) > 1:
        raise ValueError("GGUF files and packed checkpoint folders were mixed: measure each kind separately")
    return kinds == {True}


def run_measure(args) -> int:
    if _gguf_targets(args.checkpoints):
        from .gguf import run_measure_gguf

        return run_measure_gguf(args)
    return evaluate_checkpoints(args.checkpoints, args)


def _progress_printer(enabled: bool):
    """Progress lines on a terminal only, so a failing command prints just its one error line."""
    if not enabled or not sys.stderr.isatty():
        return lambda msg: None
    return lambda msg: print(f"empas: {msg}", file=sys.stderr, flush=True)


# -- apply / load ------------------------------------------------------------------------------------

def run_apply(args) -> int:
    from profiling.deploy.checkpoint import apply_artifact

    say = _progress_printer(not args.json)
    manifest = apply_artifact(args.artifact, args.output, model=args.model, force=args.force, progress=say)
    if args.json:
        print_json({"output": str(args.output), **manifest})
        return 0
    tb, mb = manifest["tensor_bytes"], manifest["memory_bytes"]
    print(f"wrote {args.output}: {len(manifest['genes'])} genes, {manifest['average_bits']:.2f} average bits, "
          f"{len(manifest['modules'])} packed linears")
    print(f"tensor bytes {tb:,} ({tb / MIB:.2f} MiB, measured from the file); artifact memory objective "
          f"{mb:,} ({mb / MIB:.2f} MiB); difference {100 * (tb - mb) / mb:+.3f}%")
    return 0


def load_summary(checkpoint) -> dict:
    """What `empas load` prints: counts, bytes (measured vs the memory model) and a forward check."""
    import torch

    from profiling.deploy.packing import packed_summary

    m = checkpoint.manifest
    by_bits: dict[int, int] = {}
    for q in m["genes"].values():
        by_bits[int(q)] = by_bits.get(int(q), 0) + 1
    ids = torch.tensor([[0, 1, 2]])
    with torch.no_grad():
        logits = checkpoint.model(input_ids=ids).logits
    summary = packed_summary(checkpoint.model)
    return {"path": str(checkpoint.path), "model": m["model"], "quantizer": m["quantizer"],
            "granularity": m["granularity"], "genes": len(m["genes"]), "genes_by_bits": dict(sorted(by_bits.items())),
            "average_bits": m["average_bits"], "tensor_bytes": m["tensor_bytes"], "memory_bytes": m.get("memory_bytes"),
            "resident_bytes": summary["resident_bytes"], "packed_modules": summary["packed_modules"],
            "forward_check": "ok" if bool(torch.isfinite(logits).all()) else "non-finite logits",
            "tokenizer": checkpoint.tokenizer is not None, "source_artifact": m.get("source_artifact", {}).get("path")}


def run_load(args) -> int:
    from profiling.deploy.checkpoint import load_packed

    s = load_summary(load_packed(args.checkpoint))
    if args.json:
        print_json(s)
        return 0 if s["forward_check"] == "ok" else 1
    print(f"checkpoint {s['path']}")
    print(f"model {s['model']['id']} (weights {s['model']['fingerprint'][:12]}), quantiser {s['quantizer']}, "
          f"{s['granularity']} genes: {s['genes']}")
    print("genes by bits: " + ", ".join(f"{b}-bit: {n}" for b, n in s["genes_by_bits"].items())
          + f"; average {s['average_bits']:.2f} bits per gene weight")
    mem = s["memory_bytes"]
    print(f"tensor bytes {s['tensor_bytes'] / MIB:.2f} MiB (file), memory objective "
          f"{mem / MIB:.2f} MiB (predicted), resident after load {s['resident_bytes'] / MIB:.2f} MiB (measured)"
          if mem else f"tensor bytes {s['tensor_bytes'] / MIB:.2f} MiB")
    print(f"{s['packed_modules']} packed linears; forward check: {s['forward_check']}"
          + ("" if s["tokenizer"] else "; no tokenizer saved (generate/serve need one)"))
    return 0 if s["forward_check"] == "ok" else 1


# -- measure ---------------------------------------------------------------------------------------------

def evaluate_checkpoints(paths: list[str], args) -> int:
    """``empas measure DIR...`` (and ``empas evaluate DIR``): one table, every model in its own process."""
    from profiling.deploy.checkpoint import read_manifest
    from profiling.deploy.measure import measure_checkpoint

    heldout_tokens = getattr(args, "heldout_tokens", 512)
    seq_len = getattr(args, "seq_len", 128)
    gen_tokens = getattr(args, "gen_tokens", 32)
    want_json = getattr(args, "json", False)
    if gen_tokens is None or gen_tokens < 0:
        raise ValueError("--gen-tokens must be >= 0")
    manifests = [read_manifest(p) for p in paths]  # cheap checks before any model is loaded
    fingerprints = {m["model"]["fingerprint"] for m in manifests}
    if len(fingerprints) > 1:
        raise ValueError("the checkpoints were made from different models: measure each model's checkpoints separately")
    tokens = _heldout_tokens(paths[0], heldout_tokens, seq_len, getattr(args, "text", None))
    say = _progress_printer(not want_json)
    rows = []
    dense_spec = None
    if getattr(args, "dense", False):
        dense_spec = getattr(args, "model", None) or manifests[0]["model"]["id"]
        say(f"fake-quantised PPL of each genome on the dense model {dense_spec}")
        reference = _fake_quant_losses(dense_spec, paths, manifests, tokens)
        say(f"measuring dense {dense_spec} in a fresh process")
        rows.append({"name": "dense", **measure_checkpoint(dense_spec, tokens, gen_tokens,
                                                          threads=getattr(args, "threads", None))})
    else:
        reference = {}
    for path, manifest in zip(paths, manifests):
        say(f"measuring {path} in a fresh process")
        row = {"name": str(path), **measure_checkpoint(path, tokens, gen_tokens, threads=getattr(args, "threads", None))}
        row.update(reference.get(str(path), {}))
        rows.append(row)
    result = {"heldout_tokens": int(tokens.numel()), "seq_len": int(tokens.shape[1]), "gen_tokens": gen_tokens,
              "hardware": rows[0].get("hardware"), "rows": rows}
    if want_json:
        print_json(result)
    else:
        print_measure_table(result)
    return 0


def _heldout_tokens(checkpoint: str, heldout_tokens: int, seq_len: int, text):
    from pathlib import Path

    from profiling.corpus import build_token_sets
    from profiling.deploy.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(Path(checkpoint))
    if tokenizer is None:
        raise ValueError(f"{checkpoint} has no tokenizer: re-create it with `empas apply` from a model that has one")
    return build_token_sets(tokenizer, calib_tokens=seq_len, heldout_tokens=heldout_tokens, seq_len=seq_len,
                            text_file=text).heldout


def _fake_quant_losses(dense_spec: str, paths, manifests, tokens) -> dict:
    """Held-out loss of each genome fake-quantised on the dense model: as profiled (``quantized_weights``)
    and as shipped (non-gene weights rounded to 16 bits too). The packed PPL must equal the latter."""
    from profiling.deploy.checkpoint import DTYPES
    from profiling.deploy.generation import heldout_loss
    from profiling.deploy.packing import as_shipped
    from profiling.inventory import build_inventory
    from profiling.models import load_model
    from profiling.quantizers.rtn import RTNQuantizer
    from profiling.runner import quantized_weights

    loaded = load_model(dense_spec)
    out = {}
    for path, m in zip(paths, manifests):
        if m["model"]["fingerprint"] != loaded.fingerprint:
            out[str(path)] = {"fake_quant_note": f"dense model {dense_spec} has other weights than the checkpoint"}
            continue
        inv = build_inventory(loaded.model, m["granularity"])
        q = RTNQuantizer(int(m["quantizer"]["group_size"]))
        bits = [str(m["genes"][g.name]) for g in inv.genes]
        with quantized_weights(loaded.model, inv.genes, bits, q):
            profiled = heldout_loss(loaded.model, tokens)
        with as_shipped(loaded.model, inv, bits, q, DTYPES.get(m.get("storage_dtype", "float16"))):
            shipped = heldout_loss(loaded.model, tokens)
        out[str(path)] = {"fake_quant_ppl": math.exp(profiled), "fake_quant_shipped_ppl": math.exp(shipped)}
    return out


def _mib(x) -> str:
    return "-" if x is None else f"{x / MIB:.1f}"


def print_measure_table(result: dict, stream=None) -> None:
    w = (stream or sys.stdout).write
    header = (f"{'model':28} {'avg bits':>8} {'ckpt MiB':>9} {'resident':>9} {'peak RSS':>9} {'PPL':>9} "
              f"{'PPL fq':>9} {'tok/s':>7}")
    w(header + "\n")
    for r in result["rows"]:
        name = r["name"] if len(r["name"]) <= 28 else "..." + r["name"][-25:]
        avg = f"{r['average_bits']:.2f}" if r.get("average_bits") is not None else r.get("compute_dtype", "")
        fq = r.get("fake_quant_shipped_ppl")
        w(f"{name:28} {avg:>8} {_mib(r.get('checkpoint_bytes')):>9} {_mib(r.get('resident_bytes')):>9} "
          f"{_mib(r.get('peak_rss_bytes')):>9} {r['ppl']:9.3f} {'-' if fq is None else f'{fq:.3f}':>9} "
          f"{r.get('tokens_per_s', float('nan')):7.2f}\n")
    w(f"\nall measured: held-out PPL on {result['heldout_tokens']} tokens ({result['seq_len']}-token sequences); "
      f"tok/s = best of 3 greedy generations of {result['gen_tokens']} new tokens after a warm-up, on "
      f"{result['hardware']}.\n")
    w("resident = bytes of parameters + buffers in memory; peak RSS = the measuring process's peak through "
      "load + generation (it includes the Python/torch runtime); PPL fq = the same genome fake-quantised on the "
      "dense model with non-gene weights rounded to 16 bits (what the checkpoint ships).\n")
    for r in result["rows"]:
        if r.get("memory_model_bytes"):
            diff = 100 * (r["checkpoint_bytes"] - r["memory_model_bytes"]) / r["memory_model_bytes"]
            w(f"{r['name']}: checkpoint tensor bytes {r['checkpoint_bytes']:,} vs memory objective "
              f"{r['memory_model_bytes']:,} (predicted): {diff:+.3f}%\n")


# -- generate --------------------------------------------------------------------------------------------

def _check_positive(name: str, value: int) -> None:
    if value is None or value < 1:
        raise ValueError(f"{name} must be a positive integer")


def run_generate(args) -> int:
    from profiling.deploy.checkpoint import load_packed
    from profiling.deploy.generation import generate_text

    if _gguf_targets([args.checkpoint]):
        from .gguf import run_generate_gguf

        return run_generate_gguf(args)
    _check_positive("--max-new-tokens", args.max_new_tokens)
    if not args.prompt.strip():
        raise ValueError("--prompt is empty: pass some text to continue")
    checkpoint = load_packed(args.checkpoint)
    if checkpoint.tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer: re-create it with `empas apply`")
    out = generate_text(checkpoint.model, checkpoint.tokenizer, args.prompt, args.max_new_tokens, chat=args.chat)
    if args.json:
        print_json(out)
    else:
        print(out["text"])
        print(f"empas: {out['new_tokens']} new tokens in {out['seconds']:.2f}s "
              f"({out['tokens_per_s']:.2f} tokens/s measured, {out['prompt_tokens']} prompt tokens)", file=sys.stderr)
    return 0


# -- serve -----------------------------------------------------------------------------------------------

def run_serve(args) -> int:
    from profiling.deploy.checkpoint import load_packed
    from profiling.deploy.serve import make_server, service_for

    if _gguf_targets([args.checkpoint]):
        from .gguf import run_serve_gguf

        return run_serve_gguf(args)
    if args.api_key:
        raise ValueError("--api-key works with GGUF files (llama.cpp's server); the packed-checkpoint server has "
                         "no authentication: keep it on 127.0.0.1")
    for name in ("max_new_tokens", "max_prompt_chars", "max_prompt_tokens"):
        _check_positive("--" + name.replace("_", "-"), getattr(args, name))
    if not 0 <= args.port <= 65535:
        raise ValueError("--port must be from 0 to 65535")
    limits = serve_limits(args, max_new_tokens=args.max_new_tokens, default_new_tokens=min(64, args.max_new_tokens),
                          max_prompt_chars=args.max_prompt_chars, max_prompt_tokens=args.max_prompt_tokens,
                          max_body_bytes=max(4096, 4 * args.max_prompt_chars + 1024))
    checkpoint = load_packed(args.checkpoint)
    if checkpoint.tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer: re-create it with `empas apply`")
    try:
        server = make_server(service_for(checkpoint, limits), args.host, args.port, args.verbose)
    except OSError as exc:
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}): pick another --port") from None
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"empas: warning: listening on {args.host}, reachable from other machines; there is no authentication",
              file=sys.stderr)
    print(f"empas: serving {args.checkpoint} on http://{host}:{port}  (POST /generate, GET /health; Ctrl-C stops)",
          file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
