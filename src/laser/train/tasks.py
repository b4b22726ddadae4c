"""Tasks: what a run trains on, chosen by ``TrainConfig.task``, and everything about it the loop must not know.

A task owns its model, its data, its loss and its metrics; the trainer, the comparison and the analyses ask it
and never branch on the task themselves:

* ``"maze"``: the TRM on procedural mazes (:mod:`laser.data.maze`), deep supervision with a carry; metrics
  token accuracy and solve rate (higher is better), against the copy-the-input rate.
* ``"text"``: the looped byte LM (:mod:`laser.models.looped_lm`) on the standard library's source
  (:mod:`laser.data.text`); metrics validation bits per byte (lower is better) and next-byte accuracy,
  against the unigram (context-free) bits per byte.

>>> task = TASKS["text"]
>>> task.metric.key, task.metric.higher_is_better
('bits_per_byte', False)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from laser.data import maze, text
from laser.models import looped_lm, trm

AutocastFactory = Callable[[], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class Metric:
    """A task's headline validation metric, as the comparison reports and tests it.

    Attributes:
        key: its key in evaluations and results (``"solve_rate"``, ``"bits_per_byte"``).
        name: in words (``"solve rate"``).
        higher_is_better: the direction a better method moves it.
        percent: shown as a percentage of 1 (else as a plain number with ``digits`` decimals).
        digits: decimals shown.
        unit: how a difference of it is written (``"points"``: percentage points; ``"bits"``).
        trivial_key: result key of the trivial model's score (``"trivial_solve_rate"``).
        trivial_name: what that trivial model is, in words.
    """

    key: str
    name: str
    higher_is_better: bool
    percent: bool
    digits: int
    unit: str
    trivial_key: str
    trivial_name: str

    def show(self, value: float) -> str:
        """A value of the metric as the reports write it."""
        return f"{100 * value:.{self.digits}f}%" if self.percent else f"{value:.{self.digits}f}"

    def difference(self, value: float) -> str:
        """A difference of the metric in its unit (``12.5 points``, ``0.0123 bits``)."""
        return f"{100 * value:.1f} points" if self.percent else f"{value:.4f} bits"


SOLVE_RATE = Metric("solve_rate", "solve rate", True, True, 1, "points", "trivial_solve_rate",
                    "a model that copies its input grid")
BITS_PER_BYTE = Metric("bits_per_byte", "bits per byte", False, False, 4, "bits", "trivial_bits_per_byte",
                       "the training bytes' unigram frequencies, no context")
TOKEN_ACC = "token_acc"


@dataclass
class TaskData:
    """A task's data for one run: the training stream and the validation set on the run's device.

    Attributes:
        stream: training batches (``next()``, ``state_dict()``, ``load_state_dict()``).
        val_inputs, val_targets: validation tensors, one example per row.
        summary: plain data for the run's result (the trivial score, the corpus hash, ...).
    """

    stream: object
    val_inputs: Tensor
    val_targets: Tensor
    summary: dict = field(default_factory=dict)


class WindowStream:
    """Training windows of a byte stream at random offsets, drawn from a generator seeded by ``(seed, step)``.

    Stateless apart from the step counter, so resuming needs only the step; ``epoch`` counts passes over the
    stream's bytes (a window of ``seq_len`` predicted bytes each). Same protocol as the maze's ``BatchStream``.
    """

    def __init__(self, stream: np.ndarray, seq_len: int, batch: int, seed: int) -> None:
        if len(stream) <= seq_len + 1:
            raise ValueError(f"a training stream of {len(stream)} bytes is too short for seq_len={seq_len}")
        self.data, self.seq_len, self.batch, self.seed = stream, seq_len, batch, seed
        self.step = 0

    def next(self) -> tuple[Tensor, Tensor, int, int]:
        """``(inputs, targets, epoch, sup)`` of the next optimizer step; ``sup`` is always 0 (no carry)."""
        rng = np.random.default_rng((self.seed, self.step))
        inputs, targets = text.random_windows(self.data, self.seq_len, self.batch, rng)
        epoch = self.step * self.batch * self.seq_len // len(self.data)
        self.step += 1
        return torch.from_numpy(inputs), torch.from_numpy(targets), epoch, 0

    def state_dict(self) -> dict:
        """The data position."""
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Restore the data position."""
        self.step = state["step"]


