"""natgrad.linalg: damped solves with PSD matrices, conjugate gradients, Kronecker helpers,
and inverse matrix roots."""

from natgrad.linalg.cg import CGInfo, cg
from natgrad.linalg.kron import (
    SymmetricEigen,
    damped_factor_inverses,
    eigenbasis_mv,
    eigenbasis_project,
    eigenbasis_solve,
    factored_damping,
    factored_damping_from_factors,
    factored_solve,
    kron_mv,
    symmetric_eigh,
    symmetric_eigh_batch,
)
from natgrad.linalg.matrix_power import inverse_pth_root, psd_matrix_power
from natgrad.linalg.solve import (
    add_damping,
    damped_inverse,
    damped_solve,
    default_eigen_floor,
    psd_eigh,
)

__all__ = [
    "CGInfo",
    "SymmetricEigen",
    "add_damping",
    "cg",
    "damped_factor_inverses",
    "damped_inverse",
    "damped_solve",
    "default_eigen_floor",
    "eigenbasis_mv",
    "eigenbasis_project",
    "eigenbasis_solve",
    "factored_damping",
    "factored_damping_from_factors",
    "factored_solve",
    "inverse_pth_root",
    "kron_mv",
    "psd_eigh",
    "psd_matrix_power",
    "symmetric_eigh",
    "symmetric_eigh_batch",
]
