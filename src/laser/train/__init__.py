"""Training and comparison of activation-memory methods on a task (mazes, or text: ``TrainConfig.task``):
configs, the tasks, the trainer, the comparison driver.

>>> from laser.train import Trainer, train_preset, apply_overrides
>>> cfg = apply_overrides(train_preset("tiny"), ["method=laser", "method.rank=4"])
>>> result = Trainer(cfg).train()                      # doctest: +SKIP
"""

from laser.train.compare import DEFAULT_METHODS, PAPER_SEEDS, compare, summarize, welch_p_value
from laser.train.config import (
    PRESETS,
    DataConfig,
    MethodSpec,
    TextDataConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    parse_method_spec,
    train_preset,
    valid_keys,
    with_method,
)
from laser.train.trainer import (
    CheckpointError,
    Trainer,
    cosine,
    load_checkpoint,
    peak_memory_bytes,
    save_checkpoint,
    solve_rate,
    token_accuracy,
)

__all__ = [
    "DEFAULT_METHODS",
    "PAPER_SEEDS",
    "PRESETS",
    "CheckpointError",
    "DataConfig",
    "MethodSpec",
    "TextDataConfig",
    "TrainConfig",
    "Trainer",
    "apply_overrides",
    "compare",
    "config_from_dict",
    "config_to_dict",
    "cosine",
    "load_checkpoint",
    "parse_method_spec",
    "peak_memory_bytes",
    "save_checkpoint",
    "solve_rate",
    "summarize",
    "token_accuracy",
    "train_preset",
    "valid_keys",
    "welch_p_value",
    "with_method",
]
