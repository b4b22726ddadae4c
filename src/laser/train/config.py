"""Training configuration: dataclasses validated on construction, named presets, ``key=value`` overrides.

A :class:`TrainConfig` holds the task (``"maze"`` or ``"text"``, :mod:`laser.train.tasks`), its model (a
:class:`~laser.models.trm.TRMConfig` or a :class:`~laser.models.looped_lm.LoopedLMConfig`), its data
(:class:`DataConfig` or :class:`TextDataConfig`), the optimisation settings, the activation-memory method with
its options, and the bookkeeping (evaluation, logging, checkpoints). Every setting is checked in
``__post_init__``, so a bad config fails before any data is generated, naming the key and the values it accepts.

>>> cfg = apply_overrides(train_preset("quick"), ["model.hidden=128", "lr=3e-4", "method=laser", "method.rank=32"])
>>> cfg.model.hidden, cfg.lr, cfg.method, cfg.method_options
(128, 0.0003, 'laser', {'rank': 32})
"""

from __future__ import annotations

import ast
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields

from laser import methods
from laser.data import maze
from laser.models import looped_lm, trm
from laser.train import tasks
from laser.train.distributed import PARALLEL_MODES

PRECISIONS = ("fp32", "bf16")
# Model settings that follow from the data and cannot be set on their own (the maze task's; each task names its
# own in ``derived_model_keys``).
DERIVED_MODEL_KEYS = tasks.MazeTask.derived_model_keys
# Settings set through their own dotted keys (model.*, data.*, method, method.*), not as a whole.
NESTED_KEYS = ("model", "data", "method_options", "method_defaults")
# Settings that change bookkeeping only, never the trained weights: a run may resume with other values.
BOOKKEEPING_KEYS = ("log_every", "checkpoint_every", "device", "out_dir", "progress", "parallel")


def result_relevant(config: dict) -> dict:
    """A config dict (``config_to_dict``) without its bookkeeping settings: what decides the trained weights.

    ``method_defaults`` is left out too: a config merges the defaults of its own method into ``method_options``
    when it is made, so a preset's defaults for other methods never reach its run (a ``none`` run is the same
    run whatever rank the preset gives ``laser``). The method's options are given as the config they build, so
    options that build the same one (``site_ranks=""`` and no ``site_ranks``) decide the same run."""
    relevant = {k: v for k, v in config.items() if k not in (*BOOKKEEPING_KEYS, "method_defaults")}
    built = methods.make_config(config["method"], **config.get("method_options", {}))
    return {**relevant, "method_options": dataclasses.asdict(built)}


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is invalid: {allowed}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class DataConfig:
    """The maze split (paper Table 6): ``count`` mazes of ``size x size``, the last ``val_count`` for validation.

    Attributes:
        size: odd grid side (11 in the paper); the model's sequence length is ``size * size``.
        count: mazes generated in all, validation included.
        val_count: mazes held out for validation.
        min_path: minimum number of PATH cells of a maze (0 keeps mazes whose start touches the goal).
        seed: seed of the maze generator; the same for every method and training seed of a comparison.
        cache_dir: where the generated split is cached as .npz (None: regenerate every time).
        curriculum_epochs: the first this-many epochs are a paced curriculum: each batch is drawn from the
            training mazes with the fewest PATH cells, a pool growing linearly from 1% of them to all of them
            over those epochs (:class:`~laser.train.trainer.BatchStream`); later epochs are random
            permutations. The validation split is untouched.
        extra_train: training mazes added beyond the split, from their own seeded stream
            (:func:`~laser.data.maze.add_training_mazes`): more training data with the same validation mazes,
            which a larger ``count`` would redraw. Any equal to a validation maze is dropped.
    """

    size: int = 11
    count: int = 10_000
    val_count: int = 1_000
    min_path: int = 0
    seed: int = 0
    cache_dir: str | None = None
    curriculum_epochs: int = 0
    extra_train: int = 0

    def __post_init__(self) -> None:
        _require(_is_int(self.size) and self.size >= 5 and self.size % 2 == 1, "data.size", self.size,
                 "must be an odd integer >= 5 (e.g. 7 or 11)")
        _require(_is_int(self.val_count) and self.val_count >= 1, "data.val_count", self.val_count,
                 "must be an integer >= 1")
        _require(_is_int(self.count) and self.count > self.val_count, "data.count", self.count,
                 f"must be an integer > data.val_count ({self.val_count})")
        _require(_is_int(self.min_path) and 0 <= self.min_path <= maze.max_path_length(self.size),
                 "data.min_path", self.min_path,
                 f"must be an integer in [0, {maze.max_path_length(self.size)}] for data.size={self.size}")
        _require(_is_int(self.seed) and self.seed >= 0, "data.seed", self.seed, "must be an integer >= 0")
        _require(_is_int(self.curriculum_epochs) and self.curriculum_epochs >= 0, "data.curriculum_epochs",
                 self.curriculum_epochs, "must be an integer >= 0 (0: every epoch in random order)")
        _require(_is_int(self.extra_train) and self.extra_train >= 0, "data.extra_train", self.extra_train,
                 "must be an integer >= 0 (0: the split's own training mazes only)")


