import math

import pytest
import torch

from profiling.quantizers import make_quantizer
from profiling.quantizers.rtn import RTNQuantizer, qtype_bits
from profiling.settings import QuantizerError, QuantizerSettings


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape,group", [((8, 128), 64), ((6, 576), 128), ((5, 1536), 128), ((3, 70), 64)])
def test_round_trip_error_is_within_half_a_step(bits, shape, group):
    torch.manual_seed(bits)
    w = torch.randn(*shape)
    q = RTNQuantizer(group).quantize(w, str(bits))
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= (1 << bits) - 1
    assert q.scales.shape == (shape[0], math.ceil(shape[1] / group))
    deq = RTNQuantizer(group).dequantize(q)
    step = q.scales.float().repeat_interleave(group, 1)[:, : shape[1]]
    # half a step, plus slack for fp16 rounding of scale and zero
    assert torch.all((deq - w).abs() <= step * 0.5 + step * 0.02 + 1e-3)


def test_more_bits_means_less_error():
    torch.manual_seed(0)
    w = torch.randn(32, 256)
    errors = [float((RTNQuantizer(64).fake_quantize(w, str(b)) - w).pow(2).mean()) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-4


def test_ragged_last_group_only_sees_real_columns():
    # 70 columns with groups of 64: the last group holds 6 real columns of large values.
    w = torch.zeros(2, 70)
    w[:, 64:] = torch.linspace(100, 106, 6)
    q = RTNQuantizer(64).quantize(w, "4")
    assert q.scales.shape == (2, 2)
    assert float(q.zeros[0, 1]) == pytest.approx(100, rel=1e-3)
    deq = RTNQuantizer(64).dequantize(q)
    assert torch.allclose(deq[:, :64], w[:, :64], atol=1e-6)
    assert torch.allclose(deq[:, 64:], w[:, 64:], atol=0.25)


def test_sixteen_bits_is_untouched_and_bytes_model():
    w = torch.randn(4, 64)
    quant = RTNQuantizer(64)
    assert quant.fake_quantize(w, "16") is w
    assert quant.weight_bytes("16", 4, 64) == 4 * 64 * 2
    # 4-bit: 32 bytes of codes per row + one group of (fp16 scale + fp16 zero)
    assert quant.weight_bytes("4", 4, 64) == 4 * (32 + 4)
    # 3-bit codes of a 70-wide row: ceil(210/8)=27 bytes; two groups of metadata
    assert RTNQuantizer(64).weight_bytes("3", 1, 70) == 27 + 8


@pytest.mark.parametrize("bad", ["1", "9", "12", "32", "0", "-4", "2.5", True, "four", ""])
def test_unsupported_bits_are_refused(bad):
    with pytest.raises(QuantizerError):
        qtype_bits(bad)


@pytest.mark.parametrize("bad", [0, -64, 1.5])
def test_bad_group_size(bad):
    with pytest.raises(QuantizerError):
        make_quantizer(QuantizerSettings(name="rtn", qtypes=("2", "16"), group_size=bad, imatrix=None))


def test_settings_build_the_quantiser_once_with_its_qtypes():
    settings = QuantizerSettings.parse("rtn", "8,2,4,16,4")
    assert settings.qtypes == ("2", "4", "8", "16")
    q = make_quantizer(settings)
    assert isinstance(q, RTNQuantizer) and q.qtypes == settings.qtypes and q.unquantized == "16"
    assert q.settings() == {"name": "rtn", "group_size": 64}  # the qtype list is not the quantiser's identity
