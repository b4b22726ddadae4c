"""Every activation-memory method behind one protocol, built by name.

``build(name, model, **options)`` returns an object used as ``with m: ...``, then ``m.step()``,
``m.report()``, ``m.state_dict()``, ``m.load_state_dict()``, ``m.remove()``. Options are the fields of the
method's config; unknown names or bad values fail at once with the valid choices.
"""

from __future__ import annotations

from torch import nn

from laser.config import LaserConfig, NoneConfig, ProjectionConfig, QuantConfig, SiteFilter, field_names
from laser.hooks import ActivationMethod
from laser.methods.laser import Compressor
from laser.methods.oracle import OracleMethod
from laser.methods.quant import QuantMethod
from laser.methods.sketch import SketchMethod
from laser.methods.static import StaticMethod

REGISTRY: dict[str, tuple[type[ActivationMethod], type[SiteFilter]]] = {
    "none": (ActivationMethod, NoneConfig),
    "laser": (Compressor, LaserConfig),
    "quant": (QuantMethod, QuantConfig),
    "static": (StaticMethod, ProjectionConfig),
    "sketch": (SketchMethod, ProjectionConfig),
    "oracle": (OracleMethod, ProjectionConfig),
}


def names() -> list[str]:
    """Names accepted by :func:`build`."""
    return list(REGISTRY)


def make_config(name: str, **options: object) -> SiteFilter:
    """The validated config of method ``name`` with ``options`` (fails before any model is touched)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(REGISTRY)}")
    _, config_type = REGISTRY[name]
    unknown = sorted(set(options) - set(field_names(config_type)))
    if unknown:
        raise ValueError(
            f"method {name!r} has no option(s) {unknown}; valid options: {', '.join(field_names(config_type))}"
        )
    return config_type(**options)


def build(name: str, model: nn.Module, **options: object) -> ActivationMethod:
    """Build method ``name`` on ``model`` with config ``options``."""
    config = make_config(name, **options)
    method_type, _ = REGISTRY[name]
    return method_type(model, config)
