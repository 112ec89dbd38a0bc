"""Measuring a packed checkpoint (or a dense model) in a fresh child process.

Resident bytes, peak RSS, held-out perplexity and greedy generation speed are measured in a new
Python process per target, so one measurement cannot inflate the next one's RSS.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_packed, weight_file_bytes
from .generation import encode_prompt, generate_ids, heldout_loss
from .packed_modules import PackingError, compute_dtype_of
from .packing import resident_bytes
from .process_memory import current_rss_bytes, peak_rss_bytes


DEFAULT_SPEED_PROMPT = "The history of the printing press begins"


def hardware_string() -> str:
    """e.g. "AMD EPYC, 2 torch threads (torch 2.13.0+cpu)"."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def is_packed_checkpoint(path) -> bool:
    from .checkpoint import MANIFEST_NAME

    return Path(path).is_dir() and (Path(path) / MANIFEST_NAME).is_file()


def measure_loaded(model: nn.Module, tokenizer, heldout: torch.Tensor, gen_tokens: int = 32,
                   prompt: str = DEFAULT_SPEED_PROMPT, repeats: int = 3) -> dict:
    """Speed first (so peak RSS covers load + generation), then held-out perplexity.

    Generation runs ``repeats`` times after a warm-up; ``tokens_per_s`` is the best run (the least
    disturbed by other processes on a shared machine), every run is in ``tokens_per_s_runs``.
    """
    result: dict = {"resident_bytes": resident_bytes(model), "rss_after_load_bytes": current_rss_bytes()}
    if gen_tokens > 0:
        ids = encode_prompt(tokenizer, prompt)
        generate_ids(model, ids, 2, exact=True)  # warm-up: first-call allocations, lazy inits
        runs = []
        for _ in range(max(1, repeats)):
            started = time.perf_counter()
            new = generate_ids(model, ids, gen_tokens, exact=True)
            runs.append(new.shape[1] / (time.perf_counter() - started))
        result.update(gen_tokens=int(new.shape[1]), tokens_per_s=max(runs), tokens_per_s_runs=runs,
                      prompt_tokens=int(ids.shape[1]), sample=tokenizer.decode(new[0].tolist(), skip_special_tokens=True))
    result["peak_rss_bytes"] = peak_rss_bytes()
    started = time.perf_counter()
    loss = heldout_loss(model, heldout)
    result.update(heldout_loss=loss, ppl=math.exp(loss), heldout_tokens=int(heldout.numel()),
                  eval_seconds=time.perf_counter() - started, peak_rss_with_eval_bytes=peak_rss_bytes(),
                  hardware=hardware_string())
    return result


def measure_checkpoint(target, heldout_tokens: torch.Tensor, gen_tokens: int = 32,
                       prompt: str = DEFAULT_SPEED_PROMPT, threads: int | None = None,
                       timeout: float | None = 3600, repeats: int = 3) -> dict:
    """Measure a packed checkpoint folder (or a dense model spec) in a fresh Python process.

    Returns {kind, resident_bytes, rss_baseline_bytes (after imports), rss_after_load_bytes,
    peak_rss_bytes (load + generation), peak_rss_with_eval_bytes, ppl, heldout_loss, tokens_per_s
    (best of ``repeats`` greedy runs of ``gen_tokens``), tokens_per_s_runs, gen_tokens, prompt_tokens,
    load_seconds, hardware, ...}. All measured, none predicted.
    """
    threads = threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="empas-measure-") as tmp:
        tokens_file = Path(tmp) / "heldout.pt"
        torch.save(heldout_tokens.clone(), tokens_file)
        request = {"target": str(target), "tokens": str(tokens_file), "gen_tokens": int(gen_tokens),
                   "prompt": prompt, "threads": int(threads), "repeats": int(repeats)}
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        proc = subprocess.run([sys.executable, "-m", "profiling.deploy.measure", json.dumps(request)], env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=root)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PackingError(f"measuring {target} failed: {tail}")
    return json.loads(lines[-1])


def _child_main(argv: list[str]) -> int:
    """Entry of the measuring child: load, measure, print one JSON line."""
    request = json.loads(argv[0])
    torch.set_num_threads(request["threads"])
    baseline = current_rss_bytes()
    tokens = torch.load(request["tokens"])
    started = time.perf_counter()
    target = request["target"]
    if is_packed_checkpoint(target):
        loaded = load_packed(target)
        model, tokenizer, kind = loaded.model, loaded.tokenizer, "packed"

        extra = {"genes": len(loaded.manifest["genes"]), "average_bits": loaded.average_bits,
                 "checkpoint_bytes": weight_file_bytes(target), "memory_model_bytes": loaded.manifest.get("memory_bytes")}
    else:
        from ..models import load_model

        lm = load_model(target)
        model, tokenizer, kind = lm.model, lm.tokenizer, "dense"

        extra = {"checkpoint_bytes": weight_file_bytes(lm.source_path), "source_path": lm.source_path}
    load_seconds = time.perf_counter() - started
    result = {"target": target, "kind": kind, "rss_baseline_bytes": baseline, "load_seconds": load_seconds,
              "compute_dtype": str(compute_dtype_of(model)).replace("torch.", ""), **extra}
    result.update(measure_loaded(model, tokenizer, tokens, request["gen_tokens"], request["prompt"],
                                 request.get("repeats", 3)))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through measure_checkpoint
    from profiling.deploy.measure import _child_main as _main  # the importable module, not __main__'s copy

    sys.exit(_main(sys.argv[1:]))
