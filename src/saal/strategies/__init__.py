"""Acquisition functions by name, with options: ``build_strategy("saal[score=diff,rho=0.1]")``.

A strategy spec is ``NAME`` or ``NAME[KEY=VALUE,...]``; values are parsed as int, float,
``true``/``false``, ``none`` or kept as strings. Several specs are separated by commas
outside brackets: ``"random,saal[score=diff]"``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

from saal.errors import SaalError
from saal.strategies.base import ScoreStrategy, Selection, Strategy, top_k

# name -> "module:Class"; imported lazily so that a strategy's heavy imports cost nothing until used.
_REGISTRY: dict[str, str] = {
    "random": "saal.strategies.random_sampling:RandomSampling",
    "entropy": "saal.strategies.uncertainty:Entropy",
    "least-confidence": "saal.strategies.uncertainty:LeastConfidence",
    "margin": "saal.strategies.uncertainty:Margin",
    "bald": "saal.strategies.bald:BALD",
    "coreset": "saal.strategies.coreset:CoreSet",
    "badge": "saal.strategies.badge:BADGE",
    "ll4al": "saal.strategies.ll4al:LL4AL",
    "vaal": "saal.strategies.vaal:VAAL",
    "saal": "saal.strategies.saal:SAAL",
    "saal-reference": "saal.strategies.saal:SAALReference",
    "saal-diverse": "saal.strategies.saal_diverse:SAALDiverse",
    "typiclust": "saal.strategies.typiclust:TypiClust",
    "probcover": "saal.strategies.probcover:ProbCover",
    "auto": "saal.strategies.auto:Auto",
    "herding": "saal.strategies.herding:MaxHerding",
    "uherding": "saal.strategies.herding:UncertaintyHerding",
    "saal-herding": "saal.strategies.herding:SAALHerding",
    "det-entropy": "saal.strategies.detection_uncertainty:DetectionEntropy",
    "det-least-confidence": "saal.strategies.detection_uncertainty:DetectionLeastConfidence",
    "det-margin": "saal.strategies.detection_uncertainty:DetectionMargin",
    "det-coreset": "saal.strategies.detection_coreset:DetectionCoreSet",
    "det-loss": "saal.strategies.detection_saal:DetectionLoss",
    "det-saal": "saal.strategies.detection_saal:DetectionSAAL",
    "det-saal-reference": "saal.strategies.detection_saal:DetectionSAALReference",
}
_SPEC = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*(?:\[(.*)\])?\s*$")


def strategy_names() -> list[str]:
    """Return the registered strategy names."""
    return list(_REGISTRY)


def strategies_for(task: str) -> list[str]:
    """Return the registered strategy names that support the task named ``task``."""
    return [n for n in _REGISTRY if task in strategy_class(n).tasks or "*" in strategy_class(n).tasks]


def strategy_class(name: str) -> type[Strategy]:
    """Return the class registered under ``name``.

    Raises:
        SaalError: if the name is unknown.
    """
    if name not in _REGISTRY:
        raise SaalError(f"unknown strategy {name!r}; choose one of {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    found: type[Strategy] = getattr(importlib.import_module(module), cls)
    return found


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"NAME[k=v,...]"`` into the name and its typed options.

    Raises:
        SaalError: if the spec is malformed.
    """
    m = _SPEC.match(spec)
    if not m:
        raise SaalError(f"cannot read strategy {spec!r}; write NAME or NAME[key=value,...], e.g. saal[rho=0.1]")
    name, body = m.group(1), m.group(2)
    options: dict[str, Any] = {}
    for item in (body or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise SaalError(f"strategy option {item.strip()!r} in {spec!r} needs the form key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        options[key.replace("-", "_")] = parse_value(value)
    return name, options


def parse_value(text: str) -> Any:
    """Parse a command-line value: int, float, bool, None, else the string itself."""
    low = text.lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def split_specs(text: str) -> list[str]:
    """Split ``"a,b[x=1,y=2],c"`` at the commas outside brackets."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def strategy_options(name: str) -> dict[str, Any]:
    """Return the options a strategy takes, with their defaults."""
    cls = strategy_class(name)
    options: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass) and klass is not object:
            for p in inspect.signature(vars(klass)["__init__"]).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                    options[p.name] = p.default
    return options


def build_strategy(spec: str | Strategy, **overrides: Any) -> Strategy:
    """Return a strategy from a spec string (or the given instance as it is).

    ``overrides`` (e.g. a shared ``subset``) apply where the spec does not set them.

    Raises:
        SaalError: unknown name or option, or a bad option value.
    """
    if isinstance(spec, Strategy):
        return spec
    name, options = parse_spec(spec)
    cls = strategy_class(name)
    known = strategy_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise SaalError(
            f"strategy {name!r} has no option {unknown[0]!r}; its options are {', '.join(sorted(known)) or 'none'}"
        )
    merged = {k: v for k, v in overrides.items() if k in known and v is not None}
    merged.update(options)
    try:
        return cls(**merged)
    except TypeError as exc:
        raise SaalError(f"bad options for strategy {name!r}: {exc}") from None
    except SaalError as exc:  # a bad option value: say which strategy spec it came from
        raise SaalError(f"strategy {spec.strip()!r}: {exc}") from None


__all__ = [
    "ScoreStrategy",
    "Selection",
    "Strategy",
    "build_strategy",
    "parse_spec",
    "split_specs",
    "strategies_for",
    "strategy_class",
    "strategy_names",
    "strategy_options",
    "top_k",
]
