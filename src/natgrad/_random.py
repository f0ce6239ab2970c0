"""Where a random draw happens: torch draws with a generator only on that generator's device."""

from __future__ import annotations

import torch
from torch import Tensor


def drawing_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    """The generator's device, or ``like``'s without a generator. natgrad draws there and moves
    the draws to ``like``'s device, so a CPU generator serves tensors on any device, with the
    same draws as on the CPU."""
    return like.device if generator is None else generator.device