@dataclass
class TextDataConfig:
    """The byte corpus of the text task (:mod:`laser.data.text`): the standard library's source, split by file.

    The corpus depends on the Python version (other files, other contents); every run records its content hash.

    Attributes:
        max_bytes: the corpus size cap (whole files, chosen in a fixed hash order).
        val_fraction: the share of files held out for validation (chosen by a hash of the path).
        val_windows: validation windows of ``model.seq_len`` bytes used (0: every window of the held-out files).
        cache_dir: where the split is cached as .npz (None: read the files every time).
    """

    max_bytes: int = 8_000_000
    val_fraction: float = 0.1
    val_windows: int = 0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _require(_is_int(self.max_bytes) and self.max_bytes >= 1024, "data.max_bytes", self.max_bytes,
                 "must be an integer >= 1024")
        _require(isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1, "data.val_fraction",
                 self.val_fraction, "must be a number in (0, 1)")
        _require(_is_int(self.val_windows) and self.val_windows >= 0, "data.val_windows", self.val_windows,
                 "must be an integer >= 0 (0: all)")


# The data config of each task.
DATA_TYPES: dict[str, type] = {"maze": DataConfig, "text": TextDataConfig}


@dataclass
class TrainConfig:
    """Everything one training run needs; the defaults are the paper's Table 4.

    Attributes:
        task: ``"maze"`` (TRM on mazes) or ``"text"`` (looped byte LM on the stdlib's source); it decides the
            model and data config types, the loss and the metrics (:mod:`laser.train.tasks`).
        model: the TRM (its ``seq_len`` and ``vocab`` are set from the data), or the looped LM (``vocab`` 256).
        data: the maze split, or the text corpus.
        method: activation-memory method, a name of :func:`laser.methods.names` (``"none"``: the baseline).
        method_options: settings of the method's config (e.g. ``{"rank": 64, "quantize": "int8"}``).
        method_defaults: per-method options this preset uses unless ``method_options`` sets them (e.g. a rank
            scaled to the model width: ``{"laser": {"rank": 32}}``); merged into ``method_options``.
        lr, betas, weight_decay: AdamW settings.
        warmup: optimizer steps of linear warmup before the cosine decay.
        min_lr_ratio: the cosine decays from ``lr`` to ``min_lr_ratio * lr`` at the last step.
        batch: mazes per batch; every batch is trained for ``model.n_sup`` optimizer steps (deep supervision).
        epochs: passes over the training mazes (the last partial batch of an epoch is dropped); maze only.
        max_steps: when > 0, train exactly this many optimizer steps instead of ``epochs`` passes (the text
            task needs it: its batches are random windows).
        grad_clip: maximum global gradient norm.
        precision: ``"fp32"``, or ``"bf16"`` autocast where the device supports it (fp32 elsewhere).
        seed: seed of the model init and of the data order.
        eval_every: evaluate every this many optimizer steps (0: only at the end).
        eval_count: validation mazes used by the periodic evaluations (0: all); the final one uses all.
        log_every: write a metrics line every this many steps.
        checkpoint_every: save a checkpoint every this many steps (0: only at the end of ``train``).
        grad_probe_at: fractions of training at which gradient fidelity is measured (empty: never).
        grad_probe_batch: mazes in each of the two fixed validation batches of the gradient probe.
        grad_probe_sites: at the last probe, also measure it with one site compressed at a time.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; under torchrun each
            process takes ``cuda:LOCAL_RANK``.
        parallel: how a run of several processes (torchrun) shares the model: ``"ddp"`` replicates it,
            ``"fsdp"`` shards weights and optimizer state (FSDP2). Either way each optimizer step trains on
            the same global batch of ``batch`` mazes, split evenly across the processes.
        out_dir: where metrics, checkpoints and the config go (None: nothing is written).
        progress: show a progress bar when stderr is a terminal.
    """

    model: trm.TRMConfig | looped_lm.LoopedLMConfig = field(default_factory=trm.TRMConfig)
    data: DataConfig | TextDataConfig = field(default_factory=DataConfig)
    task: str = "maze"
    method: str = "none"
    method_options: dict = field(default_factory=dict)
    method_defaults: dict = field(default_factory=dict)
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-2
    warmup: int = 0
    min_lr_ratio: float = 0.0
    batch: int = 64
    epochs: int = 16
    max_steps: int = 0
    grad_clip: float = 1.0
    precision: str = "fp32"
    seed: int = 100
    eval_every: int = 0
    eval_count: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    grad_probe_at: tuple[float, ...] = (0.1, 0.5, 1.0)
    grad_probe_batch: int = 32
    grad_probe_sites: bool = True
    device: str = "auto"
    parallel: str = "ddp"
    out_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        _require(self.task in tasks.TASKS, "task", self.task, f"use one of {', '.join(tasks.TASKS)}")
        task = tasks.TASKS[self.task]
        presets = ", ".join(presets_of(self.task))
        _require(isinstance(self.model, task.model_type), "model", type(self.model).__name__,
                 f"task={self.task} trains a {task.model_type.__name__} (presets: {presets})")
        data_type = DATA_TYPES[self.task]
        _require(isinstance(self.data, data_type), "data", type(self.data).__name__,
                 f"task={self.task} reads a {data_type.__name__} (presets: {presets})")
        self.model = task.derive_model(self.model, self.data)
        _require(isinstance(self.method_options, dict), "method_options", self.method_options, "must be a dict")
        _require(isinstance(self.method_defaults, dict) and all(isinstance(v, dict) for v in
                 self.method_defaults.values()), "method_defaults", self.method_defaults,
                 "must map method names to option dicts")
        for name, options in self.method_defaults.items():
            check_method(name, options)
        self.method_options = {**self.method_defaults.get(self.method, {}), **self.method_options}
        check_method(self.method, self.method_options)  # unknown method or option: fails here
        _require(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0, "lr", self.lr,
                 "must be a finite number > 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
                 "must be two numbers in [0, 1)")
        self.betas = tuple(float(b) for b in self.betas)
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        for key in ("warmup", "max_steps", "eval_every", "eval_count", "checkpoint_every"):
            value = getattr(self, key)
            _require(_is_int(value) and value >= 0, key, value, "must be an integer >= 0")
        for key in ("batch", "epochs", "log_every", "grad_probe_batch"):
            value = getattr(self, key)
            _require(_is_int(value) and value >= 1, key, value, "must be an integer >= 1")
        if self.task == "maze":
            n_train = self.data.count - self.data.val_count
            _require(self.batch <= n_train, "batch", self.batch,
                     f"must be <= the training mazes (data.count - data.val_count = {n_train})")
            _require(2 * self.grad_probe_batch <= self.data.val_count or not self.grad_probe_at, "grad_probe_batch",
                     self.grad_probe_batch, f"two probe batches must fit in data.val_count ({self.data.val_count})")
        else:
            _require(self.max_steps > 0, "max_steps", self.max_steps,
                     f"must be > 0 for task={self.task}: its batches are random windows, not epochs")
        _require(self.grad_clip > 0, "grad_clip", self.grad_clip, "must be > 0")
        _require(self.precision in PRECISIONS, "precision", self.precision, f"use one of {', '.join(PRECISIONS)}")
        _require(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "must be an integer >= 0")
        self.grad_probe_at = tuple(float(f) for f in self.grad_probe_at)
        _require(all(0 < f <= 1 for f in self.grad_probe_at), "grad_probe_at", self.grad_probe_at,
                 "must be fractions of training in (0, 1]")
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
                 self.device, "use auto, cpu, cuda or cuda:N")
        _require(self.parallel in PARALLEL_MODES, "parallel", self.parallel, f"use one of {', '.join(PARALLEL_MODES)}")

    @property
    def n_train(self) -> int:
        """Training mazes (maze task)."""
        return self.data.count - self.data.val_count

    @property
    def batches_per_epoch(self) -> int:
        """Full batches in one pass over the training mazes."""
        return self.n_train // self.batch

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (every maze batch takes ``model.n_sup`` of them)."""
        if self.max_steps:
            return self.max_steps
        return self.epochs * self.batches_per_epoch * self.model.n_sup


def check_method(name: str, options: dict) -> None:
    """Validate a method name and its options (ValueError listing the valid ones)."""
    try:
        methods.make_config(name, **options)
    except TypeError as err:  # a value of the wrong type compared with a bound
        raise ValueError(f"method {name!r} options {options} are invalid: {err}") from None


# ---------------------------------------------------------------------------------------------- presets
def _paper() -> TrainConfig:
    """Tables 3-6 of the paper: 11x11 mazes, 10k (9k/1k), D=512 TRM with 24 L-cycles, AdamW 1e-4, bf16."""
    return TrainConfig(model=trm.preset("paper"), data=DataConfig(size=11, count=10_000, val_count=1_000),
                       precision="bf16", eval_every=500, eval_count=0, checkpoint_every=500, log_every=10)


def _paper_cpu() -> TrainConfig:
    """The paper's data and optimisation with the TRM's CPU-sized shape (``trm.preset("paper-cpu")``), fp32."""
    return TrainConfig(model=trm.preset("paper-cpu"), data=DataConfig(size=11, count=10_000, val_count=1_000),
                       precision="fp32", eval_every=500, checkpoint_every=500)


def _quick() -> TrainConfig:
    """Converges on 7x7 mazes: 97 to 100% validation solve rate on seeds 100-102; a baseline run takes under 2
    minutes on one core, a LASER run about 3.

    The model: 3 distinct blocks (L_layers=3), one latent and one answer update (L_cycles=1: 6 block applications
    per step, all with grad), 16 heads of width 4 (at head dim 4 the 2D RoPE has one frequency per axis, 1 rad per
    cell, so rope_theta does not matter); AdamW lr 2e-3 after 200 warmup steps, cosine to 0.1x at step 600, batches
    of 32 (19,200 mazes, 0.94 epochs).

    What made it converge (``laser train --preset quick --method none``, 1 torch thread; final solve rate on the 512
    validation mazes, trivial 14.3%; seed 100 unless named). The previous preset (1 block x 6 latent updates, 4
    heads, 400 steps of 64 mazes) solved 38.5%: every maze with up to 2 PATH cells, almost none with more, and more
    steps alone were slow (2000 steps of 32: 77.1%). At 800 steps of 32 unless named: that model 39.1%, with 8 heads
    48.8%, path_weight 5 33.0%; at 400 x 64: lr 4e-3 31.1%, width 96 23.6%, n_sup 2 / 4 33.2 / 15.4%, H_cycles 3 x
    L_cycles 3 29.5%. Distinct blocks instead of weight-tied updates: 2 blocks x 3 updates 78.1% (8 heads 96.5%); 3
    x 2 99.8 / 89.5 / 99.0% on seeds 100 / 101 / 102, with 8 heads 95.7 / 99.6 / 97.7, with 16 heads 99.0 / 98.6 /
    99.4 (but 1.6x the time of this preset a run); 3 x 1 with 16 heads 98.8 / 99.8 / 100.0 at 800 steps, 98.6 /
    99.6 / 100.0% at 700 and, this preset, 97.1 / 97.1 / 100.0% at 600 (mean 98.0%, std 1.7 points). So: depth
    from distinct blocks and many narrow heads (a look-up per neighbour), and one update of each state is enough at
    this size.

    Why 600 steps, not 700: ``laser compare`` with its defaults (none, laser, laser:quantize=int8 x seeds 100, 101
    on 2 jobs x 1 thread) took 633 s on 2 idle cores at 700 steps, over the 10 minutes it is meant to take. A LASER
    step takes 1.6x the baseline's at this width (the compare tables' step-time column), most of it the
    projections, accumulations and reconstructions of Algorithm 1 (``benchmarks/profile.py`` splits a step into
    them). At 600 steps the same job took 476 s (commit 8f1d11a: none 99-107 s a run, laser 167-181 s, int8
    176-182 s, two at a time), and LASER stays level with the baseline (``results/compare-quick600.md``: 98.1 +-
    1.4% and, with int8 codes, 98.2 +- 0.9% against 98.0 +- 1.7%; whole-model gradient cosine >= 0.995 at every
    probe).

    Cost, on one core of an otherwise idle 2-core machine (700 steps): none 139 / 126 / 125 s a run on seeds 100 /
    101 / 102; at 800 steps none 132 s, laser 212 s (98.4% on seed 100), laser:quantize=int8 223 s (99.6%).

    Kept from the previous preset, what got it off the copy-the-input plateau: loss weight 2.5 on PATH cells, 2D
    RoPE over (row, column), lr 2e-3 after a warmup, every update with grad (n_sup=1).

    LASER's rank is 56 (the oracle, static and sketch take the same), not a quarter of D as the paper's 128 of 512:
    with int8 codes, the lowest whole-model gradient cosine over the 3 probes of seeds 100-102 was 0.973 at rank 32
    (1400 steps), 0.988 at rank 48 and 0.991 at rank 56 (700 steps), 0.990 at rank 56 over 1400 steps
    (``results/compare-parity-quick.md``, ``results/compare-quick1400.md``). The MLP down projection's input (256
    wide) takes rank 112: budget mode's plan for a floor of 0.98 on every parameter tensor's gradient cosine, from
    rank 56 with int8 codes, on a converged seed-100 baseline's weights (``python benchmarks/grad_probe.py RUN
    --plan 0.98 --per-tensor --plan-from laser:rank=56,quantize=int8``, ``results/plan-tensor-quick.raw.md``): the
    least faithful tensor, that projection's weight, went from 0.970 to 0.990. Trained for 700 steps on seeds
    100-102 with int8 codes it solved 99.2 +- 0.5% against the baseline's 99.2 +- 0.6% (rank 56 alone: 98.2 +- 1.5%)
    at 0.235 of the baseline's bytes, the whole-model cosine >= 0.992 at every probe (``results/compare-quick56.md``).
    At D=64 most sites are 64 wide, so fp32 codes at these ranks pay mainly on the 256-wide MLP sites; int8 codes pay
    everywhere. ``laser:rank=R,site_ranks=`` gives every site rank R.
    """
    return TrainConfig(
        model=dataclasses.replace(trm.preset("quick"), hidden=64, heads=16, L_layers=3, H_cycles=1, L_cycles=1,
                                  n_sup=1, path_weight=2.5, rope_theta=100.0, rope_2d=True),
        data=DataConfig(size=7, count=20_512, val_count=512),
        # Rank 56, the MLP down projection's input at 112: budget mode's plan for a per-tensor gradient floor
        # (see the docstring); the per-tensor and fixed-basis methods are compared at rank 56.
        method_defaults={"laser": {"rank": 56, "site_ranks": "*mlp.down*=112"},
                         **{name: {"rank": 56} for name in ("static", "sketch", "oracle")}},
        lr=2e-3,
        weight_decay=0.1,
        warmup=200,
        min_lr_ratio=0.1,
        batch=32,
        max_steps=600,
        eval_every=200,
        eval_count=256,
        log_every=10,
    )


def _quick11() -> TrainConfig:
    """The quick model on the paper's 11x11 mazes: 93.9% validation solve rate on seed 100 (512 mazes, trivial 2.5%)
    after 3000 steps, about 50 minutes on one core of a busy 2-core machine (first measurement, one seed).

    What made it converge (``laser train --preset quick --method none --set data.size=11`` plus the settings
    named; the full record is ``results/maze11.md``). Every earlier recipe, deeper, wider, weight-tied, with 3x the
    data or a paced curriculum, stopped at 19% or less: it solved mazes with up to 4 PATH cells and almost none
    longer. Two changes together:

    - ``model.local_heads=8``: half of the 16 heads see only a cell and its 4 grid neighbours, a rule that can be
      applied again at every step. Alone, with the paced curriculum over 3 epochs: 15.2 / 26.2 / 30.9% at steps
      250 / 500 / 750 against 6.2 / 5.5 / 5.5% without it, and 35.5% at step 3000 against 18.9%.
    - ``model.n_sup=4`` (an optimiser step per supervision step, the carried answer refined 4 times, 24 block calls
      at evaluation) with the paced curriculum over its first epoch: 48.8 / 74.6 / 90.6 / 93.9% at steps 1000 /
      2000 / 2500 / 3000, still rising. By path length: 100% of paths up to 9 PATH cells, 98.9% of 10-19, 86.5% of
      20-29, 46.4% of 30-41 (``benchmarks/maze_depth.py``).

    LASER here is rank 32 (at 11x11 it keeps the gradient cosine >= 0.993 at every probe) with ``retry_after=50``:
    with ``n_sup=4`` each optimiser step sees another supervision step, so sites fail the fidelity check in the
    first steps and, without retries, the MLP hidden sites stay raw (``untracked``) for the rest of training. On
    seeds 100 / 101 (``results/compare-quick11.md``) retries took the stored bytes from 0.634 to 0.447 of the
    baseline's, solving 98.4 / 97.7% against 95.9 / 96.1% without them.
    """
    cfg = _quick()
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, local_heads=8, n_sup=4),
        data=dataclasses.replace(cfg.data, size=11, curriculum_epochs=1), max_steps=3000, eval_every=250,
        checkpoint_every=250,
        method_defaults={"laser": {"rank": 32, "retry_after": 50},
                         **{name: {"rank": 32} for name in ("static", "sketch", "oracle")}})


def _tiny() -> TrainConfig:
    """For tests: a few steps take well under a second."""
    return TrainConfig(
        model=dataclasses.replace(trm.preset("tiny"), hidden=16, heads=2, L_cycles=2, H_cycles=1, n_sup=2),
        data=DataConfig(size=5, count=96, val_count=32),
        lr=1e-3,
        warmup=2,
        batch=8,
        max_steps=8,
        eval_every=4,
        log_every=2,
        grad_probe_at=(0.5, 1.0),
        grad_probe_batch=4,
        progress=False,
    )


def _text_paper() -> TrainConfig:
    """The looped byte LM at the paper's TRM width for a GPU: D=512, 8 heads, SwiGLU 1536, one block x 24 loops,
    512-byte context, batch 64, AdamW 3e-4 with warmup and cosine, bf16, 8 MB corpus, 5000 steps."""
    return TrainConfig(task="text", model=looped_lm.preset("text-paper"), data=TextDataConfig(max_bytes=8_000_000),
                       lr=3e-4, weight_decay=0.1, warmup=200, min_lr_ratio=0.1, batch=64, max_steps=5000,
                       precision="bf16", eval_every=500, eval_count=256, checkpoint_every=500, log_every=10)


def _text_quick() -> TrainConfig:
    """A looped byte LM that trains on one CPU core in about two minutes: D=128, 4 heads, one block x 4 loops,
    128-byte context, 300 steps of 16 windows (614k bytes, 0.17 passes over the 3.6 MB training stream),
    AdamW 2e-3 after 30 warmup steps, cosine to 0.1x; validation on 1024 windows (131 kB) of held-out files.
    LASER's rank is a quarter of D, as the paper's k=128 is of D=512."""
    return TrainConfig(
        task="text",
        model=looped_lm.preset("text-quick"),
        data=TextDataConfig(max_bytes=4_000_000, val_windows=1024),
        method_defaults={name: {"rank": 32} for name in ("laser", "static", "sketch", "oracle")},
        lr=2e-3,
        weight_decay=0.1,
        warmup=30,
        min_lr_ratio=0.1,
        batch=16,
        max_steps=300,
        eval_every=100,
        eval_count=256,
        log_every=10,
        grad_probe_batch=16,
    )


def _text_tiny() -> TrainConfig:
    """For tests: a few steps on a 64 kB corpus take well under a second."""
    return TrainConfig(
        task="text",
        model=looped_lm.preset("text-tiny"),
        data=TextDataConfig(max_bytes=65_536, val_windows=16),
        lr=1e-3,
        warmup=2,
        batch=4,
        max_steps=6,
        eval_every=3,
        log_every=2,
        grad_probe_at=(0.5, 1.0),
        grad_probe_batch=4,
        progress=False,
    )


PRESETS: dict[str, typing.Callable[[], TrainConfig]] = {
    "paper": _paper,
    "paper-cpu": _paper_cpu,
    "quick": _quick,
    "quick11": _quick11,
    "tiny": _tiny,
    "text-paper": _text_paper,
    "text-quick": _text_quick,
    "text-tiny": _text_tiny,
}


def _preset_task(name: str) -> str:
    """The task of a preset, by its name (text presets start with ``text-``)."""
    return "text" if name.startswith("text-") else "maze"


def train_preset(name: str) -> TrainConfig:
    """A fresh :class:`TrainConfig` of the named preset: ``"paper"``, ``"paper-cpu"``, ``"quick"``, ``"quick11"``,
    ``"tiny"`` (mazes) or ``"text-paper"``, ``"text-quick"``, ``"text-tiny"`` (the looped byte LM)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


