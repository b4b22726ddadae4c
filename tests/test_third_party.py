"""LASER on models written the way their authors write them, each against a hook-free twin.

Models (tiny, seeded, built here): a weight-tied loop of ``nn.TransformerEncoderLayer`` (post- and pre-norm,
fp32 and bf16 CPU autocast, and with ``torch.utils.checkpoint`` inside the loop); Hugging Face
``LlamaForCausalLM`` and ``GPT2LMHeadModel`` with their own ``labels=`` loss; a Conv2d/BatchNorm2d/ReLU/
MaxPool2d/Linear net in NCHW and channels_last; a frozen backbone with a LoRA-style adapter inside, under bf16
autocast; ``torch.compile`` of a looped MLP; a looped MLP with checkpointing inside the loop.

Every check runs the model twice from one seed: once under the method, once as a ``copy.deepcopy`` twin with
no hooks, same input, same number of steps; the last step's loss and parameter gradients are compared.

* lossless: the ``none`` method and an identity codec (goes through the whole coding path: pack, storage
  dedupe, ``as_strided`` rebuild; stores an exact copy) reproduce the twin's loss and gradients.
* low rank: ``LaserConfig(rank=32, quantize="int8")`` on activations driven by a rank-4 signal in width 64
  keeps the whole-model gradient cosine >= 0.99 and stores fewer bytes than raw.
* masks: full-rank int8 codes on a looped ReLU MLP and the conv net keep the gradient cosine >= 0.99
  (DESIGN hard part 11: a code that turns ReLU's exact zeros into small positives wrecks the gradient).
* loss: a Hugging Face model's own ``labels=`` loss (its log-softmax, saved inside the model's forward) is
  never coded; everything else is kept out of reach with ``min_dim``, so the gradients must be exact.
* frozen weights: under bf16 autocast a frozen weight's bf16 copy (no autograd history) is never handed to
  a method's ``encode`` (hard part 12).

``python tests/test_third_party.py`` prints, per model, bytes saved, gradient cosine and step-time ratio
against the twin for ``LaserConfig(rank=32)`` (and with int8 codes).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import laser
from laser.hooks import ActivationMethod, Packed

BATCH, SEQ, WIDTH, LOOPS, SIGNAL_RANK = 4, 16, 64, 4, 4
WARMUP_STEPS = 2  # LASER's first step codes each tensor against its own basis; the third uses tracked bases


# --------------------------------------------------------------------------------------------------- models
class LoopedEncoder(nn.Module):
    """One ``nn.TransformerEncoderLayer`` applied ``loops`` times (weight-tied), then a linear head."""

    def __init__(self, d_model: int = 32, nhead: int = 4, dim_feedforward: int = 64, norm_first: bool = False,
                 loops: int = LOOPS, checkpointed: bool = False) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=0.0, batch_first=True,
                                                norm_first=norm_first)
        self.head = nn.Linear(d_model, d_model)
        self.loops, self.checkpointed = loops, checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        h = x
        for _ in range(self.loops):
            h = checkpoint(self.layer, h, use_reentrant=False) if self.checkpointed else self.layer(h)
        return self.head(h)


class LoopedMLP(nn.Module):
    """Pre-norm residual MLP block applied ``loops`` times: ``h <- h + W2 gelu(W1 norm(h))``."""

    def __init__(self, width: int = WIDTH, hidden: int = 2 * WIDTH, loops: int = LOOPS,
                 checkpointed: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.block = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.head = nn.Linear(width, width)
        self.loops, self.checkpointed = loops, checkpointed

    def step(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.block(self.norm(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        h = x
        for _ in range(self.loops):
            h = checkpoint(self.step, h, use_reentrant=False) if self.checkpointed else self.step(h)
        return self.head(h)


class ReluLoop(nn.Module):
    """``h <- relu(lin(h))`` repeated: every saved tensor but the input is a ReLU output (read as a mask)."""

    def __init__(self, width: int = WIDTH, loops: int = LOOPS) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.head = nn.Linear(width, width)
        self.loops = loops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for _ in range(self.loops):
            h = F.relu(self.lin(h))
        return self.head(h)


class ConvNet(nn.Module):
    """A small image classifier, written the usual way."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 8 * 8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32)
        return self.classifier(torch.flatten(self.features(x), 1))


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable low-rank update ``scale * B A x`` (B random, so A gets gradients)."""

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_b.weight, std=0.02)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_b(self.lora_a(x))


class AdaptedBackbone(nn.Module):
    """A frozen looped backbone whose first linear carries a LoRA adapter: only ``lora_*`` train."""

    def __init__(self, width: int = WIDTH, loops: int = LOOPS) -> None:
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.up = LoRALinear(nn.Linear(width, 2 * width))
        self.down = nn.Linear(2 * width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, width)
        self.loops = loops
        for name, p in self.named_parameters():
            p.requires_grad_("lora_" in name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for _ in range(self.loops):
            h = self.norm(h + self.down(F.gelu(self.up(h))))
        return self.head(h)


def llama() -> nn.Module:
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).train()


def gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                     attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config).train()


# ---------------------------------------------------------------------------------------------------- cases
def low_rank_signal(*shape: int, width: int = WIDTH, rank: int = SIGNAL_RANK, seed: int = 0) -> torch.Tensor:
    """A rank-``rank`` signal embedded in ``width``: ``(…, rank) @ (rank, width)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, rank, generator=g) @ torch.randn(rank, width, generator=g)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def regression(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, target = batch
    return F.mse_loss(model(x).float(), target)


def classification(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, labels = batch
    return F.cross_entropy(model(x).float(), labels)


def own_lm_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    (ids,) = batch
    return model(input_ids=ids, labels=ids).loss


def outside_lm_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    (ids,) = batch
    logits = model(input_ids=ids).logits  # (B, L, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


@dataclass
class Case:
    """A model as its author writes it, a batch, its loss, and how it runs (autocast, compile)."""

    name: str
    model: Callable[[], nn.Module]
    batch: Callable[[], tuple]
    loss: Callable[[nn.Module, tuple], torch.Tensor] = regression
    autocast: bool = False  # bf16 CPU autocast around the forward
    compiled: bool = False  # torch.compile(backend="aot_eager")
    memory_format: torch.memory_format | None = None

    def build(self) -> tuple[nn.Module, tuple]:
        torch.manual_seed(0)
        model, batch = self.model(), self.batch()
        if self.memory_format is not None:
            model = model.to(memory_format=self.memory_format)
            batch = (batch[0].contiguous(memory_format=self.memory_format), *batch[1:])
        return model, batch


def _regression_batch(width: int, low_rank: bool, batch_size: int = BATCH) -> Callable[[], tuple]:
    def batch() -> tuple:
        x = low_rank_signal(batch_size, SEQ, width=width) if low_rank else randn(batch_size, SEQ, width)
        return x, randn(batch_size, SEQ, width, seed=1)
    return batch


def _ids_batch() -> tuple:
    return (torch.randint(0, 100, (BATCH, SEQ), generator=torch.Generator().manual_seed(0)),)


def _image_batch() -> tuple:
    return randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,), generator=torch.Generator().manual_seed(1))


