"""Static (exportable) token-reduction methods, one module each, and their registry.

Contract of a method module `methods/<name>.py` (see docs/method-contract.md):

* a config dataclass holding every option (thresholds, layers, r, capacities) with documented defaults;
* `@register("<name>")` on a builder `(options: dict, model: SegmentationModel) -> nn.Module`; use
  `config_from_options(Config, options)` so unknown or ill-typed options are one clear ValueError;
* the returned module implements the backbone's TokenHook protocol (`after_attention`, `after_block`), may
  implement `decode(decoder, feats, state, grid, image_size)`, and lists the names it adds to
  `state.extras` in `extra_outputs` (always `overflow`: (B,) int32, tokens the capacity could not hold);
  with `expose_decisions=True` it also outputs `decision_<point>` (int32) and `margin_<point>` (float32,
  same shape: how far each decision is from flipping), so that verification is decision-aware;
* `calibrated_options(kept: dict[str, list[int]], quantile: float, options: dict) -> dict`: the options with
  capacities set from the kept-token counts the eager reference measured (used by `staticprune calibrate`);
* optionally `inert_options(self) -> dict[str, str]` on the config: the options that have no effect with the
  config's other values (another mode, an overriding option), each with what to do instead. Giving one of them
  is an error (`config_from_options`), never a silent no-op.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import types
import typing
from typing import Any, Callable

from torch import nn

_BUILDERS: dict[str, Callable[[dict[str, Any], nn.Module], nn.Module]] = {}


def register(name: str):
    def wrap(builder):
        _BUILDERS[name] = builder
        return builder

    return wrap


_BROKEN: dict[str, str] = {}


def _load_all() -> None:
    """Import every method module; one that fails to import is recorded, not allowed to break the others."""
    for info in pkgutil.iter_modules(__path__):
        if info.name in _BROKEN:
            continue
        try:
            importlib.import_module(f"{__name__}.{info.name}")
        except Exception as exc:  # reported when that method is asked for
            _BROKEN[info.name] = f"{type(exc).__name__}: {exc}"


def available_methods() -> list[str]:
    _load_all()
    return sorted(_BUILDERS)


def method_module(name: str):
    _load_all()
    if name in _BROKEN:
        raise ImportError(f"method '{name}' failed to import: {_BROKEN[name]}")
    if name not in _BUILDERS:
        raise ValueError(f"unknown method '{name}'; choose one of: none, {', '.join(sorted(_BUILDERS))}")
    return importlib.import_module(_BUILDERS[name].__module__)


# Methods that keep both prefix tokens of a DeiT-distilled encoder (CLS and distillation token) out of every
# reduction, as ToMe's official code does: ToMe (its matching protects both), and G2TM and LVTP, which reduce only
# the patch tokens after any number of prefix tokens. The others handle one prefix token (or none) and refuse.
DISTILLATION_TOKEN_METHODS = ("g2tm", "lvtp", "tome")


def build_static_method(name: str, options: dict[str, Any], model: nn.Module) -> nn.Module:
    method_module(name)
    backbone = getattr(model, "backbone", None)
    if getattr(backbone, "num_prefix", 0) > 1 and name not in DISTILLATION_TOKEN_METHODS:
        spec_name = getattr(getattr(model, "spec", None), "name", "this model")
        raise ValueError(
            f"method '{name}' cannot protect the two prefix tokens (CLS and distillation token) of the DeiT-distilled "
            f"'{spec_name}'; use --method {', '.join(DISTILLATION_TOKEN_METHODS)} or none, or a segmenter-vit-* model")
    return _BUILDERS[name](dict(options), model)


def exact_options(name: str) -> dict[str, Any]:
    """Options under which method `name` never overflows (every capacity holds the whole sequence): what a parity
    check uses when it must compare every image with the eager reference."""
    return dict(getattr(method_module(name), "EXACT_OPTIONS", {}))


def extra_output_names(points: typing.Iterable[str], expose_decisions: bool) -> tuple[str, ...]:
    """A method's extra graph outputs: `overflow`, then `decision_<point>`, `margin_<point>` per reduction point
    when decisions are exposed (the order verify and the parity report expect)."""
    names = ["overflow"]
    if expose_decisions:
        names += [f"{kind}_{p}" for p in points for kind in ("decision", "margin")]
    return tuple(names)


def quantile_capacity(counts: list[int], quantile: float) -> int:
    """The smallest capacity that holds `quantile` of the observed counts (rounded up, never below 1)."""
    import numpy as np

    return max(1, int(math.ceil(float(np.quantile(np.asarray(counts, dtype=np.float64), quantile)))))


T = typing.TypeVar("T")


def config_from_options(cls: type[T], options: dict[str, Any]) -> T:
    """Build a config dataclass from user options; unknown keys or wrong types -> one-line ValueError."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {cls.__name__}; valid: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in options.items():
        want = hints[key]
        try:
            values[key] = _coerce(value, want)
        except (TypeError, ValueError):
            raise ValueError(f"option {key}={value!r} is not a valid {getattr(want, '__name__', want)}") from None
    cfg = cls(**values)
    given_inert = {k: why for k, why in inert_options(cfg).items() if k in options}
    if given_inert:
        raise ValueError("; ".join(f"option {k}={_shown(options[k])} has no effect: {why}"
                                   for k, why in given_inert.items()))
    return cfg