# ------------------------------------------------------------------------------------------------ maze
class MazeTask:
    """The TRM on mazes: one optimizer step is one deep-supervision step, continuing the detached carry."""

    name = "maze"
    model_type = trm.TRMConfig
    derived_model_keys = ("seq_len", "vocab")
    forward = "forward_carry"
    metric = SOLVE_RATE
    train_means = ("loss", "token_acc", "solve_rate")
    examples = "mazes"  # what one validation row is, in words
    depth_words = "n L-cycles (H-cycles 1, one supervision step)"  # what ``depth(n)`` unrolls

    def derive_model(self, model_cfg: trm.TRMConfig, data_cfg: object) -> trm.TRMConfig:
        """The model reads mazes of the data's size, in the maze vocabulary."""
        import dataclasses

        return dataclasses.replace(model_cfg, seq_len=data_cfg.size**2, vocab=maze.VOCAB_SIZE)

    def depth(self, n: int) -> dict:
        """Model changes that unroll the recursion ``n`` steps (one cycle, one supervision step)."""
        return {"L_cycles": n, "H_cycles": 1, "n_sup": 1}

    def build_model(self, model_cfg: trm.TRMConfig) -> trm.TRM:
        """A fresh TRM."""
        return trm.TRM(model_cfg)

    def load(self, cfg: object, device: torch.device) -> TaskData:
        """The maze split (from the cache when present) and the training order."""
        from laser.train.trainer import BatchStream

        d = cfg.data
        split = maze.load_split(d.size, d.count, d.val_count, d.seed, d.min_path, d.cache_dir)
        split = maze.add_training_mazes(split, d.extra_train, d.min_path)
        path_cells = (split.train_targets == maze.PATH).sum(axis=1)  # the curriculum's difficulty
        stream = BatchStream(split.train_inputs, split.train_targets, cfg.batch, cfg.model.n_sup, cfg.seed,
                             path_cells, d.curriculum_epochs)
        trivial = maze.trivial_solve_rate(split.val_inputs, split.val_targets)
        return TaskData(stream, torch.from_numpy(split.val_inputs).to(device),
                        torch.from_numpy(split.val_targets).to(device), {"trivial_solve_rate": trivial})

    def loss_weight(self, targets: Tensor, model_cfg: trm.TRMConfig) -> float | None:
        """This slice's summed loss weight when PATH cells weigh more (ranks' slices then weigh differently)."""
        if model_cfg.path_weight == 1.0:
            return None
        return float(trm.token_weights(targets, model_cfg.path_weight).sum())

    def step(self, forward: Callable, model: trm.TRM, inputs: Tensor, targets: Tensor, carry: object,
             normalizer: float | None) -> tuple[object, Tensor, Tensor]:
        """One supervision step: ``(new carry, logits, loss)``."""
        carry, logits, halt_logits = forward(inputs, carry)
        return carry, logits, model.loss(logits, targets, halt_logits, normalizer)

    def loss(self, model: trm.TRM, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The training loss of one batch: ``n_sup - 1`` supervision steps without grad, the last with it."""
        inputs, targets = batch
        carry = None
        with torch.no_grad():
            for _ in range(model.cfg.n_sup - 1):
                carry, _, _ = model.forward_carry(inputs, carry)
        _, logits, halt_logits = model.forward_carry(inputs, carry)
        return model.loss(logits, targets, halt_logits)

    def train_metrics(self, logits: Tensor, targets: Tensor, loss: Tensor) -> dict:
        """Token accuracy and solve rate of a training step's predictions."""
        from laser.train.trainer import solve_rate, token_accuracy

        predictions = logits.detach().argmax(-1)
        return {"token_acc": token_accuracy(predictions, targets), "solve_rate": solve_rate(predictions, targets)}

    @torch.no_grad()
    def evaluate(self, model: trm.TRM, inputs: Tensor, targets: Tensor, count: int, autocast: AutocastFactory,
                 batch: int = 256) -> dict:
        """Token accuracy and solve rate over the first ``count`` mazes (0: all), full n_sup depth."""
        from laser.train.trainer import solve_rate, token_accuracy

        n = count or len(inputs)
        predictions = []
        for i in range(0, n, batch):
            with autocast():
                predictions.append(model(inputs[i : min(n, i + batch)]).argmax(-1))
        predictions = torch.cat(predictions)
        return {"token_acc": token_accuracy(predictions, targets[:n]),
                "solve_rate": solve_rate(predictions, targets[:n]), "count": n}

    def final_line(self, result: dict) -> str:
        """The final validation metrics in words."""
        final = result["final"]
        return (f"val token acc {100 * final['token_acc']:.2f}%, solve rate {100 * final['solve_rate']:.1f}% "
                f"(trivial {100 * result['trivial_solve_rate']:.1f}%)")

    def final_words(self, final: dict) -> str:
        """An evaluation's metrics in words."""
        return f"token accuracy {100 * final['token_acc']:.2f}%, solve rate {100 * final['solve_rate']:.1f}%"

    def trivial_words(self, summary: dict) -> str:
        """The trivial model's score (``TaskData.summary``) in words."""
        return (f"a model that copies its input grid solves {100 * summary['trivial_solve_rate']:.1f}% of these "
                "mazes (the trivial rate)")

    def describe_model(self, model_cfg: trm.TRMConfig) -> str:
        """The model's shape in words."""
        return (f"TRM hidden {model_cfg.hidden}, {model_cfg.L_cycles} L-cycles x {model_cfg.H_cycles} H-cycles, "
                f"{model_cfg.n_sup} supervision steps")


# ------------------------------------------------------------------------------------------------ text
class TextTask:
    """The looped byte LM on the standard library's source: next-byte prediction over random windows."""

    name = "text"
    model_type = looped_lm.LoopedLMConfig
    derived_model_keys = ("vocab",)
    forward = "__call__"  # through the module's hooks, so what the model itself saves is named by it
    metric = BITS_PER_BYTE
    train_means = ("loss", "token_acc", "bits_per_byte")
    examples = "byte windows"
    depth_words = "n loops of the block stack"

    def derive_model(self, model_cfg: looped_lm.LoopedLMConfig, data_cfg: object) -> looped_lm.LoopedLMConfig:
        """The model reads bytes."""
        import dataclasses

        return dataclasses.replace(model_cfg, vocab=text.VOCAB_SIZE)

    def depth(self, n: int) -> dict:
        """Model changes that unroll the block stack ``n`` times."""
        return {"loops": n}

    def build_model(self, model_cfg: looped_lm.LoopedLMConfig) -> looped_lm.LoopedLM:
        """A fresh looped LM."""
        return looped_lm.LoopedLM(model_cfg)

    def load(self, cfg: object, device: torch.device) -> TaskData:
        """The corpus split, random training windows and the first ``data.val_windows`` validation windows."""
        d, seq_len = cfg.data, cfg.model.seq_len
        split = text.load_split(d.max_bytes, d.val_fraction, d.cache_dir)
        val_inputs, val_targets = text.windows(split.val, seq_len, d.val_windows)
        needed = 2 * cfg.grad_probe_batch if cfg.grad_probe_at else 1
        if len(val_inputs) < needed:
            raise ValueError(f"grad_probe_batch={cfg.grad_probe_batch} is invalid: two probe batches need {needed} "
                             f"validation windows, the split has {len(val_inputs)}; lower it or raise data.max_bytes")
        summary = {"trivial_bits_per_byte": text.unigram_bits_per_byte(split.train, split.val),
                   "corpus": split.describe()}
        return TaskData(WindowStream(split.train, seq_len, cfg.batch, cfg.seed),
                        torch.from_numpy(val_inputs).to(device), torch.from_numpy(val_targets).to(device), summary)

    def loss_weight(self, targets: Tensor, model_cfg: looped_lm.LoopedLMConfig) -> None:
        """Every byte weighs 1 and every rank's slice has the same size: the mean of means is the mean."""
        return None

    def step(self, forward: Callable, model: looped_lm.LoopedLM, inputs: Tensor, targets: Tensor, carry: object,
             normalizer: float | None) -> tuple[None, Tensor, Tensor]:
        """One step: ``(None, logits, loss)`` (no carry)."""
        logits = forward(inputs)
        return None, logits, model.loss(logits, targets)

    def loss(self, model: looped_lm.LoopedLM, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The training loss of one batch."""
        inputs, targets = batch
        return model.loss(model(inputs), targets)

    def train_metrics(self, logits: Tensor, targets: Tensor, loss: Tensor) -> dict:
        """Next-byte accuracy and bits per byte of a training step."""
        from laser.train.trainer import token_accuracy

        return {"token_acc": token_accuracy(logits.detach().argmax(-1), targets),
                "bits_per_byte": loss.item() / math.log(2)}

    @torch.no_grad()
    def evaluate(self, model: looped_lm.LoopedLM, inputs: Tensor, targets: Tensor, count: int,
                 autocast: AutocastFactory, batch: int = 128) -> dict:
        """Bits per byte and next-byte accuracy over the first ``count`` windows (0: all)."""
        n = count or len(inputs)
        nats, correct = 0.0, 0
        for i in range(0, n, batch):
            with autocast():
                logits = model(inputs[i : min(n, i + batch)])  # (b, L, 256)
            chunk = targets[i : min(n, i + batch)]
            nats += F.cross_entropy(logits.float().flatten(0, 1), chunk.flatten(), reduction="sum").item()
            correct += int((logits.argmax(-1) == chunk).sum())
        predicted = n * targets.shape[1]
        return {"bits_per_byte": nats / predicted / math.log(2), "token_acc": correct / predicted, "count": n}

    def final_line(self, result: dict) -> str:
        """The final validation metrics in words."""
        final = result["final"]
        return (f"val bits per byte {final['bits_per_byte']:.4f} (unigram {result['trivial_bits_per_byte']:.4f}), "
                f"next-byte accuracy {100 * final['token_acc']:.2f}%")

    def final_words(self, final: dict) -> str:
        """An evaluation's metrics in words."""
        return f"bits per byte {final['bits_per_byte']:.4f}, next-byte accuracy {100 * final['token_acc']:.2f}%"

    def trivial_words(self, summary: dict) -> str:
        """The trivial model's score (``TaskData.summary``) and the corpus, in words."""
        corpus = summary["corpus"]
        return (f"the training bytes' unigram frequencies score {summary['trivial_bits_per_byte']:.4f} bits per byte "
                f"(the trivial rate); corpus: {corpus['train_files']} training and {corpus['val_files']} validation "
                f"files of the Python {corpus['python']} standard library, SHA-256 `{corpus['content_hash']}`")

    def describe_model(self, model_cfg: looped_lm.LoopedLMConfig) -> str:
        """The model's shape in words."""
        return (f"looped LM hidden {model_cfg.hidden}, {model_cfg.layers} block(s) x {model_cfg.loops} loops, "
                f"context {model_cfg.seq_len} bytes")


TASKS: dict[str, MazeTask | TextTask] = {"maze": MazeTask(), "text": TextTask()}


def get(name: str) -> MazeTask | TextTask:
    """The task of that name (ValueError listing the tasks)."""
    if name not in TASKS:
        raise ValueError(f"task={name!r} is invalid: use one of {', '.join(TASKS)}")
    return TASKS[name]


def metric_of(results: dict) -> Metric:
    """The headline metric of a comparison's results (entries without a ``metric`` key are maze entries)."""
    key = next(iter(results.values())).get("metric", SOLVE_RATE.key) if results else SOLVE_RATE.key
    return next(task.metric for task in TASKS.values() if task.metric.key == key)