def encoder(norm_first: bool, **kwargs) -> Callable[[], nn.Module]:
    return lambda: LoopedEncoder(norm_first=norm_first, **kwargs)


CASES = {
    "encoder-post": Case("encoder-post", encoder(False), _regression_batch(32, low_rank=False)),
    "encoder-pre": Case("encoder-pre", encoder(True), _regression_batch(32, low_rank=False)),
    "encoder-post-bf16": Case("encoder-post-bf16", encoder(False), _regression_batch(32, False), autocast=True),
    "encoder-pre-bf16": Case("encoder-pre-bf16", encoder(True), _regression_batch(32, False), autocast=True),
    "encoder-checkpoint": Case("encoder-checkpoint", encoder(True, checkpointed=True),
                               _regression_batch(32, low_rank=False)),
    "llama": Case("llama", llama, _ids_batch, own_lm_loss),
    "gpt2": Case("gpt2", gpt2, _ids_batch, own_lm_loss),
    "conv-nchw": Case("conv-nchw", ConvNet, _image_batch, classification),
    "conv-channels-last": Case("conv-channels-last", ConvNet, _image_batch, classification,
                               memory_format=torch.channels_last),
    "lora-bf16": Case("lora-bf16", AdaptedBackbone, _regression_batch(WIDTH, low_rank=True), autocast=True),
    # Under compile every saved tensor of the graph is a site of its own (recursion steps do not share a basis),
    # so each must pay for its basis and accumulator alone: 16 x 16 rows a tensor.
    "mlp-compiled": Case("mlp-compiled", LoopedMLP, _regression_batch(WIDTH, low_rank=True, batch_size=16),
                         compiled=True),
    "mlp-checkpoint": Case("mlp-checkpoint", lambda: LoopedMLP(checkpointed=True),
                           _regression_batch(WIDTH, low_rank=True)),
}

