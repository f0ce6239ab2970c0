"""Whether tensors are finite, decided with as few synchronisations as possible."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["all_finite"]


def all_finite(*tensors: Tensor) -> bool:
    """Whether every entry of every tensor is finite.

    Finite norms prove it (a NaN or an infinity would propagate) with one fused reduction over
    tensors on one device; only an overflowing norm, or tensors on several devices, take the
    exact elementwise check. Integer tensors are finite (and have no norm).

    Parameters
    ----------
    *tensors : Tensor
        Any shapes, dtypes and devices; empty tensors are finite.

    Returns
    -------
    bool
    """
    tensors = tuple(tensor for tensor in tensors if tensor.is_floating_point())
    if not tensors:
        return True
    one_device = len({tensor.device for tensor in tensors}) == 1
    if one_device and bool(torch.stack(torch._foreach_norm(tensors)).isfinite().all()):
        return True
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)
