"""The GGUF side of ``empas generate / measure / serve / evaluate``: llama.cpp runs the file.

The commands' own modules (:mod:`.deploy`, :mod:`.evaluate`) hand a ``.gguf`` here; the work is in
:mod:`empas_tui.jobs.run`, this module turns options into calls and results into text.
"""

from __future__ import annotations

import math
import sys
from typing import Sequence

from .output import ProgressBar, print_json

MIB = 1024 * 1024


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _progress(enabled: bool, label: str):
    bar = ProgressBar(label, enabled=enabled, stream=sys.stderr)
    return bar, (lambda done, total, name: bar.update(done, total, name))


# -- generate --------------------------------------------------------------------------------------------

def run_generate_gguf(args) -> int:
    from ..jobs.run import generate_gguf

    out = generate_gguf(args.checkpoint, args.prompt, args.max_new_tokens, threads=args.threads, chat=args.chat)
    if args.json:
        print_json(out.to_dict())
        return 0
    g = out.generation
    print(g.text)
    print(f"empas: llama.cpp, {_threads(g.n_threads)} on {g.hardware}: {g.new_tokens} new tokens at "
          f"{g.generation_tokens_per_s:.1f} tokens/s, prompt {g.prompt_tokens} tokens at {g.prompt_tokens_per_s:.1f} "
          f"tokens/s; loaded in {out.load_seconds:.2f} s (all measured)", file=sys.stderr)
    return 0


# -- measure ---------------------------------------------------------------------------------------------

def run_measure_gguf(args) -> int:
    from ..jobs.run import measure_gguf_files

    if getattr(args, "dense", False):
        raise ValueError("--dense measures a packed checkpoint's dense model: for GGUF files pass the F16 GGUF "
                         "as one more file (`empas evaluate --engine llamacpp --baselines` writes one)")
    bar, progress = _progress(not args.json, "measuring")
    result = measure_gguf_files(args.checkpoints, args.heldout_tokens, args.seq_len, args.text, args.gen_tokens,
                                threads=args.threads, progress=progress)
    bar.close()
    if args.json:
        print_json(result.to_dict())
    else:
        print(render_measure(result), end="")
    return 0


def _cell(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)


def render_measure(result) -> str:
    headers = ("file", "file MB", "load s", "RSS load MiB", "peak RSS MiB", "prompt tok/s", "gen tok/s", "PPL")
    rows = []
    for r in result.rows:
        rows.append([_short(r["path"]), _cell(r["file_bytes"] / 1e6, ".1f"), _cell(r["load_seconds"], ".2f"),
                     _cell(r["rss_after_load_bytes"] / MIB, ".1f"), _cell(r["peak_rss_bytes"] / MIB, ".1f"),
                     _cell(r.get("prompt_tokens_per_s"), ".1f"), _cell(r.get("generation_tokens_per_s"), ".1f"),
                     _cell(r["ppl"], ".3f")])
    prompt = result.rows[0].get("prompt_tokens") if result.rows else None
    notes = [f"all measured in llama.cpp, each file in a fresh process, {_threads(result.n_threads)} on {result.hardware}",
             f"held-out PPL from llama.cpp's logits on {result.heldout_tokens} tokens ({result.tokens_source}; "
             f"{result.seq_len}-token sequences, each from an empty context)"]
    if result.gen_tokens > 0:
        notes.append(f"tokens/s: median of {result.repeats} greedy runs after a warm-up: a {prompt}-token prompt "
                     f"processed in one batch (prompt tok/s), then {result.gen_tokens} new tokens one at a time "
                     f"(gen tok/s)")
    notes.append("RSS load = the measuring process right after loading (llama.cpp maps the file, so weights count "
                 "once touched); peak RSS = its peak through generation")
    return _table(headers, rows, numeric_from=1) + "\n" + "".join(f"* {n}\n" for n in notes)


def _short(path: str, width: int = 40) -> str:
    return path if len(path) <= width else "..." + path[-(width - 3):]


def _table(headers: Sequence[str], rows: list[list[str]], numeric_from: int) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i >= numeric_from else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]) + "\n"


# -- serve -----------------------------------------------------------------------------------------------

