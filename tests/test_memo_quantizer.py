"""The memoising quantiser: same weights and qtype quantised once; a changed weight anew; a budget."""

import torch

from profiling.quantizers.memo import MemoQuantizer
from profiling.quantizers.rtn import RTNQuantizer


def test_memo_returns_the_inner_result_and_quantises_once():
    torch.manual_seed(0)
    inner = RTNQuantizer(32)
    memo = MemoQuantizer(inner)
    w = torch.randn(16, 64)
    a = memo.fake_quantize(w, "4")
    assert torch.equal(a, inner.fake_quantize(w, "4"))
    assert memo.fake_quantize(w, "4") is a and (memo.hits, memo.misses) == (1, 1)
    assert not torch.equal(memo.fake_quantize(w, "2"), a) and memo.misses == 2  # another qtype
    assert memo.fake_quantize(w, "16") is w  # unquantised: untouched, not cached
    with torch.no_grad():
        w.mul_(2.0)  # the same storage, other values: quantised anew
    b = memo.fake_quantize(w, "4")
    assert memo.misses == 3 and torch.equal(b, inner.fake_quantize(w, "4"))
    assert memo.settings() == inner.settings() and memo.weight_bytes("4", 16, 64) == inner.weight_bytes("4", 16, 64)


def test_memo_keeps_to_its_budget():
    inner = RTNQuantizer(32)
    one = 16 * 64 * 4
    memo = MemoQuantizer(inner, budget_bytes=2 * one)
    weights = [torch.randn(16, 64) for _ in range(3)]
    for w in weights:
        memo.fake_quantize(w, "4")
    memo.fake_quantize(weights[0], "4")  # evicted (least recently used): quantised again
    assert memo.misses == 4 and memo._bytes <= 2 * one