def presets_of(task: str) -> list[str]:
    """The presets of a task."""
    return [name for name in PRESETS if _preset_task(name) == task]


# -------------------------------------------------------------------------------------------- overrides
def parse_literal(text: str) -> object:
    """A command-line value as int, float, bool, None or (failing those) the string itself."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, (int, float)) else text


def _parse_as(text: str, kind: object, key: str) -> object:
    """``text`` converted to the annotated type ``kind`` of setting ``key``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in ("none", "null") and type(None) in args:
            return None
        (kind,) = [a for a in args if a is not type(None)]
        return _parse_as(text, kind, key)
    if origin is tuple:
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
        element = args[0] if args else str
        return tuple(_parse_as(p, element, key) for p in parts)
    if kind is bool:
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{key}={text!r} is invalid: use true or false")
        return lowered in ("true", "1", "yes")
    if kind in (int, float):
        try:
            return kind(float(text)) if kind is int and float(text).is_integer() else kind(text)
        except ValueError:
            raise ValueError(f"{key}={text!r} is invalid: must be a number ({kind.__name__})") from None
    return text


def _settable(config_type: type, prefix: str) -> dict[str, object]:
    """Overridable keys of a config dataclass and their annotated types."""
    hints = typing.get_type_hints(config_type)
    return {f"{prefix}{f.name}": hints[f.name] for f in fields(config_type)}


