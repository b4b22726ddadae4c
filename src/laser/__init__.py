"""laser: low-rank compression of saved activations for training recursive (looped) models.

>>> import laser
>>> comp = laser.Compressor(model, laser.LaserConfig(rank=128))   # doctest: +SKIP
>>> with comp:
...     loss = loss_fn(model(batch))
>>> loss.backward(); comp.step()
"""

from laser import methods
from laser.budget import Plan, Target, plan
from laser.config import LaserConfig, NoneConfig, ProjectionConfig, QuantConfig, SiteFilter
from laser.hooks import ActivationMethod
from laser.methods.laser import Compressor
from laser.recompute import checkpoint
from laser.report import Report, SiteReport

__all__ = [
    "ActivationMethod",
    "Compressor",
    "LaserConfig",
    "NoneConfig",
    "Plan",
    "ProjectionConfig",
    "QuantConfig",
    "Report",
    "SiteFilter",
    "SiteReport",
    "Target",
    "checkpoint",
    "methods",
    "plan",
]
