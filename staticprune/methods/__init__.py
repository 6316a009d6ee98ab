"""Static (exportable) token-reduction methods, one module each, and their registry.

A method module registers a builder with `register("name")`; the builder takes the method options (a dict,
from the command line or a calibrated config file) and the SegmentationModel, and returns an nn.Module that
implements the backbone's TokenHook protocol.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

_BUILDERS: dict[str, Callable[[dict[str, Any], nn.Module], nn.Module]] = {}


def register(name: str):
    def wrap(builder):
        _BUILDERS[name] = builder
        return builder

    return wrap


def _load_all() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def available_methods() -> list[str]:
    _load_all()
    return sorted(_BUILDERS)


def build_static_method(name: str, options: dict[str, Any], model: nn.Module) -> nn.Module:
    _load_all()
    if name not in _BUILDERS:
        raise ValueError(f"unknown method '{name}'; choose one of: none, {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[name](dict(options), model)
