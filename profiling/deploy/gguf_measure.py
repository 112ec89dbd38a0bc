"""Measuring a GGUF in llama.cpp in a fresh process: load time, RSS, tokens/s and held-out perplexity.

Each file is measured in a new Python process that imports llama-cpp-python and nothing heavy (no
torch until the speed and memory numbers are taken), so its RSS is the file's and llama.cpp's, not
the parent's. In order: load (timed; RSS after it), a warm-up generation, then ``repeats`` greedy
generations of ``gen_tokens`` new tokens with prompt processing and generation timed apart (peak RSS
after them: llama.cpp maps the file, so pages count once they are touched), then the held-out loss
from llama.cpp's logits over the given token ids (:func:`.llamacpp.evaluate_gguf`, each sequence from
an empty context).

Held-out tokens for a GGUF alone come from its own vocabulary (:class:`VocabTokenizer`), so a
downloaded file needs no Hugging Face model to be measured.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .llamacpp import LlamaCppError, evaluate_gguf, generate, hardware_description, load_gguf
from .process_memory import current_rss_bytes, peak_rss_bytes

CHILD_ERROR = "empas-gguf-measure-error"


class VocabTokenizer:
    """A GGUF's own tokenizer (llama.cpp, vocabulary only) with the call signature EMPAS's corpus
    code uses for Hugging Face tokenizers."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        llm = load_gguf(path, vocab_only=True)
        try:
            self._tokenize = llm.tokenize
            self._detokenize = llm.detokenize
            self.n_vocab = llm.n_vocab()
            self.eos_token_id = llm.token_eos()
        except BaseException:
            llm.close()
            raise
        self._llm = llm

    def __call__(self, text: str, add_special_tokens: bool = False, **_kw) -> dict:
        return {"input_ids": self._tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=False)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._detokenize([int(i) for i in ids]).decode("utf-8", errors="replace")

    def close(self) -> None:
        self._llm.close()


def measure_gguf(path: str | Path, tokens, prompt: str, gen_tokens: int = 32, threads: int = 1, repeats: int = 3,
                 timeout: float | None = 3600) -> dict:
    """Measure ``path`` in a fresh process (see the module docstring). ``tokens``: held-out ids
    (n_seq, seq_len) in this file's vocabulary. Every number in the result is measured."""
    with tempfile.TemporaryDirectory(prefix="empas-gguf-measure-") as tmp:
        tokens_file = Path(tmp) / "heldout.npy"
        np.save(tokens_file, np.asarray(tokens, dtype=np.int64))
        request = {"path": str(path), "tokens": str(tokens_file), "prompt": prompt, "gen_tokens": int(gen_tokens),
                   "threads": int(threads), "repeats": int(repeats)}
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["OMP_NUM_THREADS"] = str(threads)  # torch, imported only for the loss, stays out of the way
        try:
            proc = subprocess.run([sys.executable, "-m", "profiling.deploy.gguf_measure", json.dumps(request)],
                                  env=env, capture_output=True, text=True, timeout=timeout, cwd=root)
        except subprocess.TimeoutExpired:
            raise LlamaCppError(f"measuring {path} took over {timeout:.0f} s: ask for fewer --heldout-tokens "
                                f"or --gen-tokens") from None
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_ERROR):
            raise LlamaCppError(line[len(CHILD_ERROR) + 1:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LlamaCppError(f"measuring {path} failed in its child process: {tail}")
    return json.loads(lines[-1])


def _measure_here(request: dict) -> dict:
    path, threads = request["path"], request["threads"]
    tokens = np.load(request["tokens"])
    baseline = current_rss_bytes()
    start = time.perf_counter()
    llm = load_gguf(path, n_threads=threads, n_ctx=_speed_context(request["prompt"], request["gen_tokens"]))
    load_seconds = time.perf_counter() - start
    result = {"path": path, "file_bytes": os.path.getsize(path), "load_seconds": load_seconds,
              "rss_baseline_bytes": baseline, "rss_after_load_bytes": current_rss_bytes(), "n_threads": threads,
              "hardware": hardware_description(), "gen_tokens": request["gen_tokens"]}
    try:
        if request["gen_tokens"] > 0:
            generate(llm, request["prompt"], 2, stop_at_eos=False)  # warm-up: first-call allocations
            runs = [generate(llm, request["prompt"], request["gen_tokens"], stop_at_eos=False)
                    for _ in range(max(1, request["repeats"]))]
            result.update(
                prompt_tokens=runs[0].prompt_tokens, new_tokens=runs[0].new_tokens,
                prompt_tokens_per_s=statistics.median(r.prompt_tokens_per_s for r in runs),
                generation_tokens_per_s=statistics.median(r.generation_tokens_per_s for r in runs),
                generation_tokens_per_s_best=max(r.generation_tokens_per_s for r in runs),
                generation_tokens_per_s_runs=[r.generation_tokens_per_s for r in runs], sample=runs[0].text)
    finally:
        llm.close()
    result["peak_rss_bytes"] = peak_rss_bytes()
    ev = evaluate_gguf(path, tokens, n_threads=threads)
    result.update(heldout_loss=ev.loss, ppl=ev.ppl, heldout_tokens=ev.tokens, seq_len=int(tokens.shape[1]),
                  eval_seconds=ev.seconds)
    return result


def _speed_context(prompt: str, gen_tokens: int) -> int:
    """A context that holds the prompt (at most one token per byte, plus BOS) and the new tokens."""
    need = len(prompt.encode("utf-8")) + 2 + max(gen_tokens, 2)
    return max(256, -(-need // 64) * 64)


def _child_main(argv: list[str]) -> int:
    try:
        result = _measure_here(json.loads(argv[0]))
    except LlamaCppError as exc:
        print(f"{CHILD_ERROR} {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", flush=True)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through measure_gguf
    from profiling.deploy.gguf_measure import _child_main as _main  # the importable module, not __main__'s copy

    sys.exit(_main(sys.argv[1:]))