def inert_options(cfg: Any) -> dict[str, str]:
    """Options of a config that have no effect with its other values (name -> what to do instead)."""
    method = getattr(cfg, "inert_options", None)
    return dict(method()) if method is not None else {}


def _shown(value: Any) -> str:
    """An option value as the user would type it after --opt key=."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def method_config_class(name: str) -> type:
    """The config dataclass of a method (the one `<Name>Config` dataclass its module defines)."""
    module = method_module(name)
    found = [v for v in vars(module).values() if isinstance(v, type) and dataclasses.is_dataclass(v)
             and v.__module__ == module.__name__ and v.__name__.endswith("Config")]
    if len(found) != 1:
        raise LookupError(f"method '{name}' defines {len(found)} config dataclasses, expected 1")
    return found[0]


def effective_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every option of a method with its value (defaults filled in), less those without effect: what a
    calibration file records, so that it stands on its own and reads back to the same module."""
    cfg = config_from_options(method_config_class(name), options)
    inert = inert_options(cfg)
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name in inert:
            continue
        value = options[f.name] if f.name in options else getattr(cfg, f.name)  # given values as given
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def drop_inert_options(name: str, options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Options without the ones that have no effect (for rebuilding a graph exported before they were
    refused: the module is the same without them), and the names dropped."""
    cls = method_config_class(name)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    hints = typing.get_type_hints(cls)
    for key, value in options.items():
        if key in known:
            try:
                values[key] = _coerce(value, hints[key])
            except (TypeError, ValueError):
                pass  # reported by config_from_options when the module is built
    try:
        inert = inert_options(cls(**values))
    except (TypeError, ValueError):
        return dict(options), []
    dropped = [k for k in options if k in inert]
    return {k: v for k, v in options.items() if k not in inert}, dropped


def _coerce(value: Any, want: Any) -> Any:
    origin = typing.get_origin(want)
    args = typing.get_args(want)
    if want is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return bool(value)
    if want in (int, float, str):
        if want is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return want(value)
    if origin in (tuple, list):
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v != ""]
        inner = args[0] if args else Any
        items = [_coerce(v, inner) if inner is not Any and inner is not Ellipsis else v for v in items]
        return tuple(items) if origin is tuple else list(items)
    if origin is typing.Union or origin is types.UnionType:
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except (TypeError, ValueError):
                continue
        raise ValueError(value)
    return value
