"""The accelerator path: a forward that never reads a device value, bf16 matmuls against the fp32 reference."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import laser
from laser import subspace
from laser.methods.laser import Compressor, matmul_dtype
from laser.methods.projection import make_codes
from test_compressor import Looped, LowRankChain, loss_of, low_rank_input, warm_up
from test_subspace import max_principal_angle, random_orthonormal


class DeviceReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (``.item()``, ``bool()``, ``float()``): on a GPU each one
    waits until every kernel queued before it has run."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def steady_compressor(model, x, **cfg) -> Compressor:
    comp = Compressor(model, laser.LaserConfig(rank=4, min_numel=0, **cfg))
    for _ in range(2):  # initialise the bases, then one tracked step
        warm_up(comp, x)
    return comp


def test_paper_policy_forward_reads_no_device_value_and_guarded_reads_one_per_checked_tensor():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 8)
    reads = {}
    for policy in ("paper", "guarded"):
        model = Looped()
        comp = steady_compressor(model, x, policy=policy)
        mode = DeviceReads()
        with comp, mode:
            loss = loss_of(model, x)
        loss.backward()
        comp.step()
        reads[policy] = mode.count
        coded = sum(s.tensors - s.fallbacks for s in comp.report().sites)
    assert reads["paper"] == 0
    # every tensor past break-even is checked once; the ones that fail are kept raw
    assert coded <= reads["guarded"] <= sum(s.tensors for s in comp.report().sites)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"quantize": "int8"}, {"accumulate_stride": 4}])
def test_steady_state_encode_and_decode_run_on_meta_tensors(dtype, options):
    """Meta tensors have shapes but no values: any read of one raises, so these calls read none."""
    torch.manual_seed(0)
    d = 32
    model = LowRankChain(d).to(dtype)
    comp = steady_compressor(model, low_rank_input(128, d, 4).to(dtype), policy="paper", **options)
    site = f"first:{d}"
    state = comp.sites[site]
    state.basis = state.basis.to("meta")
    x = torch.empty(128, d, device="meta", dtype=dtype)
    records = [comp.encode(x, site) for _ in range(2)]  # the first creates the step's statistics, the second adds
    for record in records:
        out = record.decode()
        assert out.device.type == "meta" and out.dtype == dtype and out.shape == (128 * d,)
    assert state.accumulator.device.type == "meta" and state.accumulator.dtype == torch.float32
    guarded = steady_compressor(LowRankChain(d).to(dtype), low_rank_input(128, d, 4).to(dtype), **options)
    guarded.sites[site].basis = guarded.sites[site].basis.to("meta")
    with pytest.raises(RuntimeError, match="meta"):
        guarded.encode(x, site)


def test_nonfinite_activation_under_paper_policy_is_coded_and_its_statistics_dropped():
    torch.manual_seed(0)
    d = 32
    model = LowRankChain(d)
    comp = steady_compressor(model, low_rank_input(128, d, 4), policy="paper")
    before = {site: state.basis.clone() for site, state in comp.sites.items()}
    x = low_rank_input(128, d, 4, seed=1)
    x[3, 5] = float("inf")
    with comp:
        loss_of(model, x).backward()
    comp.step()
    assert comp.report().site(f"first:{d}").fallbacks == 0  # stored as codes: no read decided otherwise
    for site, state in comp.sites.items():
        assert state.nonfinite_steps == 1, site
        assert torch.equal(state.basis, before[site]), site
    with comp:
        loss_of(model, low_rank_input(128, d, 4)).backward()
    comp.step()
    for site, state in comp.sites.items():
        assert state.nonfinite_steps == 1 and torch.isfinite(state.basis).all(), site
        assert state.fidelity > 0.99, site


def test_matmul_dtype_takes_bf16_only_on_auto():
    assert matmul_dtype(torch.bfloat16, "auto") == torch.bfloat16
    assert matmul_dtype(torch.bfloat16, "float32") == torch.float32
    assert matmul_dtype(torch.float16, "auto") == torch.float32  # fp16 cannot hold the sums X^T Z
    assert matmul_dtype(torch.float32, "auto") == torch.float32


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 64), d=st.integers(2, 48), k=st.integers(1, 48), seed=st.integers(0, 10_000),
       quantize=st.sampled_from([None, "int8"]))
def test_bf16_codes_and_reconstruction_match_the_fp32_reference(n, d, k, seed, quantize):
    k = min(k, d)
    basis = random_orthonormal(d, k, seed)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)
    reference = make_codes(x.float() @ basis, basis, torch.bfloat16, quantize)
    fast_basis = basis.to(torch.bfloat16)
    fast = make_codes(x @ fast_basis, fast_basis, torch.bfloat16, quantize)
    assert fast.codes.dtype == reference.codes.dtype
    ref_out, fast_out = reference.decode().float(), fast.decode().float()
    # both end in bf16 (relative step 2^-8); the fast path rounds the basis and the codes once more each
    tolerance = 4 * 2.0**-8 * (ref_out.norm() + 1e-3)
    assert (fast_out - ref_out).norm() <= tolerance
    assert fast.nbytes == reference.nbytes


def test_bf16_fast_path_tracks_the_subspace_of_the_fp32_reference():
    """Same bf16 stream, both paths: the bases follow the same rotating subspace and the statistics agree."""
    d, r = 64, 4
    paths = {}
    for setting in ("auto", "float32"):
        torch.manual_seed(0)
        model = LowRankChain(d)
        for p in model.parameters():
            torch.nn.init.orthogonal_(p)  # well conditioned: every saved activation has rank r
        model = model.to(torch.bfloat16)
        comp = Compressor(model, laser.LaserConfig(rank=r, max_rank=r, min_numel=0, model_only=False,
                                                   policy="paper", matmul_dtype=setting))
        g = torch.Generator().manual_seed(1)
        directions = torch.randn(r, d, generator=g)
        turn = torch.linalg.matrix_exp(0.05 * (torch.eye(d).roll(1, 0) - torch.eye(d).roll(1, 1)))
        for _ in range(6):
            directions = directions @ turn  # the input subspace turns a little every step
            warm_up(comp, (torch.randn(256, r, generator=g) @ directions).to(torch.bfloat16))
        paths[setting] = comp
    fast, reference = paths["auto"], paths["float32"]
    assert fast.sites.keys() == reference.sites.keys()
    for site, state in fast.sites.items():
        ref = reference.sites[site]
        assert max_principal_angle(state.basis, ref.basis) < 0.01, site
        assert math.isclose(state.fidelity, ref.fidelity, abs_tol=5e-3), site
    fast_bytes, ref_bytes = fast.report().stored_bytes, reference.report().stored_bytes
    bases = sum(s.rank for s in fast.report().sites) * d
    assert ref_bytes - fast_bytes == 2 * bases  # bf16 rather than fp32 bases; codes identical in size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_forward_under_paper_policy_never_synchronizes():
    torch.manual_seed(0)
    model = Looped().cuda()
    x = torch.randn(4, 16, 8, device="cuda")
    comp = steady_compressor(model, x, policy="paper")
    torch.cuda.set_sync_debug_mode("error")
    try:
        with comp, torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_of(model, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    loss.backward()
    comp.step()


def test_to_device_keeps_cpu_tensors_and_values():
    index = torch.tensor([3, 1, 2])
    assert torch.equal(subspace.to_device(index, torch.device("cpu")), index)