def run_serve_gguf(args) -> int:
    from profiling.deploy.llamacpp_server import LOOPBACK_HOSTS, ServerLimits

    from ..jobs.run import open_gguf_server

    for name in ("max_new_tokens", "max_prompt_chars", "max_prompt_tokens"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
    limits = ServerLimits(max_new_tokens=args.max_new_tokens, default_new_tokens=min(64, args.max_new_tokens),
                          max_body_bytes=max(4096, 4 * args.max_prompt_chars + 1024),
                          max_queue=getattr(args, "max_queue", ServerLimits.max_queue),
                          max_connections=getattr(args, "max_connections", ServerLimits.max_connections))
    server = open_gguf_server(args.checkpoint, args.host, args.port, threads=args.threads,
                              n_ctx=args.max_prompt_tokens + args.max_new_tokens, limits=limits,
                              api_key=args.api_key, verbose=args.verbose)
    if args.host not in LOOPBACK_HOSTS:
        print(f"empas: warning: listening on {args.host}, reachable from other machines"
              + ("" if args.api_key else "; there is no authentication (pass --api-key)"), file=sys.stderr)
    print(f"empas: serving {args.checkpoint} with llama-cpp-python's OpenAI-compatible server on {server.url}  "
          f"(POST /v1/completions, /v1/chat/completions; GET /v1/models; Ctrl-C stops)",
          file=sys.stderr, flush=True)
    try:
        server.serve()
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        server.close()
    print("empas: server stopped", file=sys.stderr)
    return 0


# -- evaluate --------------------------------------------------------------------------------------------

def run_evaluate_gguf(args) -> int:
    from storage.atomic import atomic_write_text

    from ..jobs.run import GgufEvaluateSettings, evaluate_gguf_files

    settings = GgufEvaluateSettings(files=tuple(args.files), model=args.model, baselines=args.baselines,
                                    heldout_tokens=args.heldout_tokens, seq_len=args.seq_len, text_file=args.text,
                                    threads=args.threads, tokenizer_pre=args.tokenizer_pre).validate()
    quiet = args.json or args.markdown
    bar, progress = _progress(not quiet, "evaluating")
    result = evaluate_gguf_files(settings, progress=progress)
    bar.close()
    if args.csv:
        atomic_write_text(args.csv, render_evaluation_csv(result))
    if args.json:
        print_json(result.to_dict())
    elif args.markdown:
        print(render_evaluation(result, markdown=True), end="")
    else:
        print(render_evaluation(result), end="")
    return 0


EVALUATION_HEADERS = ("file", "kind", "file MB", "PPL llama.cpp", "PPL PyTorch", "ΔPPL", "KL llama.cpp",
                      "KL PyTorch", "ΔKL")


def evaluation_rows(result) -> list[list[str]]:
    return [[r.name, r.kind, f"{r.file_bytes / 1e6:.1f}", f"{r.llamacpp_ppl:.3f}", f"{r.torch_ppl:.3f}",
             f"{r.ppl_difference:+.3f}", f"{r.llamacpp_kl:.4f}", f"{r.torch_kl:.4f}", f"{r.kl_difference:+.4f}"]
            for r in result.rows]


def evaluation_notes(result) -> list[str]:
    return [f"all measured on {result.heldout_tokens} held-out tokens ({result.tokens_source}; {result.seq_len}-token "
            f"sequences, each from an empty context); KL = mean KL(F16 || file) per token",
            f"llama.cpp: the file run by llama.cpp, {_threads(result.n_threads)} on {result.hardware}; KL to the F16 "
            f"GGUF of the same model ({result.reference})",
            "PyTorch: EMPAS's own measurement of the same file's weights (dequantised with gguf-py into the "
            "Hugging Face model, float32); KL to the F16 file's weights in PyTorch",
            f"Δ = llama.cpp − PyTorch; the F16 file itself differs between the engines by KL "
            f"{result.engines_f16_kl:.2e}; llama.cpp's quantised kernels also round activations to 8 bits, "
            f"which adds a few 1e-3 of KL to quantised files",
            ] + list(result.notes)


def render_evaluation(result, markdown: bool = False) -> str:
    rows = evaluation_rows(result)
    notes = evaluation_notes(result)
    if markdown:
        out = ["| " + " | ".join(EVALUATION_HEADERS) + " |",
               "|" + "|".join(["---", "---"] + ["---:"] * (len(EVALUATION_HEADERS) - 2)) + "|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        return "\n".join(out) + "\n\n" + "".join(f"- {n}\n" for n in notes)
    return _table(EVALUATION_HEADERS, rows, numeric_from=2) + "\n" + "".join(f"* {n}\n" for n in notes)


EVALUATION_CSV_FIELDS = ("name", "kind", "path", "file_bytes", "file_mb", "llamacpp_loss", "llamacpp_ppl", "llamacpp_kl",
                         "torch_loss", "torch_ppl", "torch_kl", "ppl_difference", "kl_difference", "weights_rel_error",
                         "llamacpp_seconds", "torch_seconds", "note")


def render_evaluation_csv(result) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EVALUATION_CSV_FIELDS + ("heldout_tokens", "n_threads"), lineterminator="\n")
    writer.writeheader()
    for r in result.rows:
        d = r.to_dict()
        writer.writerow({**{k: d[k] for k in EVALUATION_CSV_FIELDS}, "heldout_tokens": result.heldout_tokens,
                         "n_threads": result.n_threads})
    return buf.getvalue()
