"""natgrad.models: scikit-learn estimators built on the curvature and optim layers.

- :class:`PNMF`: probabilistic Poisson NMF with standard (Adam) or natural-gradient VI, and
  :func:`fit_pnmf_data_parallel` for data parallelism over samples with ``torch.distributed``;
  :class:`RefusedStepWarning` when natural steps of ``q(F)`` were refused as non-finite.
- :class:`LogisticRegression`, :class:`PoissonRegression`: GLMs by Fisher scoring.
"""

from natgrad.models.logistic import LogisticRegression
from natgrad.models.pnmf import PNMF
from natgrad.models.pnmf_distributed import fit_pnmf_data_parallel
from natgrad.models.pnmf_training import RefusedStepWarning
from natgrad.models.poisson_regression import PoissonRegression

__all__ = [
    "PNMF",
    "LogisticRegression",
    "PoissonRegression",
    "RefusedStepWarning",
    "fit_pnmf_data_parallel",
]
