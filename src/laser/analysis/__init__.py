"""The paper's analyses: activation spectra, fidelity, linearity, INT8 statistics, gradients, depth scaling.

Pure math on activation matrices ``(N, D)`` lives in ``spectra``, ``linearity`` and ``stats``; figures in
``plots``. The tools below run models: ``collect`` records saved activations per site (and per recursion
step), ``gradients`` measures gradient fidelity, ``depth`` memory against recursion depth, ``sites`` the
per-site table. ``laser.analysis.analyze`` writes the whole report of a training run (``laser analyze``);
it is not imported here because it depends on the trainer.

>>> from laser.analysis import collect_activations, site_spectra
>>> acts = collect_activations(model, batches, lambda m, b: m(b))      # doctest: +SKIP
>>> site_spectra(acts)["block.mlp:512"].fidelity[(128, 8)]
"""

from laser.analysis.collect import (
    ActivationRecorder,
    SiteSpectrum,
    collect_activations,
    main_sites,
    oracle_fidelity,
    site_spectra,
    spectra_at,
)
from laser.analysis.depth import DepthPoint, DepthScaling, LinearFit, depth_scaling, linear_fit
from laser.analysis.gradients import (
    GradientFidelity,
    MeasuredCompressor,
    SiteGradient,
    gradient_fidelity,
    parameter_gradient,
    rank_sweep,
)
from laser.analysis.sites import SiteRow, format_site_table, site_table

__all__ = [
    "ActivationRecorder",
    "DepthPoint",
    "DepthScaling",
    "GradientFidelity",
    "LinearFit",
    "MeasuredCompressor",
    "SiteGradient",
    "SiteRow",
    "SiteSpectrum",
    "collect_activations",
    "depth_scaling",
    "format_site_table",
    "gradient_fidelity",
    "linear_fit",
    "main_sites",
    "oracle_fidelity",
    "parameter_gradient",
    "rank_sweep",
    "site_spectra",
    "site_table",
    "spectra_at",
]
