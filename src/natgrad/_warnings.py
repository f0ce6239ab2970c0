"""Warnings attributed to the user's line, however deep inside natgrad they are raised.

A fixed ``stacklevel`` names the wrong line as soon as the depth of the call varies: a subclass
constructor adds a frame (``EKFAC(...)`` calls ``KFAC.__init__``), and so does another natgrad
object calling the method for the user (``QuadraticModelOptimizer.step`` calls
``KFAC.step``).
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

__all__ = ["warn_at_caller"]


def _package_directories(module_file: str) -> tuple[str, ...]:
    directory = os.path.dirname(module_file)
    return tuple({directory + os.sep, os.path.realpath(directory) + os.sep})


_INTERNAL = _package_directories(__file__) + _package_directories(torch.__file__)
"""natgrad's and torch's directories (torch's decorators, such as ``torch.no_grad``, wrap
natgrad's methods)."""


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn(message, category)`` at the first caller outside natgrad and torch."""
    frame = sys._getframe(1)
    level = 2  # the caller of this function
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
