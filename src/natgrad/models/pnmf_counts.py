"""A count matrix held either dense or as its non-zeros, for the PNMF likelihood.

The Poisson NMF likelihood needs the counts only in two places: the term
``Σ_ij y_ij log rate_ij``, which vanishes wherever ``y_ij = 0``, and ``Σ_ij log y_ij!``. A
:class:`CountMatrix` therefore stores small problems as one dense ``(n_samples, n_features)``
tensor (fast matrix products) and large sparse problems as their non-zeros in compressed-row
form, so that no ``(n_samples, n_features)`` tensor is ever built for them.

``Σ_ij log y_ij!`` is summed in float64 (where the device has it) whatever the dtype of the
counts: it nearly cancels against the ELBO's other terms, and in float32 its round-off alone
(about 1 per entry at counts of 1e6, 100 at 1e8) is as large as the ELBO (about
``−½ log(2π y)`` per entry near the optimum).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor


@dataclass(frozen=True)
class CountMatrix:
    """Non-negative counts ``y``, shape ``(n_samples, n_features)``.

    Exactly one storage is set: ``dense`` (shape ``(n_samples, n_features)``) or the
    compressed-row triple ``row_ptr`` (``(n_samples + 1,)``), ``cols`` and ``values``
    (``(nnz,)`` each) together with ``rows`` (``(nnz,)``, the row of every non-zero).
    ``log_factorial`` is ``Σ_ij log y_ij!`` (computed once, a scalar tensor of
    :func:`accumulation_dtype`).
    """

    n_samples: int
    n_features: int
    log_factorial: Tensor
    dense: Tensor | None = None
    row_ptr: Tensor | None = None
    rows: Tensor | None = None
    cols: Tensor | None = None
    values: Tensor | None = None

    @property
    def is_sparse(self) -> bool:
        """Whether the counts are stored as their non-zeros."""
        return self.dense is None

    @cached_property
    def row_totals(self) -> Tensor:
        """``Σ_j y_ij``, shape ``(n_samples,)`` (computed once)."""
        if not self.is_sparse:
            return self.dense.sum(1)
        totals = torch.zeros(self.n_samples, dtype=self.values.dtype, device=self.device)
        return totals.index_add_(0, self.rows, self.values)

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the stored counts."""
        return self.values.dtype if self.is_sparse else self.dense.dtype

    @property
    def device(self) -> torch.device:
        """Device of the stored counts."""
        return self.values.device if self.is_sparse else self.dense.device

    def total(self) -> Tensor:
        """``Σ_ij y_ij`` (a scalar tensor)."""
        return (self.values if self.is_sparse else self.dense).sum()

    def to(self, dtype: torch.dtype) -> CountMatrix:
        """The same counts stored in ``dtype`` (``self`` if they already are)."""
        if dtype == self.dtype:
            return self
        if self.is_sparse:
            return replace(self, values=self.values.to(dtype))
        return replace(self, dense=self.dense.to(dtype))

    def take_rows(self, index: Tensor) -> CountMatrix:
        """The counts of the samples ``index`` (shape ``(B,)``), in that order."""
        if not self.is_sparse:
            dense = self.dense[index]
            return CountMatrix(len(index), self.n_features, _log_factorial(dense), dense=dense)
        starts = self.row_ptr[index]
        lengths = self.row_ptr[index + 1] - starts
        new_row_ptr = torch.zeros(len(index) + 1, dtype=torch.long, device=self.device)
        new_row_ptr[1:] = torch.cumsum(lengths, 0)
        total = int(new_row_ptr[-1])
        offsets = torch.arange(total, device=self.device) - torch.repeat_interleave(
            new_row_ptr[:-1], lengths, output_size=total
        )
        positions = torch.repeat_interleave(starts, lengths, output_size=total) + offsets
        new_rows = torch.repeat_interleave(
            torch.arange(len(index), device=self.device), lengths, output_size=total
        )
        values = self.values[positions]
        return CountMatrix(
            len(index),
            self.n_features,
            _log_factorial(values),
            row_ptr=new_row_ptr,
            rows=new_rows,
            cols=self.cols[positions],
            values=values,
        )

    def to_dense_numpy(self) -> np.ndarray:
        """The counts as a dense NumPy array (small problems and tests only)."""
        if not self.is_sparse:
            return self.dense.detach().cpu().numpy()
        matrix = sp.csr_matrix(
            (
                self.values.cpu().numpy(),
                self.cols.cpu().numpy(),
                self.row_ptr.cpu().numpy(),
            ),
            shape=(self.n_samples, self.n_features),
        )
        return matrix.toarray()


def count_matrix(
    counts: np.ndarray | sp.spmatrix | sp.sparray,
    dtype: torch.dtype,
    device: torch.device,
) -> CountMatrix:
    """Wrap validated counts (dense array or SciPy sparse matrix) as a :class:`CountMatrix`.

    Parameters
    ----------
    counts : ndarray or scipy.sparse matrix of shape (n_samples, n_features)
        Non-negative, finite counts (validated by the caller); duplicate sparse entries are
        summed and stored zeros dropped, in a copy (``counts`` is never modified).
    dtype, device
        Floating dtype and device of the stored tensors.
    """
    n_samples, n_features = counts.shape
    if not sp.issparse(counts):
        array = np.asarray(counts)
        if not array.flags.writeable:  # a read-only view (memmap) would make torch warn
            array = array.copy()
        dense = torch.as_tensor(array, dtype=dtype, device=device)
        return CountMatrix(n_samples, n_features, _log_factorial(dense), dense=dense)
    csr = sp.csr_matrix(counts)
    if not csr.has_canonical_format or np.count_nonzero(csr.data) != csr.nnz:
        csr = csr.copy()  # canonicalise a copy: the caller's arrays are left as they are
        csr.sum_duplicates()
        csr.eliminate_zeros()
    row_ptr = torch.as_tensor(csr.indptr.astype(np.int64), device=device)
    lengths = row_ptr[1:] - row_ptr[:-1]
    rows = torch.repeat_interleave(torch.arange(n_samples, device=device), lengths)
    values = torch.as_tensor(csr.data, dtype=dtype, device=device)
    return CountMatrix(
        n_samples,
        n_features,
        _log_factorial(values),
        row_ptr=row_ptr,
        rows=rows,
        cols=torch.as_tensor(csr.indices.astype(np.int64), device=device),
        values=values,
    )


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64, or float32 on devices without float64 (MPS): the dtype of sums over entries
    whose terms cancel (the ELBO, ``Σ log y!``)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _log_factorial(counts: Tensor) -> Tensor:
    """``Σ log y!`` of ``counts`` in :func:`accumulation_dtype` (scalar tensor)."""
    return torch.lgamma(counts.to(accumulation_dtype(counts.device)) + 1.0).sum()
