"""Integer checks for host-side sizes, with errors that say what to do.

Pure Python on purpose (no NumPy, no JAX): values may be Python ints, NumPy scalars or
0-d arrays, or JAX scalars; all of them implement ``__index__`` (integers) or
``__float__`` (floats), which is all these checks use.
"""

from __future__ import annotations

import math
import operator
from typing import Any


def as_int(name: str, value: Any, *, minimum: int, hint: str = "") -> int:
    """``value`` as a Python int >= ``minimum``; a TypeError/ValueError naming it otherwise.

    Integer types (Python, NumPy, JAX) are accepted as they are; floats only when they
    hold a whole number (``32.0``), since a fractional size is always a mistake.
    """
    # NumPy and JAX booleans too: float(True) would pass for 1.
    is_bool = isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", "") == "b"
    if is_bool or isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}. {hint}".rstrip())
    shape = getattr(value, "shape", ())
    if shape != ():
        raise TypeError(
            f"{name} must be a scalar integer >= {minimum}, got an array of shape {shape}. "
            "Pass one number (for example int(x) or x.item())."
        )
    try:
        number = operator.index(value)
    except TypeError:
        number = _whole_float(name, value, minimum)
    if number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {number}. {hint}".rstrip())
    return number


def _whole_float(name: str, value: Any, minimum: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be an integer >= {minimum}, got {value!r} of type {type(value).__name__}."
        ) from None
    if not math.isfinite(number):
        raise ValueError(
            f"{name} must be a finite integer >= {minimum}, got {number}. A non-finite "
            "batch size usually means the rule that computed it divided by zero (for "
            "example a zero gradient or loss); check the statistics that produced it."
        )
    if not number.is_integer():
        raise ValueError(
            f"{name} must be a whole number, got {number}. Round it first (for example "
            "math.ceil), or make the rule return an integer."
        )
    return int(number)


def state_int(state: dict[str, Any], key: str, *, minimum: int, owner: str) -> int:
    """``state[key]`` as an int >= ``minimum``, or a ValueError about the state dict.

    A saved position is written by ``state_dict()``, never computed by the user, so a
    bad value means a damaged or hand-edited dict, not a rule to fix.
    """
    value = state[key]
    try:
        return as_int(f"state[{key!r}]", value, minimum=minimum)
    except (TypeError, ValueError):
        raise ValueError(
            f"state[{key!r}]={value!r} is not a whole number >= {minimum}, so this is not a "
            f"dict that {owner}.state_dict() wrote (or it was edited since). Pass the dict "
            "state_dict() returned, unchanged."
        ) from None


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple
