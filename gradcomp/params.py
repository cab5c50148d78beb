"""Typed, range-checked parameters for compressors, memories and sync policies."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any


def check_seed(seed, where: str = "seed") -> int:
    """`seed` as an int: an integer (Python or numpy) or a string of one; bool and anything else raise."""
    if isinstance(seed, bool) or not isinstance(seed, (numbers.Integral, str)):
        raise ValueError(f"{where}={seed!r} is not valid; expected an int, e.g. {where}=0 (every rank the same)")
    try:
        return int(seed)
    except ValueError:
        raise ValueError(f"{where}={seed!r} is not valid; expected an int, e.g. {where}=0 (every rank the same)") \
            from None


@dataclass(frozen=True)
class Param:
    """One constructor parameter: type, default, allowed range or choices, and a one-line doc."""
    type: type
    default: Any
    doc: str = ""
    lo: float | None = None          # lower bound
    hi: float | None = None          # upper bound
    lo_open: bool = False            # exclude lo
    hi_open: bool = False            # exclude hi
    choices: tuple | None = None

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.type is bool:
            return "true or false"
        parts = [self.type.__name__]
        if self.lo is not None or self.hi is not None:
            lo = "-inf" if self.lo is None else f"{self.lo:g}"
            hi = "inf" if self.hi is None else f"{self.hi:g}"      # unbounded ends are open: inf is not valid
            parts.append(f"in {'(' if self.lo_open or self.lo is None else '['}{lo}, "
                         f"{hi}{')' if self.hi_open or self.hi is None else ']'}")
        return " ".join(parts)

    def check(self, owner: str, name: str, value):
        """Convert `value` (maybe a string from a spec) and range-check it; ValueError if bad."""
        v = value
        try:
            if self.type is bool:
                if isinstance(v, str):
                    lv = v.strip().lower()
                    if lv not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError
                    v = lv in ("1", "true", "yes", "on")
                elif isinstance(v, bool) or v in (0, 1):
                    v = bool(v)
                else:
                    raise ValueError
            elif self.type is int:
                if isinstance(v, float) and not v.is_integer():
                    raise ValueError
                if isinstance(v, str):
                    f = float(v.strip())
                    if not f.is_integer():
                        raise ValueError
                    v = int(f)
                elif isinstance(v, bool):
                    raise ValueError
                else:
                    v = int(v)
            elif self.type is float:
                if isinstance(v, bool):
                    raise ValueError
                v = float(v)
                if not math.isfinite(v):          # inf/nan: never a meaningful setting
                    raise ValueError(f"{owner}: parameter {name}={value!r} is not valid; expected a finite "
                                     f"{self.describe()}")
            else:
                v = self.type(v)
        except (TypeError, ValueError) as e:
            if str(e).startswith(owner):
                raise
            raise ValueError(f"{owner}: parameter {name}={value!r} is not valid; expected {self.describe()}") from None
        if self.choices and v not in self.choices:
            raise ValueError(f"{owner}: parameter {name}={v!r} is not valid; expected {self.describe()}")
        bad = ((self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)))
               or (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi))))
        if bad:
            raise ValueError(f"{owner}: parameter {name}={v!r} is out of range; expected {self.describe()}")
        return v


class Configurable:
    """Base for registered algorithms: `params` declares the parameters; values land as attributes."""

    kind = "algorithm"
    name = "?"
    params: dict[str, Param] = {}

    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - set(self.params))
        if unknown:
            valid = ", ".join(f"{k} ({p.describe()})" for k, p in self.params.items()) or "none"
            raise ValueError(f"{self.kind} {self.name!r}: unknown parameter(s) {', '.join(unknown)}; "
                             f"valid parameters: {valid}")
        self.config = {}
        for k, p in self.params.items():
            v = p.check(f"{self.kind} {self.name!r}", k, kwargs[k]) if k in kwargs else p.default
            self.config[k] = v
            setattr(self, k, v)
        self.validate()

    def validate(self):
        """Cross-parameter checks; raise ValueError."""

    def spec(self) -> str:
        """Canonical spec string, e.g. 'topk:ratio=0.001,mode=exact'."""
        if not self.config:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.config.items())

    def __repr__(self):
        return f"<{self.kind} {self.spec()}>"
