"""The training loop: one loop for every activation-memory method and task, with evaluation, metrics and exact
resume.

The task (:mod:`laser.train.tasks`, ``cfg.task``) owns the model, the data, the loss and the metrics. On mazes
every optimizer step is one deep-supervision step of TRM: a batch is trained for ``model.n_sup`` steps, each
continuing from the previous step's (detached) carry; on text it is one batch of random byte windows. The loop
never asks which method it runs:

    with method:
        carry, logits, loss = task.step(forward, model, inputs, targets, carry)
    loss.backward(); clip; opt.step(); method.step(); sched.step()

A checkpoint holds everything that decides the rest of the run (weights, optimizer, scheduler, method state,
RNG states, data position and carry), so a resumed run ends with the same weights as an uninterrupted one.

Under ``torchrun`` the same loop is data-parallel (:mod:`laser.train.distributed`, set up once in
``Trainer.__init__``): each process trains on its slice of every global batch, metrics are averaged across
processes, and rank 0 writes checkpoints that any number of processes can resume.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import laser.methods
from laser.analysis.gradients import least_faithful
from laser.hooks import ActivationMethod
from laser.models.trm import TRMCarry
from laser.train import tasks
from laser.train.config import TrainConfig, config_to_dict, result_relevant
from laser.train.distributed import Parallel

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (corrupt, truncated, or from another format or config)."""


# ----------------------------------------------------------------------------------------------- metrics
def token_accuracy(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of cells predicted right; ``predictions`` and ``targets`` are (B, L) token ids."""
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ")
    return (predictions == targets).float().mean().item()


def solve_rate(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of mazes whose whole grid is predicted exactly; (B, L) token ids each."""
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ")
    return (predictions == targets).all(dim=-1).float().mean().item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine between two flat vectors, in float64 (1.0 when both are zero)."""
    a, b = a.double(), b.double()
    norm = a.norm() * b.norm()
    if norm == 0:
        return 1.0 if a.norm() == b.norm() else 0.0
    return (a @ b / norm).item()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: ``max_memory_allocated`` on CUDA, peak RSS on the CPU.

    Peak RSS covers the whole life of the process, so it measures one run only in a fresh process. On Linux
    it is ``VmHWM`` of ``/proc/self/status``: ``ru_maxrss`` of a process started by fork + exec also counts
    the RSS of the parent at the fork.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere


def reset_peak_memory(device: torch.device) -> bool:
    """Start :func:`peak_memory_bytes` again from the memory in use now; False where that cannot be done.

    CUDA: ``reset_peak_memory_stats``. CPU (Linux): writing ``5`` to ``/proc/self/clear_refs`` sets ``VmHWM``
    to the current RSS. Elsewhere peak RSS covers the whole process and cannot be reset.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Hand the heap freed so far back to the OS (glibc ``malloc_trim``; nothing elsewhere).

    Evaluation and the gradient probes grow the heap; glibc keeps what they free, so without this the RSS a
    training step starts from, and :func:`reset_peak_memory` resets to, still holds their memory.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> object:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} is invalid: CUDA is not available here; use cpu or auto")
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively on ``device`` (CUDA with bf16 support; the CPU emulates it slowly)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


