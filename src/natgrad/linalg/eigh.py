"""``torch.linalg.eigh`` placed where it is fast and accurate: small matrices on a GPU are
decomposed on the CPU.

On CUDA, torch decomposes matrices of fewer than about 512 rows by a method that is less
accurate than LAPACK's and, up to a few hundred rows, slower than a round trip to the CPU: on
an H100 (torch 2.11, CUDA 13), float32 SPD matrices of 9 to 257 rows took 1.1–4.6× the time of
copying them to the CPU, decomposing them there (one thread) and copying the values and vectors
back; from 33 to 449 rows its eigenvector residuals ``‖A V − V Λ‖ / ‖A‖`` were 5e-6 to 2e-4,
against 5e-7 to 1e-6 on the CPU (at 385–449 rows it was 1.2–1.4× faster than the round trip).
From 513 rows on, the GPU was 4–13× faster at CPU accuracy (``benchmarks/eigh_device.py``,
BENCHMARKS.md). Kronecker factors of K-FAC and EKFAC and Shampoo's preconditioner blocks are
mostly of the small kind.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CPU_EIGH_MAX_SIZE", "eigh"]

CPU_EIGH_MAX_SIZE = 512
"""Largest matrix size that :func:`eigh` decomposes on the CPU when the matrix lives on a CUDA
device (measured: the GPU less accurate up to 449 rows, faster and as accurate from 513)."""


def eigh(matrices: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh(matrices)``, on the CPU for CUDA matrices of at most
    :data:`CPU_EIGH_MAX_SIZE` rows; the results live on the input's device.

    Parameters
    ----------
    matrices : Tensor of shape (..., d, d)
        Symmetric (only the lower triangle is read, as by ``torch.linalg.eigh``).

    Returns
    -------
    eigenvalues : Tensor of shape (..., d), ascending
    eigenvectors : Tensor of shape (..., d, d), orthonormal columns
    """
    if matrices.device.type != "cuda" or matrices.shape[-1] > CPU_EIGH_MAX_SIZE:
        return torch.linalg.eigh(matrices)
    values, vectors = torch.linalg.eigh(matrices.cpu())
    return values.to(matrices.device), vectors.to(matrices.device)