# Activations driven by a rank-4 signal in width 64 (hard part: they must compress and keep the gradient).
LOW_RANK_CASES = {
    "mlp": Case("mlp", LoopedMLP, _regression_batch(WIDTH, low_rank=True)),
    "encoder-post-64": Case("encoder-post-64", encoder(False, d_model=WIDTH, dim_feedforward=2 * WIDTH),
                            _regression_batch(WIDTH, low_rank=True)),
    "encoder-pre-64": Case("encoder-pre-64", encoder(True, d_model=WIDTH, dim_feedforward=2 * WIDTH),
                           _regression_batch(WIDTH, low_rank=True)),
    "encoder-pre-64-bf16": Case("encoder-pre-64-bf16", encoder(True, d_model=WIDTH, dim_feedforward=2 * WIDTH),
                                _regression_batch(WIDTH, low_rank=True), autocast=True),
    "encoder-pre-64-checkpoint": Case("encoder-pre-64-checkpoint",
                                      encoder(True, d_model=WIDTH, dim_feedforward=2 * WIDTH, checkpointed=True),
                                      _regression_batch(WIDTH, low_rank=True)),
    "mlp-checkpoint": CASES["mlp-checkpoint"],
    "mlp-compiled": CASES["mlp-compiled"],
    "lora-bf16": CASES["lora-bf16"],
}


