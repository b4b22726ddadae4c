"""The accelerator path: a forward that never reads a device value, bf16 matmuls against the fp32 reference."""

import math
import weakref

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
    """Counts the host's reads of values computed from the model's tensors (``.item()``, ``bool()``,
    ``float()``): on a GPU each one waits until every kernel queued before it has run.

    Values computed only from tensors made inside the mode without tensor inputs (random draws from the
    sampler's CPU generator, index lists) live on the host wherever the model runs and are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.host_only: dict[int, weakref.ref] = {}  # the tensors made from no model tensor, by id

    def _host_only(self, t: torch.Tensor) -> bool:
        ref = self.host_only.get(id(t))
        return ref is not None and ref() is t  # an id may be reused once its tensor is gone

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        from_host = all(self._host_only(t) for t in leaves if isinstance(t, torch.Tensor))
        if func is torch.ops.aten._local_scalar_dense.default and not from_host:
            self.count += 1
        out = func(*args, **(kwargs or {}))
        if from_host:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.host_only[id(t)] = weakref.ref(t)
        return out


def steady_compressor(model, x, **cfg) -> Compressor:
    """A compressor past its sites' first step: bases initialised and tracked once."""
    comp = Compressor(model, laser.LaserConfig(rank=4, min_numel=0, **cfg))
    for _ in range(2):
        warm_up(comp, x)
    return comp


@pytest.mark.parametrize("options", [
    {"threshold": 0.05},  # every step high: 4 sampled rows, merged in Python once full
    {"reset_rows": 100},  # low steps: 100 sampled rows, merged with tensor ops once full
    {"threshold": 0.05, "accumulate_stride": 4, "quantize": "int8"},
])
def test_paper_policy_forward_reads_no_device_value_and_guarded_reads_one_per_checked_tensor(options):
    torch.manual_seed(0)
    x = torch.randn(4, 16, 8)  # 64 rows per tensor
    reads, tensors = {}, {}
    for policy in ("paper", "guarded"):
        model = Looped()
        comp = steady_compressor(model, x, policy=policy, **options)
        mode = DeviceReads()
        with comp, mode:
            loss = loss_of(model, x)
        loss.backward()
        comp.step()
        reads[policy] = mode.count
        tracked = [s for s in comp.report().sites if s.name in comp.sites
                   and not comp.sites[s.name].frozen and not comp.sites[s.name].untracked]
        tensors[policy] = sum(s.tensors for s in tracked), sum(s.tensors - s.fallbacks for s in tracked)
        assert comp.stats == {}  # the step's statistics (accumulators, samples) are cleared by step()
    assert reads["paper"] == 0
    # every coded tensor was checked once; so was every one the check sent back raw
    stored, coded = tensors["guarded"]
    assert coded <= reads["guarded"] <= stored and reads["guarded"] > 0
    # the guarded policy as it runs on an accelerator: its tests stay on the device until step()
    model = Looped()
    comp = steady_compressor(model, x, policy="guarded", **options)
    comp.defer_guard = True
    with comp, DeviceReads() as mode:
        loss = loss_of(model, x)
    assert mode.count == 0
    loss.backward()
    # the same tests, kept (DeviceReads does not count the read of a test made from the batch alone)
    assert sum(len(stats.checks) for stats in comp.stats.values()) >= reads["guarded"] > 0


def test_device_reads_sees_a_read_of_a_model_value_and_not_of_a_host_draw():
    weight = torch.randn(3)
    with DeviceReads() as mode:
        float(torch.rand(1, generator=torch.Generator().manual_seed(0)))
        keys = torch.rand(5)
        float(keys.max())
        assert mode.count == 0
        bool((weight * 2).sum() > 0)
    assert mode.count == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"quantize": "int8"}, {"accumulate_stride": 4}])
def test_steady_state_encode_and_decode_run_on_meta_tensors(dtype, options):
    """Meta tensors have shapes but no values: any read of one raises, so these calls read none."""
    torch.manual_seed(0)
    d = 32
    model = LowRankChain(d).to(dtype)
    comp = steady_compressor(model, low_rank_input(128, d, 4).to(dtype), policy="paper", **options)
    site = f"first/input:{d}"
    state = comp.sites[site]
    state.basis = state.basis.to("meta")
    x = torch.empty(128, d, device="meta", dtype=dtype)
    records = [comp.encode(x, site) for _ in range(2)]  # the first creates the step's statistics, the second adds
    for record in records:
        out = record.decode()
        assert out.device.type == "meta" and out.dtype == dtype and out.shape == (128 * d,)
    accumulator = comp.stats[site].accumulator  # the step's statistics, until step()
    assert accumulator.device.type == "meta" and accumulator.dtype == torch.float32
    assert comp.stats[site].encoded == 2
    # The guarded policy off the CPU leaves its test on the device too: no read, one check kept for update()
    guarded = steady_compressor(LowRankChain(d).to(dtype), low_rank_input(128, d, 4).to(dtype), **options)
    guarded.sites[site].basis = guarded.sites[site].basis.to("meta")
    assert guarded.encode(x, site).decode().device.type == "meta"
    assert [c.device.type for c in guarded.stats[site].checks] == ["meta"]
    guarded.defer_guard = False  # the CPU's way, forced: it reads the tensor's own fidelity, which meta cannot
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
    assert comp.report().site(f"first/input:{d}").fallbacks == 0  # stored as codes: no read decided otherwise
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
    # both end in bf16 (relative step 2^-8); the fast path rounds the basis and the codes once more each. A
    # rounded basis moves the codes by up to 2^-8 of ||x|| (not of the codes: x Q may cancel to nearly 0)
    tolerance = 4 * 2.0**-8 * (x.float().norm() + 1e-3)
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
    fast_report, ref_report = fast.report(), reference.report()
    fast_state, ref_state = (sum(s.state_bytes for s in r.sites) for r in (fast_report, ref_report))
    fast_bytes, ref_bytes = fast_report.stored_bytes - fast_state, ref_report.stored_bytes - ref_state
    bases = sum(s.rank for s in fast_report.sites) * d
    assert ref_bytes - fast_bytes == 2 * bases  # bf16 rather than fp32 bases; codes identical in size
    # LASER's own state: the same accumulators and samples, plus the fp32 master of each bf16 basis copy
    assert fast_state - ref_state == 4 * bases


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
