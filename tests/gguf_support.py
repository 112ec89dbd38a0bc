"""Builders shared by the GGUF tests: a tiny random Llama whose widths are multiples of 256 (so every
K-quant fits), saved with a real byte-level BPE tokenizer that llama.cpp can load, and PyTorch
fake-quantisation of a genome through the same packed bytes the GGUF holds."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import numpy as np
import torch

TINY_VOCAB = 512


def save_bpe_tokenizer(folder: Path, vocab_size: int = TINY_VOCAB):
    """A GPT-2-style byte-level BPE (llama.cpp pre-tokenizer 'gpt-2') trained on the default corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from profiling.corpus import default_corpus_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([default_corpus_texts()[0][:200_000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def make_tiny_llama_256(seed: int = 0, layers: int = 8, tied: bool = True, vocab: int = TINY_VOCAB):
    """Hidden 256, MLP 512, 8 heads of 32 over 2 KV heads (GQA 4): K-quants fit every matrix."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tied, initializer_range=0.08, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config).eval()
    if tied:
        model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def fake_quantized(model, layout, genome, quantize, default: str = "f16"):
    """A copy of ``model`` whose matrices hold exactly what the GGUF holds (quantised, dequantised
    back with gguf-py, rows in HF order), so PyTorch runs the file's weights."""
    import gguf

    from profiling.deploy.gguf_layout import ggml_enum

    twin = copy.deepcopy(model)
    types = layout.resolve(genome, default)
    for spec in layout.matrices:
        qtype = types[spec.name]
        param = twin.get_parameter(spec.hf_name)
        w = param.detach().float().numpy()
        if qtype == "f16":
            back = w.astype(np.float16).astype(np.float32)
        else:
            back = gguf.quants.dequantize(np.asarray(quantize(qtype, w, None)), ggml_enum(qtype)).reshape(w.shape)
        with torch.no_grad():
            param.copy_(torch.from_numpy(back))
    return twin


def torch_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits.float()


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
