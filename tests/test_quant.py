"""Tests for laser.quant: per-column INT8, bit packing, per-group quantization, statistics helpers."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from laser.quant import (
    GroupQuantized,
    dequantize_columns_int8,
    dequantize_groups,
    int8_symmetric,
    max_scale,
    pack_bits,
    quantize_columns_int8,
    quantize_groups,
    relative_mse,
    sigma_scale,
    unpack_bits,
)

FAST = settings(max_examples=25, deadline=None)
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


def float_arrays(shape) -> st.SearchStrategy:
    return arrays(np.float32, shape, elements=finite)


# -----------------------------------------------------------------------------
# per-column INT8


@FAST
@given(float_arrays(st.tuples(st.integers(1, 40), st.integers(1, 12))))
def test_columns_int8_error_within_half_step(z_np):
    z = torch.from_numpy(z_np)
    q, scales = quantize_columns_int8(z)
    assert q.dtype == torch.int8 and q.shape == z.shape
    assert scales.dtype == torch.float32 and scales.shape == (z.shape[1],)
    # Independent scale: absmax per column / 127 (zero columns may use anything that decodes to 0).
    absmax = z.abs().amax(dim=0)
    nonzero = absmax > 0
    torch.testing.assert_close(scales[nonzero], absmax[nonzero] / 127)
    z_hat = dequantize_columns_int8(q, scales, torch.float32)
    bound = scales / 2 * (1 + 1e-5) + 1e-30  # half a step, plus fp32 rounding slack
    assert torch.all((z_hat - z).abs() <= bound)


def test_columns_int8_zero_column_decodes_to_zero():
    z = torch.tensor([[1.0, 0.0, -3.0], [2.0, 0.0, 0.5]])
    q, scales = quantize_columns_int8(z)
    assert torch.all(torch.isfinite(scales))
    z_hat = dequantize_columns_int8(q, scales, torch.float32)
    assert torch.all(z_hat[:, 1] == 0)
    assert torch.all(q[:, 1] == 0)


def test_columns_int8_scales_are_per_column():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(500, 2, generator=gen) * torch.tensor([1e-3, 1e3])
    q, scales = quantize_columns_int8(z)
    z_hat = dequantize_columns_int8(q, scales, torch.float32)
    rel = (z_hat - z).norm(dim=0) / z.norm(dim=0)
    # Half a step is absmax/254; gaussian absmax/rms over 500 rows is ~3-4, so rel error ~ 1e-2 at most.
    assert torch.all(rel < 0.02), rel
    # One shared scale would flush the small column to zero (relative error 1): scales must differ.
    assert scales[1] / scales[0] > 1e5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_columns_int8_low_precision_inputs(dtype):
    gen = torch.Generator().manual_seed(1)
    z = (torch.randn(64, 8, generator=gen) * torch.logspace(-2, 2, 8)).to(dtype)
    q, scales = quantize_columns_int8(z)
    z_hat = dequantize_columns_int8(q, scales, dtype)
    assert z_hat.dtype == dtype
    # Half a step plus the rounding of the decoded value back to `dtype`.
    bound = scales / 2 + z.float().abs() * torch.finfo(dtype).eps
    assert torch.all((z_hat.float() - z.float()).abs() <= bound)


def test_columns_int8_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        quantize_columns_int8(torch.zeros(3, 4, 5))


# -----------------------------------------------------------------------------
# bit packing


@FAST
@given(st.sampled_from([2, 4, 8]), st.integers(0, 77), st.randoms(use_true_random=False))
def test_pack_unpack_round_trip(bits, count, rnd):
    values = torch.tensor([rnd.randrange(2**bits) for _ in range(count)], dtype=torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(count * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, count), values)


def test_pack_bits_layout():
    # Hand-packed: little end first, 2 bits each: 1 | 2<<2 | 3<<4 | 0<<6 = 57; then 3 alone.
    packed = pack_bits(torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8), 2)
    assert packed.tolist() == [57, 3]
    packed = pack_bits(torch.tensor([0xA, 0x5, 0xF], dtype=torch.uint8), 4)
    assert packed.tolist() == [0x5A, 0x0F]


def test_pack_bits_rejects_bad_input():
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="uint8"):
        pack_bits(torch.zeros(4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="count"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 4, 5)


# -----------------------------------------------------------------------------
# per-group quantization


def group_step_bound(x: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """Per-element quantization step, recomputed independently from the data: (max - min) / levels."""
    flat = x.reshape(-1).double()
    groups = math.ceil(flat.numel() / group_size)
    steps = torch.empty(flat.numel(), dtype=torch.float64)
    for g in range(groups):  # a plain loop: an independent reference, not the code under test
        chunk = flat[g * group_size : (g + 1) * group_size]
        steps[g * group_size : (g + 1) * group_size] = (chunk.max() - chunk.min()) / (2**bits - 1)
    return steps.view(x.shape)


@FAST
@given(
    float_arrays(st.tuples(st.integers(1, 9), st.integers(1, 70))),
    st.sampled_from([2, 4, 8]),
    st.sampled_from([1, 7, 32, 256]),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_group_error_within_one_step(x_np, bits, group_size, stochastic, seed):
    x = torch.from_numpy(x_np)
    gen = torch.Generator().manual_seed(seed)
    qx = quantize_groups(x, bits, group_size, stochastic=stochastic, generator=gen)
    x_hat = dequantize_groups(qx)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    step = group_step_bound(x, group_size, bits)
    if not stochastic:
        step = step / 2  # nearest rounding: half a step
    # fp32 slack: the decode min + level * scale rounds twice, relative to the group's magnitude.
    slack = 4 * torch.finfo(torch.float32).eps * (x.double().abs().max() + 1)
    assert torch.all((x_hat.double() - x.double()).abs() <= step + slack)


def test_constant_groups_decode_exactly():
    # Group 0 constant, group 1 varies, group 2 (padded, 3 of 4 used) constant at an awkward value.
    x = torch.tensor([0.1234567, 0.1234567, 0.1234567, 0.1234567, -1.0, 2.0, 5.0, 0.0, 1e30, 1e30, 1e30])
    for bits in (2, 4, 8):
        for stochastic in (False, True):
            x_hat = dequantize_groups(quantize_groups(x, bits, group_size=4, stochastic=stochastic))
            assert torch.equal(x_hat[:4], x[:4])
            assert torch.equal(x_hat[8:], x[8:])


def test_padding_does_not_widen_last_group():
    # Last group holds 3 of 4 values, all far from zero: its step is 0.5 / 3, so nearest errs <= 1/12.
    # Padding with zeros would stretch the range to [0, 100.5] and cost errors near 0.5.
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, 100.0, 100.25, 100.5])
    x_hat = dequantize_groups(quantize_groups(x, 2, group_size=4))
    assert torch.all((x_hat[4:] - x[4:]).abs() <= 1 / 12 + 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_group_dtypes_and_shape(dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 7, generator=gen).to(dtype)
    x_hat = dequantize_groups(quantize_groups(x, 8, group_size=16))
    assert x_hat.dtype == dtype and x_hat.shape == x.shape
    step = group_step_bound(x.float(), 16, 8)
    bound = step / 2 + x.double().abs() * torch.finfo(dtype).eps + 1e-7
    assert torch.all((x_hat.double() - x.double()).abs() <= bound)


def test_stochastic_rounding_unbiased():
    # Every group is the same 64 values, pinned to min -1 and max 1, so all groups share one scale.
    bits, group_size, draws = 2, 64, 20_000
    base = torch.linspace(-1, 1, group_size) ** 3
    x = base.repeat(draws)
    gen = torch.Generator().manual_seed(3)
    qx = quantize_groups(x, bits, group_size, stochastic=True, generator=gen)
    mean = dequantize_groups(qx).view(draws, group_size).double().mean(dim=0)
    step = 2.0 / (2**bits - 1)
    # A draw is one of two neighbouring levels, so its std is at most step/2; the mean's is step/2/sqrt(n).
    # Six standard errors: a false alarm over 64 elements has probability ~1e-7.
    tolerance = 6 * (step / 2) / math.sqrt(draws)
    assert torch.all((mean - base.double()).abs() <= tolerance)
    # The same check has power: nearest rounding is biased far beyond the tolerance.
    nearest = dequantize_groups(quantize_groups(x[:group_size], bits, group_size)).double()
    assert (nearest - base.double()).abs().max() > 10 * tolerance


def test_stochastic_rounding_reproducible():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(4))

    def draw(seed: int) -> GroupQuantized:
        return quantize_groups(x, 4, stochastic=True, generator=torch.Generator().manual_seed(seed))

    first, again, other = draw(7), draw(7), draw(8)
    assert torch.equal(first.data, again.data)
    assert torch.equal(dequantize_groups(first), dequantize_groups(again))
    assert not torch.equal(first.data, other.data)


@pytest.mark.parametrize(("bits", "packed_bytes"), [(2, 1024 // 4), (4, 1024 // 2), (8, 1024)])
def test_nbytes_hand_computed(bits, packed_bytes):
    # numel 1000 at group 256: 4 groups, padded to 1024 values; metadata is fp32 min + fp32 scale = 8 B.
    qx = quantize_groups(torch.randn(10, 100), bits, group_size=256)
    assert qx.data.dtype == torch.uint8
    assert qx.numel == 1000 and qx.bits == bits and qx.group_size == 256
    assert qx.nbytes == packed_bytes + 4 * 8


def test_bad_settings_raise():
    x = torch.randn(10)
    for bits in (0, 1, 3, 16):
        with pytest.raises(ValueError, match="bits"):
            quantize_groups(x, bits)
    for group_size in (0, -4):
        with pytest.raises(ValueError, match="group_size"):
            quantize_groups(x, 4, group_size=group_size)
    with pytest.raises(ValueError, match="floating-point"):
        quantize_groups(torch.arange(10), 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.randn(4097, generator=torch.Generator().manual_seed(5))
    cpu = quantize_groups(x, 4, stochastic=True, generator=torch.Generator().manual_seed(6))
    gpu = quantize_groups(x.cuda(), 4, stochastic=True, generator=torch.Generator().manual_seed(6))
    assert gpu.data.is_cuda
    assert torch.equal(dequantize_groups(gpu).cpu(), dequantize_groups(cpu))
    z = x[:4096].view(512, 8).cuda().half()
    q, scales = quantize_columns_int8(z)
    assert q.is_cuda and scales.is_cuda
    assert dequantize_columns_int8(q, scales, torch.float16).is_cuda


# -----------------------------------------------------------------------------
# simulated-quantization statistics


def test_int8_symmetric_hand_example():
    x = torch.tensor([0.26, -1.0, 300.0, -0.24])
    # /0.5 -> 0.52, -2, 600 (saturates at 127), -0.48 -> levels 1, -2, 127, 0.
    expected = torch.tensor([0.5, -1.0, 63.5, 0.0])
    assert torch.equal(int8_symmetric(x, 0.5), expected)
    per_column = int8_symmetric(torch.tensor([[1.0, 10.0], [0.3, 3.0]]), torch.tensor([0.5, 5.0]))
    assert torch.equal(per_column, torch.tensor([[1.0, 10.0], [0.5, 5.0]]))
    with pytest.raises(ValueError, match="scale"):
        int8_symmetric(x, 0.0)


def test_relative_mse_hand_example():
    # ||(0, 1)||^2 / ||(3, 4)||^2 = 1 / 25.
    assert relative_mse(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0])) == pytest.approx(0.04)
    assert relative_mse(torch.zeros(3), torch.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        relative_mse(torch.zeros(3), torch.zeros(4))


def test_scales_hand_example():
    x = torch.tensor([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, -9.0])
    # absmax 9; mean 2.75, population variance (sum of squared deviations 171.5) / 8 = 21.4375.
    assert max_scale(x) == pytest.approx(9 / 127)
    assert sigma_scale(x) == pytest.approx(4 * math.sqrt(21.4375) / 127, rel=1e-6)
    assert sigma_scale(x, k=2.0) == pytest.approx(2 * math.sqrt(21.4375) / 127, rel=1e-6)
