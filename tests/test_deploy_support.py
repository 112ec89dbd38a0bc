"""Helpers shared by the packing/deploy tests (no tests here): a saveable byte-level tokenizer for the
tiny random models, tiny model folders on disk, and artifacts for them."""

from __future__ import annotations

from pathlib import Path

import torch


def byte_tokenizer():
    """A real (saveable, loadable) Hugging Face tokenizer over the 256 bytes + 3 specials = 259 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    vocab.update({"<bos>": 256, "<pad>": 257, "<eos>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which the ByteLevel pre-tokenizer/decoder use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=259, n_positions=64,
                        bos_token_id=256, eos_token_id=258)
    model = GPT2LMHeadModel(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_model_folder(model, folder: Path) -> Path:
    """A model folder ``load_model`` accepts (its fingerprint is the hash of the weight file)."""
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 256, 258, 257
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def artifact_for(loaded, bits_by_gene: dict, granularity: str = "block", group_size: int = 64):
    """An RTN Artifact for ``loaded`` ({gene: bits}, "*" for the rest, default 4) whose memory_bytes is
    the memory model's prediction."""
    from profiling.inventory import build_inventory
    from profiling.quantizers.rtn import RTNQuantizer
    from storage.artifacts import Artifact

    inv = build_inventory(loaded.model, granularity)
    q = RTNQuantizer(group_size)
    names = inv.gene_names()
    qtypes = [str(bits_by_gene[n] if n in bits_by_gene else bits_by_gene.get("*", 4)) for n in names]
    columns = sorted(set(qtypes), key=int)
    table = inv.cost_table(q, columns)
    memory = int(inv.fixed_bytes + sum(table[i, columns.index(t)] for i, t in enumerate(qtypes)))
    return Artifact(archetype="custom", model_id=loaded.model_id, model_fingerprint=loaded.fingerprint,
                    quantizer=q.settings(), granularity=granularity, genes=dict(zip(names, qtypes)),
                    memory_bytes=memory)