# -------------------------------------------------------------------------------------------- schedule
class WarmupCosine:
    """Learning-rate factor: linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``.

    A class rather than a closure so that ``LambdaLR.state_dict`` saves it.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------ data
CURRICULUM_START = 0.01  # the share of the easiest examples a paced curriculum starts from


def curriculum_pool(progress: float) -> float:
    """Share of the training examples, easiest first, a paced curriculum draws from at ``progress`` in [0, 1]
    of its batches: linear from :data:`CURRICULUM_START` to 1."""
    return CURRICULUM_START + (1 - CURRICULUM_START) * min(1.0, max(0.0, progress))


class BatchStream:
    """Training batches in a per-epoch order drawn from a generator seeded by ``(seed, epoch)``.

    The position (epoch, batch, supervision step) is all that is needed to resume, since each epoch's
    permutation, and each curriculum batch, is recomputed from the seed. Every batch is handed out ``n_sup``
    times in a row. With ``difficulty`` (one number per example), the first ``curriculum_epochs`` epochs are a
    paced curriculum: batch ``t`` of ``T`` of them is drawn (seeded by ``(seed, epoch, batch)``, without
    replacement) from the easiest ``curriculum_pool(t / T)`` of the examples, a pool that grows linearly from
    :data:`CURRICULUM_START` of them to all; examples of equal difficulty enter the pool in a seeded random order.
    """

    def __init__(self, inputs: np.ndarray, targets: np.ndarray, batch: int, n_sup: int, seed: int,
                 difficulty: np.ndarray | None = None, curriculum_epochs: int = 0) -> None:
        self.inputs, self.targets = torch.from_numpy(inputs), torch.from_numpy(targets)
        self.batch, self.n_sup, self.seed = batch, n_sup, seed
        self.curriculum_epochs = curriculum_epochs if difficulty is not None else 0
        self.batches = len(inputs) // batch
        self.epoch = self.index = self.sup = 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)
        if self.curriculum_epochs:
            # (seed, 0, 0, 0): a key no epoch order (seed, epoch) or curriculum batch (seed, epoch, batch) uses
            shuffled = np.random.default_rng((seed, 0, 0, 0)).permutation(len(inputs))
            self._easiest = shuffled[np.argsort(np.asarray(difficulty)[shuffled], kind="stable")]

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of the training examples used in ``epoch`` (after the curriculum)."""
        if epoch != self._order_epoch:
            self._order = np.random.default_rng((self.seed, epoch)).permutation(len(self.inputs))
            self._order_epoch = epoch
        return self._order

    def rows(self, epoch: int, index: int) -> np.ndarray:
        """The training examples of batch ``index`` of ``epoch``."""
        if epoch >= self.curriculum_epochs:
            return self.order(epoch)[index * self.batch : (index + 1) * self.batch]
        progress = (epoch * self.batches + index) / (self.curriculum_epochs * self.batches)
        pool = max(self.batch, math.ceil(curriculum_pool(progress) * len(self._easiest)))
        picks = np.random.default_rng((self.seed, epoch, index)).choice(pool, self.batch, replace=False)
        return self._easiest[picks]

    def next(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """``(inputs, targets, epoch, sup)`` of the next optimizer step; ``sup == 0`` starts a batch."""
        rows = self.rows(self.epoch, self.index)
        out = self.inputs[rows], self.targets[rows], self.epoch, self.sup
        self.sup += 1
        if self.sup == self.n_sup:
            self.sup, self.index = 0, self.index + 1
            if self.index == self.batches:
                self.index, self.epoch = 0, self.epoch + 1
        return out

    def state_dict(self) -> dict:
        """The data position."""
        return {"epoch": self.epoch, "index": self.index, "sup": self.sup}

    def load_state_dict(self, state: dict) -> None:
        """Restore the data position."""
        self.epoch, self.index, self.sup = state["epoch"], state["index"], state["sup"]


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` atomically: to a temporary file in the same folder, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: object) -> None:
    """Write ``data`` as JSON atomically (temporary file, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; a corrupt or truncated file raises CheckpointError."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError... for damaged files
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {err}); "
            "delete it to start over or resume from another copy"
        ) from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a laser training checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached": cached},
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Trains the task's model (a TRM on mazes, a looped LM on text) with one activation-memory method,
    evaluating and checkpointing on the way.

    >>> trainer = Trainer(train_preset("tiny"))      # doctest: +SKIP
    >>> result = trainer.train()
    >>> result["final"]["solve_rate"], result["trivial_solve_rate"]

    Args:
        cfg: the run's settings (validated already).
        resume: continue from ``cfg.out_dir/checkpoint.pt`` when it exists.
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:
        self.cfg = cfg
        self.parallel = Parallel.setup(cfg.parallel, resolve_device(cfg.device))  # one process unless torchrun
        self.parallel.check_batch(cfg.batch)
        if self.parallel.sharded and cfg.grad_probe_at:
            raise ValueError(f"grad_probe_at={cfg.grad_probe_at} is invalid with parallel=fsdp: the probe needs "
                             "whole parameters; set grad_probe_at=() or use parallel=ddp")
        self.device = self.parallel.device
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else None
        self.autocast_dtype = torch.bfloat16 if cfg.precision == "bf16" and bf16_supported(self.device) else None
        _seed_everything(cfg.seed)

        self.task = tasks.get(cfg.task)
        data = self.task.load(cfg, self.device)
        self.data_summary = data.summary  # the trivial score (and the corpus) for the result
        self.val_inputs, self.val_targets, self.stream = data.val_inputs, data.val_targets, data.stream

        torch.manual_seed(cfg.seed)  # the init is the same for every method of a seed
        self.model = self.task.build_model(cfg.model).to(self.device)
        # model.forward_carry (maze) or the model's own call (text), under DDP or FSDP
        self.forward_step = self.parallel.prepare(self.model, self.task.forward)
        self.method: ActivationMethod = laser.methods.build(cfg.method, self.model, **cfg.method_options)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.betas,
                                     weight_decay=cfg.weight_decay)
        self.total_steps = cfg.total_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, WarmupCosine(cfg.warmup, self.total_steps, cfg.min_lr_ratio)
        )
        self.step = 0
        self.carry: TRMCarry | None = None
        self.history: dict[str, list] = {"train": [], "eval": [], "grad_cosine": [], "step_seconds": [],
                                         "step_cpu_seconds": []}
        self.probe_steps = sorted({max(1, round(f * self.total_steps)) for f in cfg.grad_probe_at})
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.load(self.checkpoint_path)
        if self.out_dir is not None and self.parallel.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
            self._trim_metrics()

    # ------------------------------------------------------------------------------------- bookkeeping
    @property
    def checkpoint_path(self) -> Path | None:
        """Where checkpoints go (None without ``out_dir``)."""
        return self.out_dir / CHECKPOINT_NAME if self.out_dir is not None else None

    def state_dict(self) -> dict:
        """Everything that decides the rest of the run, whatever the number of processes that continue it.

        Collective in a distributed run (every rank calls it): weights and optimizer state are full, the carry
        is the global batch's; the method state is the same on every rank, the RNG states are this rank's.
        """
        gather = self.parallel.gather
        carry = None if self.carry is None else {"y": gather(self.carry.y).cpu(), "z": gather(self.carry.z).cpu()}
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config_to_dict(self.cfg),
            "step": self.step,
            "model": self.parallel.model_state(self.model),
            "optimizer": self.parallel.optimizer_state(self.model, self.opt),
            "scheduler": self.sched.state_dict(),
            "method": self.method.state_dict(),
            "method_seconds": dict(self.method.seconds),
            "rng": _rng_state(),
            "data": self.stream.state_dict(),
            "carry": carry,
            "history": self.history,
        }

    def save(self, path: str | Path | None = None) -> None:
        """Write a checkpoint (default: ``out_dir/checkpoint.pt``); in a distributed run every rank calls it
        and rank 0 writes, atomically, before any rank goes on."""
        path = path or self.checkpoint_path
        if path is None:
            raise ValueError("no checkpoint path: set out_dir or pass a path")
        state = self.state_dict()
        if self.parallel.is_main:
            save_checkpoint(path, state)
        self.parallel.barrier()

    def load(self, path: str | Path) -> None:
        """Continue from a checkpoint saved with the same result-relevant settings."""
        state = load_checkpoint(path)
        saved, mine = result_relevant(state["config"]), result_relevant(config_to_dict(self.cfg))
        differ = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if differ:
            raise CheckpointError(f"checkpoint {path} was saved with other settings {differ}; resume with the "
                                  "same config or start a new run in another out_dir")
        try:
            self.parallel.load_model_state(self.model, state["model"])
            self.parallel.load_optimizer_state(self.model, self.opt, state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.method.load_state_dict(state["method"])
            self.stream.load_state_dict(state["data"])
            _set_rng_state(state["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(f"checkpoint {path} does not fit this run ({type(err).__name__}: {err})") from err
        carry = state["carry"]
        if carry is not None:
            carry = {k: self.parallel.shard(v).to(self.device) for k, v in carry.items()}  # this rank's slice
        self.carry = None if carry is None else TRMCarry(carry["y"], carry["z"])
        self.step = state["step"]
        self.history = state["history"]
        self.method.seconds = dict(state["method_seconds"])

    def _trim_metrics(self) -> None:
        """Drop metric lines past the resumed step (written after the checkpoint by an interrupted run)."""
        path = self.out_dir / METRICS_NAME
        if not path.exists():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= self.step]
        path.write_text("".join(line + "\n" for line in kept))

    def _log(self, record: dict) -> None:
        if self.out_dir is not None and self.parallel.is_main:
            with open(self.out_dir / METRICS_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # --------------------------------------------------------------------------------------- training
    def _loss_normalizer(self, targets: torch.Tensor) -> float | None:
        """The global batch's mean per-rank loss weight when ranks' slices weigh differently, else None.

        With PATH cells weighted, each rank's own weighted mean would divide by its slice's weight: the
        average over ranks would then not be the global weighted mean that one process computes.
        """
        if self.parallel.world == 1:
            return None
        local = self.task.loss_weight(targets, self.cfg.model)
        if local is None:
            return None
        return self.parallel.reduce({"weight": local}, mean=("weight",))["weight"]

    def train_step(self) -> dict:
        """One optimizer step (on mazes one deep-supervision step of the current batch); returns its metrics."""
        inputs, targets, epoch, sup = self.stream.next()  # the global batch
        inputs, targets = self.parallel.shard(inputs).to(self.device), self.parallel.shard(targets).to(self.device)
        if sup == 0:
            self.carry = None
        start, cpu_start = time.perf_counter(), time.process_time()
        normalizer = self._loss_normalizer(targets)
        with self.method, self._autocast():
            self.carry, logits, loss = self.task.step(self.forward_step, self.model, inputs, targets, self.carry,
                                                      normalizer)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.method.step()
        self.sched.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        self.step += 1
        metrics = {
            "step": self.step,
            "epoch": epoch,
            "sup": sup,
            "loss": loss.item(),
            "grad_norm": grad_norm.item(),
            "lr": self.sched.get_last_lr()[0],
            **self.task.train_metrics(logits, targets, loss),
            "step_seconds": seconds,
            "step_cpu_seconds": cpu_seconds,
        }
        return self.parallel.reduce(metrics, mean=self.task.train_means, maximum=("step_seconds", "step_cpu_seconds"))

    @torch.no_grad()
    def evaluate(self, count: int = 0) -> dict:
        """The task's validation metrics over the first ``count`` examples (0: all): on mazes token accuracy
        and solve rate at full n_sup depth, on text bits per byte and next-byte accuracy."""
        self.model.eval()
        try:
            metrics = self.task.evaluate(self.model, self.val_inputs, self.val_targets, count, self._autocast)
        finally:
            self.model.train()
        return {"step": self.step, **metrics}

    def gradient_probe(self, sites: bool = True) -> dict:
        """Cosine between the method's parameter gradients and exact ones on two fixed validation batches.

        ``"model"``: every site the method compresses now, over the whole model; ``"worst_tensor"``: the parameter
        tensor whose gradient is the least faithful (its name and cosine), and ``"sign_agreement"``: the lowest
        fraction of a tensor's coordinates whose gradient has the exact sign (an optimizer like Adam follows every
        tensor alike, so these can matter where the whole-model cosine, dominated by the largest gradients, looks
        fine); ``"sites"`` (when ``sites`` and
        ``cfg.grad_probe_sites``, else empty): one site compressed at a time (the method option
        ``include=(site,)``), a backward pass per site. Each probe is a copy of the method built with the same options
        and loaded with its current state, so the running method is never touched.
        """
        b = self.cfg.grad_probe_batch
        batches = [(self.val_inputs[i * b : (i + 1) * b], self.val_targets[i * b : (i + 1) * b]) for i in range(2)]
        exact = self._gradients(batches, None)
        approx = self._probe_gradients(batches, {})
        worst, signs = least_faithful(approx, exact, self.model)
        out = {"step": self.step, "model": cosine(approx, exact),
               "worst_tensor": {"name": worst.name, "cosine": worst.cosine}, "sign_agreement": signs, "sites": {}}
        if sites and self.cfg.grad_probe_sites:
            compressed = [s.name for s in self.method.report().sites if s.stored_bytes < s.raw_bytes]
            for site in compressed:
                out["sites"][site] = cosine(self._probe_gradients(batches, {"include": (site,)}), exact)
        return out

    def _probe_gradients(self, batches: list, options: dict) -> torch.Tensor:
        probe = laser.methods.build(self.cfg.method, self.model, **{**self.cfg.method_options, **options})
        try:
            state = self.method.state_dict()
            probe.load_state_dict({**state, "config": asdict(probe.config)})
            return self._gradients(batches, probe)
        finally:
            probe.remove()

    def _gradients(self, batches: list, method: ActivationMethod | None) -> torch.Tensor:
        """Flat parameter gradient of the summed task loss of ``batches`` (on mazes the last supervision step
        has grad)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=self.device)
        for batch in batches:
            with method or contextlib.nullcontext(), self._autocast():
                loss = self.task.loss(self.model, batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            total += torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                                for g, p in zip(grads, params, strict=True)])
        return total

    def train(self, until: int | None = None) -> dict:
        """Train to step ``until`` (default: the end), then save a checkpoint; returns :meth:`result`.

        A run stopped early with ``until`` continues exactly where it stopped with ``Trainer(cfg, resume=True)``.
        """
        cfg = self.cfg
        stop = min(self.total_steps, until if until is not None else self.total_steps)
        wall_start = time.perf_counter()
        show = cfg.progress and sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (show and self.parallel.is_main),
                   desc=cfg.method, leave=False)
        while self.step < stop:
            # The step's own peak, not evaluation's or the probes': reset before the step, after keeping the
            # peak so far (the reset forgets it) for the whole run's.
            self.history["process_peak_bytes"] = self._process_peak()
            resettable = reset_peak_memory(self.device)
            metrics = self.train_step()
            if resettable:
                peak = max(self.history.get("step_peak_bytes") or 0, peak_memory_bytes(self.device))
                self.history["step_peak_bytes"] = peak
            self.history["step_seconds"].append(metrics["step_seconds"])
            self.history["step_cpu_seconds"].append(metrics["step_cpu_seconds"])
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                report = self.method.report()
                metrics |= {"stored_bytes": report.stored_bytes, "raw_bytes": report.raw_bytes,
                            "sites": {s.name: {"rank": s.rank, "fidelity": s.fidelity} for s in report.sites}}
                self.history["train"].append({k: v for k, v in metrics.items() if k != "sites"}
                                             | {"ranks": {k: v["rank"] for k, v in metrics["sites"].items()}})
                self._log(metrics)
            evaluated = cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps
            if evaluated:
                evaluation = self.evaluate(cfg.eval_count)
                self.history["eval"].append(evaluation)
                self._log({"eval": evaluation, "step": self.step})
            if self.step in self.probe_steps:
                # Per-site cosines only at the last probe: the report reads them there, and they cost a backward
                # pass per site (13% of a quick LASER run when taken at every probe).
                probe = self.gradient_probe(sites=self.step == self.probe_steps[-1])
                self.history["grad_cosine"].append(probe)
                self._log({"grad_cosine": probe, "step": self.step})
            if evaluated or self.step in self.probe_steps:
                release_freed_memory()  # the next step's peak starts from what training holds, not from theirs
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.out_dir is not None:
                self.save()
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['token_acc']:.3f}", refresh=False)
        bar.close()
        if self.step == self.total_steps and not (self.history["eval"] and self.history["eval"][-1].get("final")):
            evaluation = self.evaluate() | {"final": True}
            self.history["eval"].append(evaluation)
            self._log({"eval": evaluation, "step": self.step})
        self.history["wall_seconds"] = self.history.get("wall_seconds", 0.0) + time.perf_counter() - wall_start
        if self.out_dir is not None:
            self.save()
        return self.result()

    def _process_peak(self) -> int:
        """The peak memory of the whole run so far (what :func:`reset_peak_memory` before each step forgets)."""
        return max(self.history.get("process_peak_bytes") or 0, peak_memory_bytes(self.device))

    def result(self) -> dict:
        """Final metrics, curves, memory, step times and the method's last report, as plain data."""
        evals = self.history["eval"]
        final = evals[-1] if evals and evals[-1].get("final") else None
        seconds, cpu = self.history["step_seconds"], self.history["step_cpu_seconds"]
        report = self.method.report()
        total_seconds = sum(seconds)
        method_seconds = dict(self.method.seconds)
        return {
            "task": self.cfg.task,
            "method": self.cfg.method,
            "method_options": self.cfg.method_options,
            "seed": self.cfg.seed,
            "steps": self.step,
            "total_steps": self.total_steps,
            "final": final,
            **self.data_summary,
            "curves": {"train": self.history["train"], "eval": evals},
            "grad_cosine": self.history["grad_cosine"],
            "activation_bytes": report.stored_bytes,
            "raw_activation_bytes": report.raw_bytes,
            "peak_memory_bytes": self._process_peak(),
            "peak_step_memory_bytes": self.history.get("step_peak_bytes"),
            "median_step_seconds": statistics.median(seconds) if seconds else None,
            "median_step_cpu_seconds": statistics.median(cpu) if cpu else None,
            "total_step_seconds": total_seconds,
            "method_seconds": method_seconds,
            "compression_share": sum(method_seconds.values()) / total_seconds if total_seconds else 0.0,
            "wall_seconds": self.history.get("wall_seconds", 0.0),
            "report": report.to_dict(),
            "device": str(self.device),
            "precision": "bf16" if self.autocast_dtype is not None else "fp32",
        }


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