# ---------------------------------------------------------------------------------------------- identity codec
class ExactCopy(Packed):
    """A storage kept as an exact copy of its (N, D) rows."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows.clone()
        super().__init__(self.rows.numel() * self.rows.element_size())

    def decode(self) -> torch.Tensor:
        return self.rows.reshape(-1)


class IdentityCodec(ActivationMethod):
    """Codes every float storage losslessly: the whole coding path of a method, no error of its own.

    ``seen`` keeps a copy of every tensor handed to :meth:`encode` when ``record`` is set.
    """

    name = "identity"

    def __init__(self, model: nn.Module, record: bool = False) -> None:
        super().__init__(model, laser.NoneConfig(min_numel=0, min_dim=1))
        self.encoded, self.record, self.seen = 0, record, []

    def encode(self, x: torch.Tensor, site: str) -> Packed | None:
        self.encoded += 1
        if self.record:
            self.seen.append(x.clone())
        return ExactCopy(x)


# ----------------------------------------------------------------------------------------- twin comparison
@dataclass
class Comparison:
    """The last step of a method's run against its hook-free twin's."""

    loss: torch.Tensor
    twin_loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    twin_grads: dict[str, torch.Tensor]
    method: object
    seconds: float = 0.0
    twin_seconds: float = 0.0

    @property
    def cosine(self) -> float:
        """Cosine between the whole-model gradients (all trainable parameters concatenated)."""
        return cosine(flat(self.grads), flat(self.twin_grads))

    @property
    def rel_error(self) -> float:
        """max |grad - twin grad| / max |twin grad| over all trainable parameters."""
        return rel_error(flat(self.grads), flat(self.twin_grads))

    def summary(self) -> str:
        return (f"loss {self.loss.item():.6g} vs twin {self.twin_loss.item():.6g}, "
                f"grad cosine {self.cosine:.6f}, rel error {self.rel_error:.3g}")


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.double().reshape(-1) for _, g in sorted(grads.items())])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double().reshape(-1), b.double().reshape(-1), dim=0))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def train_step(model: nn.Module, batch: tuple, case: Case, method: object | None) -> tuple[torch.Tensor, float]:
    """One forward (under the method's hooks and the case's autocast) and backward; returns loss and seconds."""
    model.zero_grad(set_to_none=True)
    hooks = method if method is not None else contextlib.nullcontext()
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if case.autocast else contextlib.nullcontext()
    start = time.perf_counter()
    with hooks, cast:
        loss = case.loss(model, batch)
    loss.backward()
    if method is not None:
        method.step()
    return loss.detach(), time.perf_counter() - start


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters() if p.requires_grad}


def compare(case: Case, make_method: Callable[[nn.Module], object], steps: int = WARMUP_STEPS + 1,
            timed_steps: int = 0) -> Comparison:
    """Run ``steps`` steps of the case under a method and as a hook-free twin; compare the last step.

    The twin is a ``copy.deepcopy`` made before the method touches the model; both see the same batch and
    no optimizer, so every step has the same parameters. ``timed_steps`` extra steps (after those) are timed
    alternately and their medians reported.
    """
    model, batch = case.build()
    twin = copy.deepcopy(model)
    if case.compiled:
        model, twin = torch.compile(model, backend="aot_eager"), torch.compile(twin, backend="aot_eager")
    method = make_method(model)
    for _ in range(steps):
        loss, _ = train_step(model, batch, case, method)
        twin_loss, _ = train_step(twin, batch, case, None)
    grads, twin_grads = trainable_grads(model), trainable_grads(twin)
    times, twin_times = [], []
    for _ in range(timed_steps):
        times.append(train_step(model, batch, case, method)[1])
        twin_times.append(train_step(twin, batch, case, None)[1])
    return Comparison(loss, twin_loss, grads, twin_grads, method, median(times), median(twin_times))


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else 0.0


def none_method(model: nn.Module) -> object:
    return laser.methods.build("none", model)


def laser_method(**options: object) -> Callable[[nn.Module], object]:
    return lambda model: laser.Compressor(model, laser.LaserConfig(**options))


def check_compiles() -> None:
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available in this torch build")
    try:
        torch.compile(lambda t: t * 2, backend="aot_eager")(torch.ones(2, requires_grad=True)).sum().backward()
    except Exception as error:  # noqa: BLE001 (any failure means this platform cannot compile)
        pytest.skip(f"torch.compile(backend='aot_eager') does not work here: {type(error).__name__}: {error}")


def skip_unavailable(case: Case) -> None:
    if case.compiled:
        check_compiles()


# ------------------------------------------------------------------------------------------------- lossless
@pytest.mark.parametrize("method", ["none", "identity"])
@pytest.mark.parametrize("name", list(CASES))
def test_lossless_methods_reproduce_the_twin(name, method):
    """``none`` and an identity codec change nothing: same loss (bitwise), gradients to 1e-6 relative."""
    case = CASES[name]
    skip_unavailable(case)
    result = compare(case, none_method if method == "none" else IdentityCodec)
    print(result.summary())
    print(result.method.report())
    assert torch.equal(result.loss, result.twin_loss), result.summary()
    assert result.rel_error <= 1e-6, result.summary()
    if method == "identity" and name == "conv-nchw":
        # channels-first conv activations (image rows) and ReLU / max-pool masks are kept raw by design
        reasons = set().union(*(row.reasons for row in result.method.report().sites))
        assert reasons <= {"layout", "mask", "loss", "too small", "not float"}, reasons
    elif method == "identity":
        assert result.method.encoded > 0, "the identity codec never coded anything: the test would be vacuous"
    report = result.method.report()
    assert report.raw_bytes > 0 and report.stored_bytes > 0


# ------------------------------------------------------------------------------------------------- low rank
@pytest.mark.parametrize("name", list(LOW_RANK_CASES))
def test_laser_int8_on_low_rank_activations_keeps_the_gradient_and_saves_bytes(name):
    """Rank-32 int8 codes of activations driven by a rank-4 signal in width 64: cosine >= 0.99, bytes saved."""
    case = LOW_RANK_CASES[name]
    skip_unavailable(case)
    result = compare(case, laser_method(rank=32, quantize="int8"))
    report = result.method.report()
    print(result.summary())
    print(report)
    assert torch.equal(result.loss, result.twin_loss), result.summary()  # codes change backward, not forward
    assert result.cosine >= 0.99, result.summary()
    assert report.savings > 0, f"savings {report.savings:.3f}\n{report}"


# ---------------------------------------------------------------------------------------------------- masks
MASK_CASES = {
    "relu-loop": (Case("relu-loop", ReluLoop, _regression_batch(WIDTH, low_rank=False)), WIDTH),
    # NCHW rows are image rows (width 32); ReLU and max-pool read their saved tensors as masks and indices.
    "conv-nchw": (CASES["conv-nchw"], 32),
}


@pytest.mark.parametrize("name", list(MASK_CASES))
def test_full_rank_int8_codes_keep_relu_masks_exact(name):
    """Full-width rank, int8 codes: the only error is quantization, so the gradient must stay (cos >= 0.99).

    Turning a ReLU's exact zeros into small positive codes flips the mask its backward reads (hard part 11).
    """
    case, width = MASK_CASES[name]
    result = compare(case, laser_method(rank=width, max_rank=width, quantize="int8"))
    report = result.method.report()
    print(result.summary())
    print(report)
    assert result.cosine >= 0.99, result.summary()


# ----------------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("where", ["labels", "outside"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_language_model_loss_is_never_coded(name, where):
    """The loss's log-softmax stays raw, also when the model computes it itself (``labels=``).

    ``min_dim=97`` keeps every activation of these models (widths <= 96) out of reach; only vocabulary-wide
    tensors (width 100: the log-softmax of the loss) are admitted by the filter. Those must stay raw, so the
    gradients are the twin's exactly; coding them at rank 4 would show in every gradient, lm_head's first.
    ``outside`` (the loss computed by the caller) is the control.
    """
    case = CASES[name]
    if where == "outside":
        case = Case(f"{name}-outside", case.model, case.batch, outside_lm_loss)
    result = compare(case, laser_method(rank=4, max_rank=4, min_dim=97))
    report = result.method.report()
    print(result.summary())
    print(report)
    head = [n for n in result.grads if n.endswith("lm_head.weight") or n.endswith("wte.weight")]
    assert head, sorted(result.grads)
    head_cosine = cosine(result.grads[head[0]], result.twin_grads[head[0]])
    summary = f"{head[0]} grad cosine {head_cosine:.6f}; {result.summary()}"
    print(summary)
    assert torch.equal(result.loss, result.twin_loss), summary
    assert head_cosine >= 0.999, summary
    assert result.rel_error <= 1e-6, summary
    coded = [row.name for row in report.sites if row.dim == 100 and row.stored_bytes != row.raw_bytes]
    assert not coded, f"vocabulary-wide sites coded: {coded}\n{report}"


# ------------------------------------------------------------------------------------------- frozen weights
def test_frozen_weight_autocast_copies_are_never_encoded():
    """Under bf16 autocast a frozen weight's bf16 copy has no autograd history; it is still a weight."""
    case = CASES["lora-bf16"]
    result = compare(case, lambda model: IdentityCodec(model, record=True), steps=1)
    weights = {n: p.detach().to(torch.bfloat16) for n, p in result.method.model.named_parameters()
               if not p.requires_grad and p.dim() == 2}
    encoded_weights = sorted({n for n, w in weights.items() for x in result.method.seen
                              if x.dtype == w.dtype and (torch.equal(x, w) or torch.equal(x, w.T))})
    assert not encoded_weights, f"frozen weights handed to encode as activations: {encoded_weights}"
    assert result.rel_error <= 1e-6, result.summary()


