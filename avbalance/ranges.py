"""What a setting allows, and one message when a value falls outside it.

Used by the training config (``trainer/config.py``) and by the command-line options, so a
zero batch size or a negative frame rate is refused at once, by name, never minutes later.
``setting`` declares one field of the run config's dataclasses (``trainer/run_config.py``):
its default, a one-line help and what it allows, in one place.
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from avbalance.errors import UserError


@dataclass(frozen=True)
class Allowed:
    """A numeric range (``lo``/``hi``, each closed unless ``*_open``) or a set of ``choices``."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] | None = None
    optional: bool = False  # None (unset) is allowed

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        bounds = []
        if self.lo is not None:
            bounds.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            bounds.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        text = "a number " + " and ".join(bounds) if bounds else "a number"
        return text + (" (or null)" if self.optional else "")

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True

    def check(self, name: str, value: Any) -> None:
        """Raise a UserError naming ``name``, ``value`` and what is allowed."""
        if not self.ok(value):
            raise UserError(f"{name} = {value!r} is not allowed: it must be {self.describe()}")


def arg(kind: Callable[[str], Any], allowed: Allowed) -> Callable[[str], Any]:
    """An argparse ``type=``: parse with ``kind``, then check the range (argparse names the option)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not allowed.ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not allowed: it must be {allowed.describe()}")
        return value

    parse.__name__ = kind.__name__  # argparse's own messages name the type
    return parse


def setting(default: Any, help: str, allowed: Allowed | None = None, *, free_form: bool = False,
            recorded: bool = False) -> Any:
    """A field of a config dataclass: its ``default``, a one-line ``help`` and what it is
    ``allowed`` (checked when a config is read). ``free_form``: a mapping whose keys the YAML
    layer does not check (its constructor does: encoder, fusion, method options). ``recorded``:
    filled in by the program, never set by the user, so neither a YAML key nor a default."""
    meta = {"help": help, "allowed": allowed, "free_form": free_form, "recorded": recorded}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)
