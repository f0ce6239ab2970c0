"""Checks of scalar options (step sizes, decays, counts, choices) at the public boundary.

Every check takes the option's ``name`` and its ``value``, returns the value converted to a
Python ``float`` or ``int``, and raises with a message that names the option and shows the
offending value with ``repr``:

- ``TypeError`` when the value is not of the right kind: not a real number (``numbers.Real``:
  Python and NumPy ints and floats) or, for counts, not an integer (``numbers.Integral``).
  ``bool`` is refused everywhere (``True`` is not a step size), and so are tensors: pass
  ``float(t)``.
- ``ValueError`` when the value is of the right kind but out of range, NaN or infinite.

Valid values pass unchanged but for that conversion (``np.float32(0.5)`` becomes ``0.5``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Collection, Hashable, Iterable
from typing import Literal, TypeVar, overload

_Choice = TypeVar("_Choice")


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number (``numbers.Real``: Python and NumPy), not a ``bool``:
    the kind :func:`real_number` accepts, for callers that raise errors of their own."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: object) -> bool:
    """Whether ``value`` is an integer (``numbers.Integral``: Python and NumPy), not a ``bool``:
    the kind :func:`integer` accepts."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def real_number(name: str, value: object) -> float:
    """``value`` as a Python ``float``; any real number, NaN and infinities included.

    Raises
    ------
    TypeError
        If ``value`` is a ``bool`` or not a ``numbers.Real``.
    """
    if not is_real(value):
        raise TypeError(
            f"{name} must be a real number, got {value!r} of type {type(value).__name__}"
        )
    return float(value)


def _checked_float(
    name: str, value: object, valid: Callable[[float], bool], description: str
) -> float:
    """``value`` as float if ``valid`` (which must be false for NaN) accepts it."""
    number = real_number(name, value)
    if not valid(number):
        raise ValueError(f"{name} must be {description}, got {value!r}")
    return number


def finite_float(name: str, value: object) -> float:
    """A finite real number (not NaN, not ±inf), as ``float``.

    Raises
    ------
    TypeError
        If ``value`` is not a real number (see :func:`real_number`).
    ValueError
        If ``value`` is NaN or infinite.
    """
    return _checked_float(name, value, math.isfinite, "a finite number")


@overload
def positive_float(name: str, value: object, *, allow_none: Literal[False] = False) -> float: ...


@overload
def positive_float(name: str, value: object, *, allow_none: bool) -> float | None: ...


def positive_float(name: str, value: object, *, allow_none: bool = False) -> float | None:
    """A finite real number ``> 0``, as ``float``; ``None`` passes through if ``allow_none``.

    Raises
    ------
    TypeError
        If ``value`` is not a real number (nor ``None`` with ``allow_none``).
    ValueError
        If ``value`` is ``<= 0``, NaN or infinite.
    """
    if allow_none and value is None:
        return None
    description = "a positive finite number" + (" or None" if allow_none else "")
    return _checked_float(name, value, lambda v: math.isfinite(v) and v > 0.0, description)


def nonnegative_float(name: str, value: object) -> float:
    """A finite real number ``>= 0``, as ``float``.

    Raises
    ------
    TypeError
        If ``value`` is not a real number.
    ValueError
        If ``value`` is negative, NaN or infinite.
    """
    return _checked_float(
        name, value, lambda v: math.isfinite(v) and v >= 0.0, "a non-negative finite number"
    )


def unit_interval(
    name: str, value: object, *, closed_left: bool = True, closed_right: bool = False
) -> float:
    """A real number in the unit interval, ``[0, 1)`` by default, as ``float``.

    Parameters
    ----------
    name : str
        The option's name, for the message.
    value : object
        The value to check.
    closed_left, closed_right : bool
        Whether ``0`` and ``1`` belong to the interval: ``[0, 1)`` suits momenta and decays,
        ``(0, 1]`` a second-moment ``beta2``, ``[0, 1]`` a discount, ``(0, 1)`` a
        backtracking ratio.

    Raises
    ------
    TypeError
        If ``value`` is not a real number.
    ValueError
        If ``value`` is outside the interval or NaN.
    """
    interval = f"{'[' if closed_left else '('}0, 1{']' if closed_right else ')'}"

    def inside(number: float) -> bool:
        above = number >= 0.0 if closed_left else number > 0.0
        below = number <= 1.0 if closed_right else number < 1.0
        return above and below

    return _checked_float(name, value, inside, f"a number in {interval}")


def unit_interval_pair(name: str, value: object) -> tuple[float, float]:
    """Two numbers in ``[0, 1)`` (Adam-style ``betas``), as a tuple of floats.

    Raises
    ------
    TypeError
        If ``value`` is a string or not iterable, or an entry is not a real number.
    ValueError
        If ``value`` does not hold exactly two entries, or an entry is outside ``[0, 1)``;
        the message names the entry as ``name[i]``.
    """
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a pair of numbers in [0, 1), got {value!r}")
    entries = tuple(value)
    if len(entries) != 2:
        raise ValueError(f"{name} must be a pair of numbers in [0, 1), got {value!r}")
    first, second = (unit_interval(f"{name}[{i}]", entry) for i, entry in enumerate(entries))
    return first, second


def integer(name: str, value: object) -> int:
    """``value`` as a Python ``int``; any integer (``numbers.Integral``) but a ``bool``.

    Raises
    ------
    TypeError
        If ``value`` is a ``bool`` or not an integer (``2.0`` is not one).
    """
    if not is_integer(value):
        raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}")
    return int(value)


def int_at_least(name: str, value: object, minimum: int) -> int:
    """An integer ``>= minimum``, as ``int``.

    Raises
    ------
    TypeError
        If ``value`` is not an integer (see :func:`integer`).
    ValueError
        If ``value < minimum``.
    """
    return _bounded_int(name, value, minimum, f"an integer >= {minimum}")


def positive_int(name: str, value: object) -> int:
    """An integer ``>= 1``, as ``int``; raises as :func:`int_at_least`."""
    return _bounded_int(name, value, 1, "a positive integer")


def nonnegative_int(name: str, value: object) -> int:
    """An integer ``>= 0``, as ``int``; raises as :func:`int_at_least`."""
    return _bounded_int(name, value, 0, "a non-negative integer")


def _bounded_int(name: str, value: object, minimum: int, description: str) -> int:
    number = integer(name, value)
    if number < minimum:
        raise ValueError(f"{name} must be {description}, got {value!r}")
    return number


def one_of(name: str, value: _Choice, choices: Collection[_Choice]) -> _Choice:
    """``value`` itself, if it is one of ``choices`` (compared by hash and equality).

    Raises
    ------
    ValueError
        If ``value`` is not among ``choices`` (an unhashable value never is).
    """
    if not (isinstance(value, Hashable) and value in frozenset(choices)):
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