# --------------------------------------------------------------------------------------------- closing table
def print_table(timed_steps: int = 7) -> None:
    """Per model: bytes saved, gradient cosine and rel error, step time ratio vs the twin, for rank 32."""
    torch.set_num_threads(1)
    cases = {**CASES, **{k: v for k, v in LOW_RANK_CASES.items() if k not in CASES}}
    configs = {"rank=32": {"rank": 32}, "rank=32 int8": {"rank": 32, "quantize": "int8"}}
    header = f"{'model':<28}{'config':<15}{'saved':>8}{'grad cos':>11}{'rel err':>10}{'time x':>8}"
    print(header)
    print("-" * len(header))
    for name, case in cases.items():
        for label, options in configs.items():
            try:
                skip_unavailable(case)
                result = compare(case, laser_method(**options), timed_steps=timed_steps)
            except pytest.skip.Exception as skipped:
                print(f"{name:<28}{label:<15}skipped: {skipped}")
                continue
            ratio = result.seconds / result.twin_seconds if result.twin_seconds else float("nan")
            print(f"{name:<28}{label:<15}{100 * result.method.report().savings:>7.1f}%{result.cosine:>11.6f}"
                  f"{result.rel_error:>10.3g}{ratio:>8.2f}")


if __name__ == "__main__":
    print_table()