def valid_keys(cfg: TrainConfig) -> list[str]:
    """Every key :func:`apply_overrides` accepts for ``cfg`` (``method.<option>`` for its method's options)."""
    top = {k: v for k, v in _settable(TrainConfig, "").items() if k not in NESTED_KEYS}
    derived = tasks.TASKS[cfg.task].derived_model_keys
    model = {k: v for k, v in _settable(type(cfg.model), "model.").items() if k.split(".")[1] not in derived}
    data = _settable(type(cfg.data), "data.")
    options = [f"method.{name}" for name in method_option_names(cfg.method)]
    return [*top, *model, *data, *options]


def method_option_names(method: str) -> list[str]:
    """Option names of a registered method (its config's fields)."""
    return [f.name for f in fields(type(methods.make_config(method)))]


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """A new config with ``key=value`` overrides applied in order; keys are dotted (``model.hidden=64``).

    ``method=NAME`` switches the method (its options start empty unless given after it), ``method.OPT=V``
    sets a method option. Values are parsed to the setting's type. An unknown key fails listing the valid
    keys; the result is validated as a whole.
    """
    top: dict[str, object] = {}
    model: dict[str, object] = {}
    data: dict[str, object] = {}
    method, options = cfg.method, dict(cfg.method_options)
    top_types = _settable(TrainConfig, "")
    model_types = _settable(type(cfg.model), "")
    data_types = _settable(type(cfg.data), "")
    derived = tasks.TASKS[cfg.task].derived_model_keys
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} is invalid: use key=value, e.g. model.hidden=64")
        head, _, rest = key.partition(".")
        if key == "method":
            check_method(text.strip(), {})
            method, options = text.strip(), {}
        elif head == "method" and rest:
            if rest not in method_option_names(method):
                raise _unknown_key(key, cfg, method)
            options[rest] = parse_literal(text)
        elif head == "model" and rest in model_types and rest not in derived:
            model[rest] = _parse_as(text, model_types[rest], key)
        elif head == "data" and rest in data_types:
            data[rest] = _parse_as(text, data_types[rest], key)
        elif not rest and key in top_types and key not in NESTED_KEYS:
            top[key] = _parse_as(text, top_types[key], key)
        else:
            raise _unknown_key(key, cfg, method)
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, **model),
        data=dataclasses.replace(cfg.data, **data),
        method=method,
        method_options=options,
        **top,
    )


