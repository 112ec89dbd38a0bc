"""Shared fixtures: a tiny randomly initialised Llama (fast unit tests) and the embedded SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Converted GGUF weights are cached across test runs (and CI steps) in one place.
os.environ.setdefault("EMPAS_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "empas"))


class TinyTokenizer:
    """Byte-level tokenizer: enough for the corpus and evaluation code paths."""

    vocab_size = 259
    eos_token_id = 258
    pad_token_id = 258

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False, **kw):
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def make_tiny_llama(seed: int = 0, layers: int = 3, hidden: int = 96, intermediate: int = 160):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=259, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_loaded():
    from profiling.models import LoadedModel

    return LoadedModel(make_tiny_llama(), TinyTokenizer(), model_id="tiny-llama", fingerprint="tiny" * 16,
                       source_path="")


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, restored afterwards: the tiny models' matrices gain nothing
    from threads, and on a busy shared 2-core CPU OpenMP's spinning turns a 0.3 s profile into 5 s.
    Modules that want it for every test say ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M (converted once, cached under .cache/)."""
    from profiling.models import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama with a byte-level tokenizer: loadable by ``--model FOLDER`` like any model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-model")
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 symbols, one per byte
    vocab = {c: i for i, c in enumerate(chars)} | {"<unk>": 256, "<pad>": 257, "<eos>": 258}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
    make_tiny_llama().save_pretrained(folder)
    return folder


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    """A fresh, empty storage of each kind (PostgreSQL: a new database per test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empas.db'}"
        return
    base = os.environ.get("EMPAS_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("PostgreSQL not running: eval \"$(bash scripts/start_postgres.sh)\" to include it")
    import uuid

    from sqlalchemy import create_engine, text

    name = f"empas_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def rtn_settings(bits="2,4,16", granularity="block", group_size=32, calib_tokens=128, heldout_tokens=128,
                 seq_len=32, **kw):
    """ProfileSettings for the RTN quantiser with small token counts (tests)."""
    from profiling.settings import ProfileSettings, QuantizerSettings

    return ProfileSettings(granularity=granularity, quantizer=QuantizerSettings.parse("rtn", bits, group_size),
                           calib_tokens=calib_tokens, heldout_tokens=heldout_tokens, seq_len=seq_len, **kw)
