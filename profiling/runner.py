"""Running a model on fixed calibration tokens, with its weights temporarily quantised.

:class:`PrefixRunner` makes profiling cheap: quantising a gene in block *k* changes nothing before block
*k*, so one dense pass records the hidden states (and the keyword arguments: masks, rotary
embeddings) entering every block, and each measurement reruns only blocks *k..end*, the final norm and
the LM head. At construction it checks that rerunning from block 0 reproduces the dense logits; a model
for which that fails (an unknown head, logit soft-capping) falls back to full forwards, which are
always correct.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from .inventory import Gene, Inventory, find_blocks, get_weight, set_weight

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")
KL_CHUNK_TOKENS = 1024


@contextlib.contextmanager
def quantized_weights(model: nn.Module, genes: Iterable[Gene], qtypes: Iterable[str], quantizer,
                      importance: Mapping[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Fake-quantise each gene's weights to its qtype for the duration of the block, then restore.

    ``importance`` maps a weight's module path to its importance vector (see :mod:`profiling.imatrix`);
    quantisers that weight their rounding error by it (ggml) get it, the others ignore it. The
    quantiser always sees float32 weights (a bf16 model's included); its result is cast back to the
    model's dtype, as the model computes with it. On a streamed model (:mod:`profiling.streaming`)
    the weights of blocks that are on disk are quantised as each block is read."""
    streamer = getattr(model, "_empas_streamer", None)
    if streamer is None:
        with _quantized_resident(model, genes, qtypes, quantizer, importance):
            yield
        return
    with streamer.quantized(list(genes), list(qtypes), quantizer, importance) as (rest_genes, rest_qtypes):
        with _quantized_resident(model, rest_genes, rest_qtypes, quantizer, importance):
            yield


@contextlib.contextmanager
def _quantized_resident(model: nn.Module, genes, qtypes, quantizer, importance=None) -> Iterator[None]:
    saved = []
    try:
        for gene, qtype in zip(genes, qtypes):
            if qtype == quantizer.unquantized:
                continue
            for ref in gene.weights:
                w = get_weight(model, ref)
                saved.append((ref, w.detach().clone()))
                imp = importance.get(ref.path) if importance else None
                set_weight(model, ref, fake_quantize_as(quantizer, w.detach(), qtype, imp))
        yield
    finally:
        for ref, original in reversed(saved):
            set_weight(model, ref, original)


def fake_quantize_as(quantizer, weight: torch.Tensor, qtype: str, importance=None) -> torch.Tensor:
    """``quantizer.fake_quantize`` on the float32 copy of ``weight``, returned in ``weight``'s dtype."""
    if weight.dtype == torch.float32:
        return quantizer.fake_quantize(weight, qtype, importance)
    return quantizer.fake_quantize(weight.float(), qtype, importance).to(weight.dtype)


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(f"unexpected block output {type(output).__name__}")


def mean_kl(dense_logprobs: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over tokens of KL(p_dense || p_quantised); inputs are (tokens, vocab). Reference version."""
    total = 0.0
    n = dense_logprobs.shape[0]
    for start in range(0, n, KL_CHUNK_TOKENS):
        lp = dense_logprobs[start:start + KL_CHUNK_TOKENS]
        lq = torch.log_softmax(logits[start:start + KL_CHUNK_TOKENS].float(), dim=-1)
        total += float((lp.exp() * (lp - lq)).sum())
    return max(total / n, 0.0)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first materialised parameter lives (a streamed skeleton's embedding)."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


class DenseReference:
    """The dense model's next-token distribution, prepared for KL against many candidates.

    KL is computed per token as sum p * (log p - log q), with the difference taken element by element
    (both log-probabilities ~ -15, their difference small), then summed over tokens in float64. The
    earlier fused form, sum p*log p - sum p*z + logsumexp(z), subtracts terms of magnitude ~15 per token
    whose float32 rounding (~1e-4) exceeds the KL of an 8-bit layer (~1e-5): every 8-bit sensitivity
    of SmolLM2 came out as exactly 0 and the 4-bit ones were quantised to steps of ~6e-5.
    """

    def __init__(self, dense_logits: torch.Tensor):
        self.logprobs = torch.log_softmax(dense_logits.reshape(-1, dense_logits.shape[-1]).float(), dim=-1)
        self.probs = self.logprobs.exp()
        self.n_tokens = self.logprobs.shape[0]

    def mean_kl(self, logits: torch.Tensor) -> float:
        z = logits.reshape(-1, logits.shape[-1])
        total = 0.0
        for start in range(0, self.n_tokens, KL_CHUNK_TOKENS):
            end = start + KL_CHUNK_TOKENS
            zc = z[start:end].float()
            log_q = torch.log_softmax(zc, dim=-1)  # same routine as the dense side: rounding cancels
            per_token = (self.probs[start:end] * (self.logprobs[start:end] - log_q)).sum(dim=-1)
            total += float(per_token.to("cpu", torch.float64).sum())  # MPS has no float64
        return max(total / self.n_tokens, 0.0)

    def token_kl(self, logits: torch.Tensor) -> torch.Tensor:
        """KL(p_dense || q) of every token, float64, computed as :meth:`mean_kl` does."""
        z = logits.reshape(-1, logits.shape[-1])
        out = []
        for start in range(0, self.n_tokens, KL_CHUNK_TOKENS):
            end = start + KL_CHUNK_TOKENS
            log_q = torch.log_softmax(z[start:end].float(), dim=-1)
            out.append((self.probs[start:end] * (self.logprobs[start:end] - log_q)).sum(dim=-1).double())
        return torch.cat(out)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean cross-entropy of predicting token t+1 from logits at t; logits (n_seq, len, vocab)."""
    return float(torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1)))


