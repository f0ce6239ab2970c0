"""natgrad.linalg: damped solves with PSD matrices, conjugate gradients, Kronecker helpers."""

from natgrad.linalg.cg import CGInfo, cg
from natgrad.linalg.solve import (
    add_damping,
    damped_inverse,
    damped_solve,
    default_eigen_floor,
    psd_eigh,
)

__all__ = [
    "CGInfo",
    "add_damping",
    "cg",
    "damped_inverse",
    "damped_solve",
    "default_eigen_floor",
    "psd_eigh",
]
from natgrad.linalg.kron import *  # noqa: F403  (Kronecker helpers, see kron.__all__)
from natgrad.linalg.matrix_power import inverse_pth_root, psd_matrix_power

__all__ += ["inverse_pth_root", "psd_matrix_power"]