def _unknown_key(key: str, cfg: TrainConfig, method: str) -> ValueError:
    keys = valid_keys(dataclasses.replace(cfg, method=method, method_options={}))
    return ValueError(f"unknown setting {key!r}; valid keys: {', '.join(keys)}")


# ------------------------------------------------------------------------------------------ method specs
@dataclass(frozen=True)
class MethodSpec:
    """A method as written on the command line: ``laser:rank=64,quantize=int8+checkpoint``.

    Attributes:
        label: the spec as written (used to name results).
        name: the registered method name.
        options: the method's config options.
        checkpoint: also recompute activations in backward (the model option ``checkpoint``).
        coded_recompute: ``+coded-checkpoint``: recompute through ``laser.checkpoint``, so the method stores the
            recomputed activations too (the model options ``checkpoint`` and ``coded_recompute``).
    """

    label: str
    name: str
    options: dict
    checkpoint: bool = False
    coded_recompute: bool = False


def parse_method_spec(spec: str) -> MethodSpec:
    """Parse ``NAME[:k=v,...][+checkpoint|+coded-checkpoint]`` (``checkpoint`` alone is the baseline with
    recomputation).

    Values are parsed as int, float, bool, None or str; the method and its options are validated.
    """
    parts = [p.strip() for p in spec.strip().split("+")]
    coded = "coded-checkpoint" in parts[1:]
    checkpoint = coded or "checkpoint" in parts[1:] or parts[0] == "checkpoint"
    extra = [p for p in parts[1:] if p not in ("checkpoint", "coded-checkpoint")]
    if not parts[0] or extra or len(parts) > 2:
        raise ValueError(f"method spec {spec!r} is invalid: use NAME[:key=value,...][+checkpoint] or "
                         f"NAME[:key=value,...][+coded-checkpoint] with NAME one of {', '.join(methods.names())}, "
                         "e.g. laser:rank=64,quantize=int8+checkpoint")
    head = "none" if parts[0] == "checkpoint" else parts[0]
    name, _, text = head.partition(":")
    options: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"method option {item!r} in {spec!r} is invalid: use key=value")
        options[key.strip()] = parse_literal(value)
    check_method(name.strip(), options)
    return MethodSpec(spec.strip(), name.strip(), options, checkpoint, coded)