class PrefixRunner:
    """Dense reference outputs on ``tokens`` plus cheap re-evaluation of the network's tail."""

    def __init__(self, model: nn.Module, inventory: Inventory, tokens: torch.Tensor, reuse_prefix: bool = True,
                 importance: Mapping[str, torch.Tensor] | None = None):
        self.model = model
        self.importance = importance
        self.inventory = inventory
        self.tokens = tokens.to(model_device(model))
        self.blocks_path, self.blocks = find_blocks(model)
        self.final_norm = self._find_final_norm()
        self.lm_head = model.get_output_embeddings()
        self.block_inputs: list[tuple[torch.Tensor, tuple, dict]] = []
        self.final_hidden: torch.Tensor | None = None  # what the last block returns (an untied head's input)
        with torch.no_grad():
            dense_logits = self._capture_dense()
        self.dense_logits_shape = dense_logits.shape
        self.dense = DenseReference(dense_logits)
        self.base_loss = next_token_loss(dense_logits, tokens)
        self.reuse_prefix = reuse_prefix and self._tail_reproduces(dense_logits)
        if not self.reuse_prefix:
            self.block_inputs = []  # free the cache: only full forwards from here on
            self.final_hidden = None

    # -- setup -----------------------------------------------------------------------------------
    def _find_final_norm(self) -> nn.Module | None:
        parent_path = self.blocks_path.rsplit(".", 1)[0] if "." in self.blocks_path else ""
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        for name in FINAL_NORM_NAMES:
            module = getattr(parent, name, None)
            if isinstance(module, nn.Module):
                return module
        return None

    def _capture_dense(self) -> torch.Tensor:
        handles = []

        def make_hook(index: int):
            def hook(_module, args, kwargs):
                if args:
                    hidden, rest = args[0], tuple(args[1:])
                else:
                    hidden, rest = kwargs.get("hidden_states"), ()
                    kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                self.block_inputs.append((hidden.detach(), rest, dict(kwargs)))
            return hook

        def keep_final(_module, _args, output):
            self.final_hidden = _first_tensor(output).detach()

        for i, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(make_hook(i), with_kwargs=True))
        handles.append(self.blocks[len(self.blocks) - 1].register_forward_hook(keep_final))
        try:
            logits = self.full_logits()
        finally:
            for h in handles:
                h.remove()
        return logits

    def _tail_reproduces(self, dense_logits: torch.Tensor) -> bool:
        if self.final_norm is None or self.lm_head is None or len(self.block_inputs) != len(self.blocks):
            return False
        with torch.no_grad():
            tail = self.tail_logits(0)
        tol = max(1e-4, 4 * torch.finfo(dense_logits.dtype).eps)  # bf16 logits carry ~3 significant digits
        return bool(torch.allclose(tail.float(), dense_logits.float(), atol=tol, rtol=tol))

    # -- evaluation ------------------------------------------------------------------------------
    def full_logits(self) -> torch.Tensor:
        out = self.model(input_ids=self.tokens, use_cache=False)
        return out.logits

    def tail_logits(self, start_block: int) -> torch.Tensor:
        """Logits re-computed from the input of block ``start_block`` (``len(blocks)``: from the last
        block's output, i.e. the final norm and the head only)."""
        hidden = self.final_hidden if start_block >= len(self.blocks) else self.block_inputs[start_block][0]
        for index in range(start_block, len(self.blocks)):
            _, rest, kwargs = self.block_inputs[index]
            hidden = _first_tensor(self.blocks[index](hidden, *rest, **kwargs))
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        return self.lm_head(hidden)

    @torch.no_grad()
    def logits_with(self, genes: list[Gene], qtypes: list[str], quantizer) -> torch.Tensor:
        """Logits with ``genes`` quantised to ``qtypes`` (others dense), recomputing only what changed.

        A gene read before block 0 (the embedding, ``block == -1``) needs a full forward."""
        changed = [g.block for g, q in zip(genes, qtypes) if q != quantizer.unquantized]
        with quantized_weights(self.model, genes, qtypes, quantizer, self.importance):
            if changed and self.reuse_prefix and min(changed) >= 0:
                return self.tail_logits(min(changed))
            return self.full_logits()

    def kl_with(self, genes: list[Gene], qtypes: list[str], quantizer) -> float:
        return self.dense.mean_kl(self.logits_with(genes, qtypes, quantizer))

    def token_kl_with(self, genes: list[Gene], qtypes: list[str], quantizer) -> torch.Tensor:
        """Per-token KL (float64) with ``genes`` at ``qtypes``: what screening compares, pair by pair."""
        return self.dense.token_kl(self.logits_with(genes, qtypes, quantizer))