def with_method(cfg: TrainConfig, spec: MethodSpec | str) -> TrainConfig:
    """``cfg`` training with the method of ``spec`` (recomputation switched on when the spec asks)."""
    spec = parse_method_spec(spec) if isinstance(spec, str) else spec
    model = dataclasses.replace(cfg.model, checkpoint=cfg.model.checkpoint or spec.checkpoint,
                                coded_recompute=cfg.model.coded_recompute or spec.coded_recompute)
    return dataclasses.replace(cfg, model=model, method=spec.name, method_options=dict(spec.options))


# ---------------------------------------------------------------------------------------- serialisation
def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain-data form of a config (JSON-ready)."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> TrainConfig:
    """Inverse of :func:`config_to_dict`; unknown keys fail listing the valid ones."""
    data = dict(data)
    task = tasks.get(data.get("task", "maze"))
    model = _build(task.model_type, data.pop("model", {}), "model")
    dataset = _build(DATA_TYPES[task.name], data.pop("data", {}), "data")
    return _build(TrainConfig, data, "", model=model, data=dataset)


def _build(config_type: type, values: dict, prefix: str, **extra: object) -> object:
    hints = typing.get_type_hints(config_type)
    names = [f.name for f in fields(config_type)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown setting(s) {[prefix + '.' + k if prefix else k for k in unknown]}; "
                         f"valid keys: {', '.join(names)}")
    kwargs = {k: tuple(v) if typing.get_origin(hints[k]) is tuple and v is not None else v
              for k, v in values.items()}
    return config_type(**kwargs, **extra)
