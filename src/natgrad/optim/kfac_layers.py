"""Per-layer state of the K-FAC/EKFAC preconditioners: running factors and their eigenbases
(or, for factored damping, the factors' damped inverses).

The maths is the curvature layer's (:mod:`natgrad.curvature.kfac_capture` for features and
factors, :mod:`natgrad.linalg.kron` for eigenbasis solves and Cholesky inverses,
:mod:`natgrad.curvature.ekfac` for the projected second moment); this module only keeps
statistics between steps.

Factors are stored in ``factor_dtype`` (float32 for half/bfloat16 or float32 parameters, float64
for float64 parameters), so ``torch.autocast`` never lowers their precision.

The per-step work is kept to few tensor operations, since on small layers each operation's
dispatch costs as much as its arithmetic: sums live in buffers reused between steps (one
``addmm_`` per record), counts are Python numbers, the moving averages of all layers are updated
by two ``torch._foreach`` operations, and a preconditioned gradient is written straight into
``.grad`` by the last product of the solve. A fold replaces the factors by new tensors and never
changes a factor in place, so that a refresh keeps the factors it inverts without copying them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from natgrad.curvature.ekfac import embedding_second_moment, projected_second_moment
from natgrad.curvature.kfac_capture import (
    CONV_TRANSPOSE_TYPES,
    CONV_TYPES,
    KroneckerLayer,
    add_column_gram,
    conv_patch_means,
    conv_patches,
    input_features,
    join_calls,
    matrix_as_weight,
    output_features,
    patch_features,
    reduced_input_features,
    reduced_output_features,
    token_counts,
    transposed_output_grad,
    transposed_patch_gram,
    transposed_per_sample_gradients,
    weight_as_matrix,
)
from natgrad.linalg.kron import (
    SymmetricEigen,
    damped_factor_inverses,
    eigenbasis_project,
    eigenbasis_solve,
    factored_damping_from_factors,
    grouped_factored_damping,
    kron_mv,
    symmetric_eigh_batch,
)

if TYPE_CHECKING:
    from natgrad.optim.kfac_recurrent import PackedRows

__all__ = [
    "CallPairs",
    "EmbeddingState",
    "GroupedConvState",
    "KroneckerLayerState",
    "LayerState",
    "factor_dtype_for",
    "fold_factors",
]


def factor_dtype_for(param: Tensor) -> torch.dtype:
    """float64 for float64 parameters, float32 otherwise."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _add_gram(total: Tensor | None, rows: Tensor, fresh: bool, scale: float = 1.0) -> Tensor:
    """``total + scale · rowsᵀ rows`` for ``rows`` of shape ``(n, d)``, in place, in one
    operation; with ``fresh`` the old contents of ``total`` are ignored (a reused buffer,
    allocated when ``None``). The in-place product keeps the dtype of ``rows`` under
    ``torch.autocast``."""
    if total is None:
        total = rows.new_empty((rows.shape[-1], rows.shape[-1]))
    return total.addmm_(rows.mT, rows, beta=0.0 if fresh else 1.0, alpha=scale)


def fold_factors(states: Sequence[LayerState], decay: float) -> None:
    """Fold the (already all-reduced) sums of ``states`` into their moving averages,
    ``decay · F + (1 − decay) · sum / count`` (two ``torch._foreach`` operations for all layers;
    ``sum / count`` for a layer without factors yet), and reset the sums. The averages are new
    tensors: a factor is never changed in place (:meth:`LayerState.refresh_inverted_factors`
    keeps the factors themselves)."""
    running: list[LayerState] = []
    for state in states:
        if state.input_factor is None:
            state.input_factor = state.input_sum / state.input_count
            state.output_factor = state.output_sum / state.output_count
        else:
            running.append(state)
    if running:
        sums = [total for state in running for total in (state.input_sum, state.output_sum)]
        counts = [count for state in running for count in (state.input_count, state.output_count)]
        averages = [
            factor for state in running for factor in (state.input_factor, state.output_factor)
        ]
        torch._foreach_div_(sums, counts)
        folded = iter(torch._foreach_lerp(averages, sums, 1.0 - decay))
        for state in running:
            state.input_factor, state.output_factor = next(folded), next(folded)
    for state in states:
        state.reset_sums()


def _cube_cost(factor: Tensor) -> float:
    """``d³`` for a factor ``(d, d)``, ``g d³`` for ``g`` of them: the cost of inverting or
    decomposing it, up to a constant."""
    return float(factor[..., 0].numel() * factor.shape[-1] ** 2)


def _matrix_view(tensor: Tensor, rows: int, dtype: torch.dtype) -> Tensor | None:
    """``tensor`` as a ``(rows, -1)`` view to write a result into, or ``None`` if it cannot
    take one (another dtype, or a layout that does not flatten to a view)."""
    if tensor.dtype != dtype or not tensor.is_contiguous():
        return None
    return tensor if tensor.ndim == 2 and tensor.shape[0] == rows else tensor.view(rows, -1)


def _copy_scaled(target: Tensor, source: Tensor, scale: float | Tensor | None) -> None:
    """``target ← scale · source`` (``source`` if ``scale`` is None), the product written
    straight into ``target`` where the dtypes agree (the values of scaling ``source`` in place
    and copying it)."""
    if scale is None:
        target.copy_(source)
    elif target.dtype == source.dtype:
        torch.mul(source, scale, out=target)
    else:
        target.copy_(source * scale)


def _damped_reciprocal(eigenvalues: Tensor, damping: float) -> Tensor:
    """``1 / (S + λ)`` elementwise (pseudo-inverse at ``λ = 0``), as
    :func:`~natgrad.linalg.kron.eigenbasis_solve` of the all-ones matrix in the identity basis."""
    identity_out = SymmetricEigen(eigenvalues[:, 0], None)
    identity_in = SymmetricEigen(eigenvalues[0], None)
    ones = torch.ones_like(eigenvalues)
    return eigenbasis_solve(identity_out, identity_in, eigenvalues, ones, damping)


def _projected_gradient_moment(
    gradients: Tensor, output_eigen: SymmetricEigen, input_eigen: SymmetricEigen
) -> Tensor:
    """``Σ_n (Q_Gᵀ G_n Q_A)²`` of per-sample gradients ``(..., N, d_out, d_in)`` (leading: the
    groups of a grouped convolution, whose bases are ``(g, d, d)``), shape ``(..., d_out,
    d_in)``."""
    coordinates = output_eigen.vectors.mT.unsqueeze(-3) @ gradients
    coordinates = coordinates @ input_eigen.vectors.unsqueeze(-3)
    return coordinates.square().sum(dim=-3)


def _product_of(left: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """``torch.mm`` where ``left`` is a matrix (what ``torch.matmul`` calls for two matrices,
    without its dispatch), else ``torch.matmul`` (stacks of a grouped convolution)."""
    return torch.mm if left.ndim == 2 else torch.matmul


def _split_columns(right: Tensor, weight_columns: int) -> tuple[Tensor, Tensor | None]:
    """The right-hand matrix of a solve ``(..., d_in [+ 1], d_in [+ 1])`` split into the columns
    that give the weight and the column that gives the bias (``None`` without a bias)."""
    bias = right[..., weight_columns] if weight_columns < right.shape[-1] else None
    return right[..., :weight_columns], bias


class CallPairs:
    """EKFAC's features and output gradients of the calls of one layer in one forward pass from
    one backward vector, ``(..., N, T_i, d)`` each, joined along the locations when read (one
    concatenation however many calls: joining at every call would copy the earlier calls' again,
    quadratic in the number of calls), and the samples they count. A transposed convolution's
    features are its inputs ``(N, C_in, *L_in)``, read call by call
    (:meth:`KroneckerLayerState.projected_moment`)."""

    def __init__(self, features: Tensor, grads: Tensor, samples: int) -> None:
        self.features = [features]
        self.grads = [grads]
        self.samples = samples

    def add(self, features: Tensor, grads: Tensor) -> None:
        """Another call's features and gradients, on the same samples."""
        self.features.append(features)
        self.grads.append(grads)

    def joined(self) -> tuple[Tensor, Tensor]:
        """The calls' features and gradients joined, ``(..., N, Σ T_i, d)`` each
        (:func:`~natgrad.curvature.kfac_capture.join_calls`)."""
        return join_calls(self.features), join_calls(self.grads)


class _FactoredSolve:
    """Factored damping: ``(G + λ_G I)⁻¹ V (A + λ_A I)⁻¹`` with both inverses kept (the input
    one a vector for a diagonal factor), and the split of ``(A + λ_A I)⁻¹`` into weight columns
    and bias column, so that the last product can be written straight into ``.grad``."""

    def __init__(
        self, output_inverse: Tensor, input_inverse: Tensor, weight_columns: int | None
    ) -> None:
        self.output_inverse = output_inverse
        self.input_inverse = input_inverse
        self.right: tuple[Tensor, Tensor | None] | None = None
        if input_inverse.ndim >= 2:  # a matrix, or one per group (a grouped convolution)
            self.right = _split_columns(input_inverse, weight_columns)
        self.deferred = False
        self._product = _product_of(output_inverse)

    @property
    def complete(self) -> bool:
        """Whether the partial of the last :meth:`start` is the solution itself."""
        return not self.deferred

    def start(self, matrix: Tensor, with_product: bool) -> tuple[Tensor, Tensor]:
        """``(partial, V)``: ``partial`` is ``(G + λ_G I)⁻¹ V``, whose product with the right
        inverse :meth:`finish` leaves to the write, or with ``with_product`` (or a diagonal
        input factor) the solution, whose inner product with ``V`` is
        ``vec(V)ᵀ (block + λI)⁻¹ vec(V)``."""
        left = self._product(self.output_inverse, matrix)
        self.deferred = self.right is not None and not with_product
        if self.deferred:
            return left, matrix
        if self.right is None:
            return left * self.input_inverse, matrix
        return self._product(left, self.input_inverse), matrix

    def finish(self, partial: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor | None] | None]:
        """``(partial, split (A + λ_A I)⁻¹)`` if the last product was deferred, else
        ``(solution, None)``."""
        return partial, self.right if self.deferred else None


class _EigenSolve:
    """Exact damping in the Kronecker eigenbasis, ``Q_G [(Q_Gᵀ V Q_A) / (S + λ)] Q_Aᵀ``
    (:func:`~natgrad.linalg.kron.eigenbasis_solve`), with the transposes and the split of
    ``Q_Aᵀ`` into weight columns and bias column kept between steps (the transposes as
    row-major copies, which the BLAS multiplies faster than transposed views)."""

    complete = False
    """The partial of :meth:`start` is never the solution (its last products remain)."""

    def __init__(
        self,
        output_eigen: SymmetricEigen,
        input_eigen: SymmetricEigen,
        reciprocal: Tensor,
        weight_columns: int | None,
    ) -> None:
        self.output_vectors = output_eigen.vectors
        self.output_vectors_t = (
            None if output_eigen.vectors is None else output_eigen.vectors.mT.contiguous()
        )
        self.input_vectors = input_eigen.vectors
        self.reciprocal = reciprocal
        self.right: tuple[Tensor, Tensor | None] | None = None
        if input_eigen.vectors is not None:
            self.right = _split_columns(input_eigen.vectors.mT.contiguous(), weight_columns)
        self._product = _product_of(reciprocal)

    def start(self, matrix: Tensor, with_product: bool) -> tuple[Tensor, Tensor]:
        """``(partial, coordinates)``: the scaled eigenbasis coordinates and the coordinates
        ``Q_Gᵀ V Q_A``, whose inner product is ``vec(V)ᵀ (C + λI)⁻¹ vec(V)``."""
        coordinates = matrix
        if self.output_vectors_t is not None:
            coordinates = self._product(self.output_vectors_t, coordinates)
        if self.input_vectors is not None:
            coordinates = self._product(coordinates, self.input_vectors)
        return coordinates * self.reciprocal, coordinates

    def finish(self, partial: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor | None] | None]:
        """``(Q_G partial, split Q_Aᵀ)``: the solution is their product."""
        if self.output_vectors is None:
            return partial, self.right
        return self._product(self.output_vectors, partial), self.right


class LayerState:
    """Running Kronecker factors of one layer; subclasses say how features are formed.

    The factors follow :mod:`natgrad.curvature.kfac_capture`: ``A`` is the mean of ``a aᵀ`` over
    samples and locations, ``G`` the mean over samples of ``Σ_t g gᵀ`` (with ``reduce``,
    K-FAC-reduce: the inputs averaged and the output gradients summed over each sample's
    locations first), both accumulated as sums and counts until :func:`fold_factors` turns them
    into an exponential moving average.

    A layer called several times in one forward pass (weight sharing across calls: a siamese
    branch, an unrolled recurrent cell) applies its weight at the locations of every call, so
    the calls' locations are pooled as one call's: every call adds its rows to ``A``, and the
    output gradients of all calls of one pass add to ``G`` with the samples counted once (a
    pass is the calls before the backward pass that records them; calls after it start the
    next, as with gradient accumulation). With ``reduce`` each call is reduced over its own
    locations, and the calls pooled as in expand.
    """

    name: str
    module: nn.Module
    weight: nn.Parameter

    def __init__(
        self, name: str, module: nn.Module, keep_pairs: bool, reduce: bool = False
    ) -> None:
        self.name = name
        self.module = module
        self.weight = module.weight  # held, as a torch.optim optimizer holds its parameters
        self.dtype = factor_dtype_for(module.weight)
        self.device = module.weight.device
        self.keep_pairs = keep_pairs
        self.reduce = reduce
        self.pairs: list[CallPairs] = []
        self.input_sum: Tensor | None = None
        self.output_sum: Tensor | None = None
        self.input_factor: Tensor | None = None
        self.output_factor: Tensor | None = None
        self._output_eigen: SymmetricEigen | None = None
        self._input_eigen: SymmetricEigen | None = None
        self._eigenvalues: Tensor | None = None
        self._inverted_factors: tuple[Tensor, Tensor] | None = None
        self._inverse: tuple[tuple[float, bool], _EigenSolve | _FactoredSolve] | None = None
        self._call_pass = 0
        self._recorded_since_call = False
        self._counted_pass: tuple[int, int] | None = None
        self._paired_key: tuple[int, int, int] | None = None
        self.reset_sums()

    # -- eigen attributes: setting one drops the cached damped inverse ----------------------
    @property
    def output_eigen(self) -> SymmetricEigen | None:
        """Eigendecomposition of ``G``."""
        return self._output_eigen

    @output_eigen.setter
    def output_eigen(self, value: SymmetricEigen | None) -> None:
        self._output_eigen, self._inverse = value, None

    @property
    def input_eigen(self) -> SymmetricEigen | None:
        """Eigendecomposition of ``A`` (diagonal for embeddings)."""
        return self._input_eigen

    @input_eigen.setter
    def input_eigen(self, value: SymmetricEigen | None) -> None:
        self._input_eigen, self._inverse = value, None

    @property
    def eigenvalues(self) -> Tensor | None:
        """EKFAC's re-estimated eigenvalue matrix ``(d_out, d_in)``; ``None`` for K-FAC's."""
        return self._eigenvalues

    @eigenvalues.setter
    def eigenvalues(self, value: Tensor | None) -> None:
        self._eigenvalues, self._inverse = value, None

    @property
    def inverted_factors(self) -> tuple[Tensor, Tensor] | None:
        """Factored damping: ``(G, A)`` as of the last inverse refresh (``A`` a vector for
        embeddings), from which the damped inverses are formed without eigendecompositions."""
        return self._inverted_factors

    @inverted_factors.setter
    def inverted_factors(self, value: tuple[Tensor, Tensor] | None) -> None:
        self._inverted_factors, self._inverse = value, None

    def has_curvature(self, factored: bool) -> bool:
        """Whether refreshed factors (factored damping) or an eigenbasis are there to
        precondition with."""
        return (self.inverted_factors if factored else self.output_eigen) is not None

    # -- statistics --------------------------------------------------------------------------
    def reset_sums(self) -> None:
        """Start new sums; their buffers are kept and overwritten by the next record."""
        self.input_count = 0.0
        self.output_count = 0.0

    def statistics(self) -> list[Tensor]:
        """Accumulated sums and ``[input count, output count]`` as tensors (zeros where nothing
        was recorded): what a distributed run all-reduces, in place, before
        :meth:`set_statistics`."""
        device = self.weight.device
        counts = [self.input_count, self.output_count]
        return [
            self._pending_sum(self.input_sum, self.input_count, self._input_template()),
            self._pending_sum(self.output_sum, self.output_count, self._output_template()),
            torch.tensor(counts, dtype=self.dtype, device=device),
        ]

    def set_statistics(self, statistics: list[Tensor]) -> None:
        """Take over sums and counts in the layout of :meth:`statistics`."""
        self.input_sum, self.output_sum, counts = statistics
        self.input_count, self.output_count = (float(count) for count in counts)

    @staticmethod
    def _pending_sum(total: Tensor | None, count: float, template: Tensor) -> Tensor:
        return torch.zeros_like(template) if count == 0 else total

    def has_pending(self) -> bool:
        return self.input_count > 0 and self.output_count > 0

    def begin_call(self) -> int:
        """Number the forward pass that a call of the layer belongs to: calls share one until
        output gradients are recorded; the first call after that starts the next."""
        if self._recorded_since_call:
            self._call_pass += 1
            self._recorded_since_call = False
        return self._call_pass

    def _count_samples(
        self,
        samples: int,
        call_pass: int,
        pair: tuple[Tensor, Tensor] | None,
        vector: int = 0,
    ) -> None:
        """Count the ``samples`` of output gradients from a call of pass ``call_pass`` unless
        another call of that pass, on as many samples, counted them (the same samples at more
        locations), or they back-propagate a pass's ``vector``-th vector after its first (the
        exact Fisher's columns: the same samples again). An EKFAC pair ``(features,
        gradients)`` of such a call of the same vector joins that call's along the locations
        (:class:`CallPairs`, concatenated when read), so that a sample's gradient sums over all
        its calls; each vector's pairs stay apart (their squares add), counting the samples with
        the first vector's."""
        self._recorded_since_call = True
        counted = (call_pass, samples)
        if vector == 0 and counted != self._counted_pass:
            self._counted_pass = counted
            self.output_count += samples
        if pair is None:
            return
        key = (call_pass, samples, vector)
        if key != self._paired_key:
            self._paired_key = key
            self.pairs.append(CallPairs(*pair, samples if vector == 0 else 0))
            return
        self.pairs[-1].add(*pair)

    def record_output_grad(
        self,
        grad: Tensor,
        scale: float,
        features: Tensor,
        call_pass: int,
        vector: int = 0,
        packed: PackedRows | None = None,
    ) -> None:
        """Add ``Σ_n Σ_t g gᵀ`` (reduce: ``Σ_n ĝ ĝᵀ``) for output gradients ``scale · grad``
        (per-sample gradients) of a call of forward pass ``call_pass`` (:meth:`begin_call`),
        back-propagated from the pass's ``vector``-th backward vector; a call on packed rows
        ``(R, d_out)`` (``packed``) counts ``packed.samples`` samples."""
        if grad.requires_grad:
            grad = grad.detach()
        if grad.dtype != self.dtype:
            grad = grad.to(self.dtype)
        samples = grad.shape[0] if packed is None else packed.samples
        reduce_packed = packed is not None and self.reduce
        rows = packed.sums(grad) if reduce_packed else self._output_gram_rows(grad)
        fresh = self.output_count == 0
        self.output_sum = _add_gram(self.output_sum, rows, fresh, scale**2)
        pair = None
        if self.keep_pairs:
            full = self._output_rows(grad) if self.reduce else rows
            if packed is None:
                grads = full.reshape(samples, -1, full.shape[-1])
            else:
                grads = packed.padded(full)
            pair = (features, grads if scale == 1.0 else grads * scale)
        self._count_samples(samples, call_pass, pair, vector)

    def _output_gram_rows(self, grad: Tensor) -> Tensor:
        """The rows whose Gram matrix is added to ``G``: the output gradients ``(N T, d_out)``,
        or with ``reduce`` their sums over each sample's locations ``(N, d_out)``."""
        if self.reduce and grad.ndim > 2:
            features = output_features(self._feature_layer(), grad)
            return reduced_output_features(features).squeeze(1)
        return self._output_rows(grad)

    def _output_rows(self, grad: Tensor) -> Tensor:
        """Output gradients as rows ``(N T, d_out)``
        (:func:`~natgrad.curvature.kfac_capture.output_features`, flattened)."""
        if grad.ndim == 2:
            return grad
        features = output_features(self._feature_layer(), grad)
        return features.reshape(-1, features.shape[-1])

    # -- eigenbases and solves -----------------------------------------------------------------
    def eigen_tensors(self) -> list[Tensor]:
        """Eigen-decomposition tensors, in a fixed order (for broadcasting)."""
        tensors = [self.output_eigen.values, self.output_eigen.vectors, self.input_eigen.values]
        if self.input_eigen.vectors is not None:
            tensors.append(self.input_eigen.vectors)
        return tensors

    def allocate_eigens(self) -> None:
        """Empty eigendecompositions of the right shapes, to be filled by a broadcast."""
        self.output_eigen = SymmetricEigen(
            torch.empty_like(self.output_factor[..., 0]), torch.empty_like(self.output_factor)
        )
        self.input_eigen = self._empty_input_eigen()

    def eigen_cost(self) -> float:
        """Cost of :meth:`update_eigens` in flops, up to a constant."""
        return _cube_cost(self.output_factor) + self._input_eigen_cost()

    def kfac_eigenvalues(self) -> Tensor:
        """``outer(g, a)``: the K-FAC block's eigenvalues, shape ``(d_out, d_in)`` (one such
        matrix per group of a grouped convolution)."""
        return self.output_eigen.values.unsqueeze(-1) * self.input_eigen.values.unsqueeze(-2)

    def refresh_inverted_factors(self) -> None:
        """Factored damping: keep the current factors as the ones to invert (and drop eigenbases,
        e.g. of a state saved with exact damping). No copy is needed: a fold replaces the factors
        by new tensors (:func:`fold_factors`)."""
        self.output_eigen = self.input_eigen = None
        self.inverted_factors = (self.output_factor, self.input_factor)  # never changed in place

    def factored_inverse_inputs(self, damping: float) -> tuple[list[Tensor], list[float]]:
        """``([G, A], [λ_G, λ_A])`` of the refreshed factors for
        :func:`~natgrad.linalg.kron.damped_factor_inverses` (Martens & Grosse's π)."""
        output_factor, input_factor = self.inverted_factors
        dampings = factored_damping_from_factors(output_factor, input_factor, damping)
        return [output_factor, input_factor], list(dampings)

    def has_factored_inverses(self, damping: float) -> bool:
        """Whether the damped inverses for ``damping`` are formed."""
        return self._inverse is not None and self._inverse[0] == (float(damping), True)

    def set_factored_inverses(
        self, damping: float, output_inverse: Tensor, input_inverse: Tensor
    ) -> None:
        """Take ``(G + λ_G I)⁻¹`` and ``(A + λ_A I)⁻¹`` (a vector for a diagonal ``A``)."""
        solve = _FactoredSolve(output_inverse, input_inverse, self._columns)
        self._inverse = ((float(damping), True), solve)

    def take_factored_inverses(self, damping: float, inverses: Sequence[Tensor]) -> None:
        """Take the inverses of :meth:`factored_inverse_inputs`' matrices, in that order."""
        self.set_factored_inverses(damping, *self._inverse_pair(inverses))

    def _inverse_pair(self, inverses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """``((G + λ_G I)⁻¹, (A + λ_A I)⁻¹)`` from the inverses of
        :meth:`factored_inverse_inputs`' matrices."""
        output_inverse, input_inverse = inverses
        return output_inverse, input_inverse

    def allocate_factored_inverses(self, damping: float) -> None:
        """Empty damped inverses of the right shapes, to be filled by a broadcast."""
        output_factor, input_factor = self.inverted_factors
        self.set_factored_inverses(
            damping, torch.empty_like(output_factor), torch.empty_like(input_factor)
        )

    def factored_inverse_tensors(self) -> list[Tensor]:
        """The damped inverses, ``[(G + λ_G I)⁻¹, (A + λ_A I)⁻¹]`` (for broadcasting)."""
        solve = self._inverse[1]
        return [solve.output_inverse, solve.input_inverse]

    def partial_solve(
        self, matrix: Tensor, damping: float, factored: bool, with_product: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Start ``(block + λI)⁻¹ vec(V)`` (exact eigenbasis damping) or the factored π form;
        :meth:`write_solution` finishes it into ``.grad``.

        The damped inverse (``1/(S + λ)`` in the eigenbasis, or the two factored inverses by
        Cholesky from :attr:`inverted_factors`) is built once per refresh and damping and
        reused until either changes.

        Parameters
        ----------
        matrix : Tensor of shape (d_out, d_in)
            ``V``, the gradient in the layout of :meth:`grad_matrix`.
        damping : float
        factored : bool
        with_product : bool, default False
            Also return ``vec(V)ᵀ (block + λI)⁻¹ vec(V)``.

        Returns
        -------
        partial : Tensor of shape (d_out, d_in)
            Exact damping: the scaled eigenbasis coordinates ``(Q_Gᵀ V Q_A) / (S + λ)``;
            factored damping: ``(G + λ_G I)⁻¹ V``, or with ``with_product`` the solution.
            Linear in ``V``, so scaling it scales the solution.
        product : 0-dim Tensor or None
        """
        key = (float(damping), factored)
        if self._inverse is None or self._inverse[0] != key:
            self._inverse = (key, self._damped_solve(damping, factored))
        partial, against = self._inverse[1].start(matrix, with_product)
        product = torch.dot(against.reshape(-1), partial.reshape(-1)) if with_product else None
        return partial, product

    def writes_scaled(self) -> bool:
        """Whether :meth:`write_solution` takes a scale of the solution begun by the last
        :meth:`partial_solve`, applied as it copies the solution into ``.grad`` (the partial
        is then the solution itself); otherwise the partial is to be scaled before."""
        return False

    def write_solution(self, partial: Tensor, scale: float | Tensor | None = None) -> None:
        """Finish the solve begun by :meth:`partial_solve` (same damping) into ``.grad``,
        multiplied by ``scale`` (a number or a 0-dim tensor) where :meth:`writes_scaled`."""
        self._write_product(*self._inverse[1].finish(partial), scale)

    def _damped_solve(self, damping: float, factored: bool) -> _EigenSolve | _FactoredSolve:
        if not factored:
            eigenvalues = self.kfac_eigenvalues() if self.eigenvalues is None else self.eigenvalues
            reciprocal = _damped_reciprocal(eigenvalues, damping)
            return _EigenSolve(self.output_eigen, self.input_eigen, reciprocal, self._columns)
        if not damping > 0:
            raise ValueError(f"factored damping needs damping > 0, got {damping!r}")
        inverses = damped_factor_inverses(*self.factored_inverse_inputs(damping))
        return _FactoredSolve(*self._inverse_pair(inverses), self._columns)

    def curvature_quadratic(self, matrix: Tensor) -> Tensor:
        """``vec(V)ᵀ C vec(V)`` for the block ``C`` that :meth:`partial_solve` inverts
        (undamped)."""
        if self.output_eigen is None:
            output_factor, input_factor = self.inverted_factors
            if input_factor.ndim == 1:
                return (matrix * (output_factor @ matrix) * input_factor).sum()
            return (matrix * kron_mv(output_factor, input_factor, matrix)).sum()
        coordinates = eigenbasis_project(self.output_eigen, self.input_eigen, matrix)
        eigenvalues = self.kfac_eigenvalues() if self.eigenvalues is None else self.eigenvalues
        return (coordinates.square() * eigenvalues).sum()

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor | None]:
        state: dict[str, Tensor | None] = {
            "input_factor": self.input_factor,
            "output_factor": self.output_factor,
            "eigenvalues": self.eigenvalues,
        }
        input_sum, output_sum, counts = self.statistics()
        state |= {
            "input_sum": input_sum,
            "input_count": counts[0],
            "output_sum": output_sum,
            "output_count": counts[1],
        }
        for side, eigen in (("output", self.output_eigen), ("input", self.input_eigen)):
            state[f"{side}_eigenvalues"] = None if eigen is None else eigen.values
            state[f"{side}_eigenvectors"] = None if eigen is None else eigen.vectors
        inverted = self.inverted_factors or (None, None)
        state["inverted_output_factor"], state["inverted_input_factor"] = inverted
        return {key: None if value is None else value.clone() for key, value in state.items()}

    def check_state(self, state: dict[str, Tensor | None]) -> None:
        """Raise a ``ValueError`` naming the layer and the entry if a saved :meth:`state_dict`
        does not fit this layer's shapes (a state of another architecture, or of the layer
        with a bias it no longer has)."""
        input_shape = tuple(self._input_template().shape)
        output_shape = tuple(self._output_template().shape)
        expected = dict.fromkeys(
            ("input_factor", "input_sum", "inverted_input_factor", "input_eigenvectors"),
            input_shape,
        )
        expected |= dict.fromkeys(
            ("output_factor", "output_sum", "inverted_output_factor", "output_eigenvectors"),
            output_shape,
        )
        expected["eigenvalues"] = output_shape[:-1] + input_shape[-1:]
        for key, shape in expected.items():
            value = state.get(key)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(
                    f"layer {self.name!r}: the saved {key} has shape {tuple(value.shape)}, "
                    f"this layer's has {shape}"
                )

    def load_state_dict(self, state: dict[str, Tensor | None]) -> None:
        """Take over a :meth:`state_dict`, moved to the layer's device and factor dtype (as
        ``torch.optim.Optimizer.load_state_dict`` moves its state to the parameters')."""
        self.dtype, self.device = factor_dtype_for(self.weight), self.weight.device
        device = self.device

        def get(key: str) -> Tensor | None:
            value = state.get(key)
            return None if value is None else value.to(device, self.dtype, copy=True)

        self.input_factor, self.output_factor = get("input_factor"), get("output_factor")
        self.eigenvalues = get("eigenvalues")
        self.input_count = float(state["input_count"])
        self.output_count = float(state["output_count"])
        self.input_sum = get("input_sum") if self.input_count > 0 else None
        self.output_sum = get("output_sum") if self.output_count > 0 else None
        eigens = []
        for side in ("output", "input"):
            values = get(f"{side}_eigenvalues")
            eigens.append(
                None if values is None else SymmetricEigen(values, get(f"{side}_eigenvectors"))
            )
        self.output_eigen, self.input_eigen = eigens
        inverted = (get("inverted_output_factor"), get("inverted_input_factor"))
        self.inverted_factors = None if inverted[0] is None else inverted
        self.pairs.clear()

    def follow_weight(self) -> None:
        """Move the statistics to the weight's device and factor dtype if the model was moved
        or converted (``model.to(device)``, ``model.double()``) since they were stored, as
        :meth:`load_state_dict` moves a saved state."""
        weight = self.weight
        if weight.device != self.device or factor_dtype_for(weight) != self.dtype:
            self.load_state_dict(self.state_dict())

    # -- for subclasses ------------------------------------------------------------------------
    def drop_frozen_bias(self) -> None:
        """Continue without the bias if it was frozen after the preconditioner was built (a
        layer type with a bias overrides this)."""

    def bias_passed_through(self) -> bool:
        """Whether the layer has a bias with a gradient that it leaves out (frozen when the
        preconditioner was built, or since)."""
        return False

    def record_input(self, layer_input: Tensor) -> Tensor | None:
        raise NotImplementedError

    def update_eigens(self) -> None:
        """Refresh the eigendecompositions from the current factors."""
        self.set_eigens(symmetric_eigh_batch(self.eigen_inputs()))

    def eigen_inputs(self) -> list[Tensor]:
        """The factors to eigendecompose (``G``, then ``A`` unless it is diagonal)."""
        raise NotImplementedError

    def set_eigens(self, eigens: list[SymmetricEigen]) -> None:
        """Take the eigendecompositions of :meth:`eigen_inputs`, in that order."""
        raise NotImplementedError

    def grad_matrix(self) -> Tensor | None:
        raise NotImplementedError

    def _write_product(
        self,
        left: Tensor,
        right: tuple[Tensor, Tensor | None] | None,
        scale: float | Tensor | None = None,
    ) -> None:
        """Write ``left @ [right_weight, right_bias]`` (``left`` if ``right`` is None), a matrix
        in the layout of :meth:`grad_matrix`, into ``.grad``; ``scale`` (where
        :meth:`writes_scaled`) multiplies ``left`` on the way."""
        raise NotImplementedError

    def param_matrix(self) -> Tensor:
        """The parameters in the layout of :meth:`grad_matrix` (may share their memory)."""
        raise NotImplementedError

    def projected_moment(self) -> tuple[Tensor, Tensor] | None:
        """Sum over samples of squared eigenbasis coordinates of per-sample gradients, and the
        sample count, from the kept (features, gradients) pairs; ``None`` if not supported."""
        raise NotImplementedError

    def _feature_layer(self) -> KroneckerLayer:
        raise NotImplementedError

    def _input_template(self) -> Tensor:
        raise NotImplementedError

    def _output_template(self) -> Tensor:
        raise NotImplementedError

    def _empty_input_eigen(self) -> SymmetricEigen:
        raise NotImplementedError

    def _input_eigen_cost(self) -> float:
        raise NotImplementedError


class KroneckerLayerState(LayerState):
    """``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.ConvTranspose1d`` /
    ``nn.ConvTranspose2d`` (groups=1): ``G ⊗ A`` with the bias folded into ``A``; ``reduce``
    selects K-FAC-reduce for inputs with several locations per sample. A transposed
    convolution's weight is in the matrix layout of
    :func:`~natgrad.curvature.kfac_capture.weight_as_matrix` (a copy; its solution is written
    back through :func:`~natgrad.curvature.kfac_capture.matrix_as_weight`)."""

    def __init__(
        self, name: str, module: nn.Module, keep_pairs: bool, reduce: bool = False
    ) -> None:
        bias = module.bias
        bias_index = 1 if bias is not None and bias.requires_grad else None
        self.layer = KroneckerLayer(name, module, 0, bias_index)
        self.bias: nn.Parameter | None = None if bias_index is None else bias
        self._rows = self.layer.output_dim
        self._columns = module.weight.numel() // self._rows
        self._ones: Tensor | None = None
        super().__init__(name, module, keep_pairs, reduce)

    def _feature_layer(self) -> KroneckerLayer:
        return self.layer

    def drop_frozen_bias(self) -> None:
        """If the bias was frozen after the preconditioner was built, continue with the weight
        alone: its ``A`` is the current one without the bias row and column (what a bias-free
        layer would have recorded, history included), the curvature is refreshed from it at
        this step, and the bias is left out from now on. Otherwise the layer would wait for a
        bias gradient that never comes and pass the weight's gradient through. (A layer frozen
        whole keeps its bias: it records nothing until unfrozen.)"""
        if self.bias is None or self.bias.requires_grad or not self.weight.requires_grad:
            return
        self.bias = None
        self.layer = KroneckerLayer(self.name, self.module, 0, None)
        if self.input_factor is not None:
            self.input_factor = self.input_factor[..., :-1, :-1].clone()
        pending = self.input_count > 0
        self.input_sum = self.input_sum[..., :-1, :-1].clone() if pending else None
        if self._keeps_patches():
            for pair in self.pairs:
                pair.features = [features[..., :-1] for features in pair.features]
        self.output_eigen = self.input_eigen = self.inverted_factors = self.eigenvalues = None

    def bias_passed_through(self) -> bool:
        bias = self.module.bias
        return self.bias is None and bias is not None and bias.grad is not None

    def _input_template(self) -> Tensor:
        size = self.layer.input_dim
        return torch.empty(size, size, dtype=self.dtype, device=self.weight.device)

    def _output_template(self) -> Tensor:
        size = self.layer.output_dim
        return torch.empty(size, size, dtype=self.dtype, device=self.weight.device)

    def record_input(self, layer_input: Tensor, packed: PackedRows | None = None) -> Tensor | None:
        """Add ``Σ_n Σ_t a aᵀ`` (reduce: ``Σ_n ā āᵀ``); returns the features
        ``(N, T, d_in [+ 1])`` if pairs are kept (EKFAC), else ``None``. Packed rows
        ``(R, d_in)`` (``packed``) are placed at their samples: reduce averages each sample's
        own rows, and the features are zero where a sample has no row."""
        layer_input = layer_input.detach()
        if isinstance(self.module, CONV_TYPES):
            return self._record_patches(layer_input)
        features = None
        if layer_input.ndim == 2:
            flat = self._with_ones_column(layer_input) if self.layer.has_bias else layer_input
            if packed is not None:
                features = flat.to(self.dtype)
                flat = packed.means(features) if self.reduce else features
        else:
            features = input_features(self.layer, layer_input)
            rows = reduced_input_features(features) if self.reduce else features
            flat = rows.reshape(-1, rows.shape[-1])
        if flat.dtype != self.dtype:
            flat = flat.to(self.dtype)
        self.input_sum = _add_gram(self.input_sum, flat, self.input_count == 0)
        self.input_count += flat.shape[0]
        if not self.keep_pairs:
            return None
        if packed is not None:
            return packed.padded(features)
        if features is not None and self.reduce:
            return features.to(self.dtype)
        return flat.reshape(layer_input.shape[0], -1, flat.shape[-1])

    def _record_patches(self, layer_input: Tensor) -> Tensor | None:
        """:meth:`record_input` of a convolution, from its feature-major patches
        (:func:`~natgrad.curvature.kfac_capture.conv_patches`): the Gram matrix of the patches
        is one product, and a bias adds their sums, with no column of ones copied in. With
        ``reduce`` the Gram matrix is of the patches' means over the locations
        (:func:`~natgrad.curvature.kfac_capture.conv_patch_means`, no patches gathered unless
        EKFAC keeps them); a transposed convolution's expand Gram matrix by phases without its
        expanded input's zeros (:meth:`_record_transposed_gram`). EKFAC keeps the patches as
        features, but of a transposed convolution its input (:meth:`_kept_input`)."""
        if self._phased():
            return self._record_transposed_gram(layer_input)
        patches = None
        if self.reduce and not self._keeps_patches():
            columns = conv_patch_means(self.module, layer_input.to(self.dtype), self.name)
        else:
            patches = conv_patches(self.module, layer_input, self.name)
            if patches.dtype != self.dtype:
                patches = patches.to(self.dtype)
            columns = patches.mean(dim=2) if self.reduce else patches.reshape(len(patches), -1)
        fresh = self.input_count == 0
        self.input_sum = add_column_gram(self.input_sum, columns, self.layer.has_bias, fresh)
        self.input_count += columns.shape[1]
        if self._keeps_patches():
            return patch_features(patches, self.layer.has_bias)
        return self._kept_input(layer_input)

    def _phased(self) -> bool:
        """Whether :meth:`record_input` adds K-FAC-expand's input Gram matrix of a transposed
        convolution without gathering its patches."""
        return isinstance(self.module, CONV_TRANSPOSE_TYPES) and not self.reduce

    def _keeps_patches(self) -> bool:
        """Whether EKFAC's pairs keep the layer's patches as features (not a transposed
        convolution's, whose per-sample gradients are formed without them)."""
        return self.keep_pairs and not isinstance(self.module, CONV_TRANSPOSE_TYPES)

    def _kept_input(self, layer_input: Tensor) -> Tensor | None:
        """A transposed convolution's input ``(N, C_in, *L_in)`` in the factor dtype as EKFAC's
        features (:meth:`projected_moment`), else ``None``."""
        if not self.keep_pairs or self._keeps_patches():
            return None
        return layer_input.to(self.dtype)

    def _record_transposed_gram(self, layer_input: Tensor) -> Tensor | None:
        """Add a transposed convolution's ``Σ_n Σ_t a aᵀ`` (each group's) by phases of its
        output positions (:func:`~natgrad.curvature.kfac_capture.transposed_patch_gram`);
        returns :meth:`_kept_input`."""
        gram, count = transposed_patch_gram(
            self.module, layer_input.to(self.dtype), self.layer.has_bias, self.name
        )
        self.input_sum = gram if self.input_count == 0 else self.input_sum.add_(gram)
        self.input_count += count
        return self._kept_input(layer_input)

    def _with_ones_column(self, layer_input: Tensor) -> Tensor:
        """``[x, 1]``: :func:`~natgrad.curvature.kfac_capture.input_features` of a ``(N, d_in)``
        input with a bias, with the column of ones kept between calls."""
        ones = self._ones
        if ones is None or (ones.shape[0], ones.dtype, ones.device) != (
            layer_input.shape[0],
            layer_input.dtype,
            layer_input.device,
        ):
            ones = self._ones = layer_input.new_ones(layer_input.shape[0], 1)
        return torch.cat([layer_input, ones], dim=1)

    def eigen_inputs(self) -> list[Tensor]:
        return [self.output_factor, self.input_factor]

    def set_eigens(self, eigens: list[SymmetricEigen]) -> None:
        self.output_eigen, self.input_eigen = eigens

    def _empty_input_eigen(self) -> SymmetricEigen:
        return SymmetricEigen(
            torch.empty_like(self.input_factor[..., 0]), torch.empty_like(self.input_factor)
        )

    def _input_eigen_cost(self) -> float:
        return _cube_cost(self.input_factor)

    def _params(self) -> list[Tensor]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def grad_matrix(self) -> Tensor | None:
        weight_grad = self.weight.grad
        if weight_grad is None:
            return None
        matrix = weight_grad  # a linear layer's: its own matrix
        if weight_grad.ndim != 2:
            matrix = weight_as_matrix(self.module, weight_grad)
        if self.bias is not None:
            bias_grad = self.bias.grad
            if bias_grad is None:
                return None
            matrix = torch.column_stack((matrix, bias_grad))
        return matrix if matrix.dtype == self.dtype else matrix.to(self.dtype)

    def param_matrix(self) -> Tensor:
        return self.layer.to_matrix([param.detach() for param in self._params()]).to(self.dtype)

    def writes_scaled(self) -> bool:
        return self._inverse[1].complete

    def _write_product(
        self,
        left: Tensor,
        right: tuple[Tensor, Tensor | None] | None,
        scale: float | Tensor | None = None,
    ) -> None:
        weight_grad = self.weight.grad
        bias_grad = None if self.bias is None else self.bias.grad
        view = None
        if not isinstance(self.module, CONV_TRANSPOSE_TYPES):
            view = _matrix_view(weight_grad, self._rows, left.dtype)
        direct = view is not None and (bias_grad is None or bias_grad.dtype == left.dtype)
        if right is None:
            weight_part = left if bias_grad is None else left[:, : self._columns]
            bias_part = None if bias_grad is None else left[:, self._columns]
        elif direct:  # the last product of the solve writes into .grad
            torch.mm(left, right[0], out=view)
            if bias_grad is not None:
                torch.mv(left, right[1], out=bias_grad)
            return
        else:
            weight_part = torch.mm(left, right[0])
            bias_part = None if bias_grad is None else torch.mv(left, right[1])
        if direct:
            _copy_scaled(view, weight_part, scale)
        else:
            _copy_scaled(weight_grad, matrix_as_weight(self.module, weight_part), scale)
        if bias_grad is not None:
            _copy_scaled(bias_grad, bias_part, scale)

    def projected_moment(self) -> tuple[Tensor, Tensor] | None:
        total = torch.zeros_like(self.kfac_eigenvalues())
        count = torch.zeros((), dtype=self.dtype, device=total.device)
        for pair in self.pairs:
            total += self._pair_moment(pair)
            count += pair.samples
        self.pairs.clear()
        return total, count

    def _pair_moment(self, pair: CallPairs) -> Tensor:
        """``Σ_n (Q_Gᵀ G_n Q_A)²`` over one pair's samples: from its patches and output
        gradients (:func:`~natgrad.curvature.ekfac.projected_second_moment`), or a transposed
        convolution's from its per-sample gradients (:meth:`_transposed_gradients`)."""
        if self._keeps_patches():
            features, grads = pair.joined()
            return projected_second_moment(features, grads, self.output_eigen, self.input_eigen)
        gradients = self._transposed_gradients(pair)
        return _projected_gradient_moment(gradients, self.output_eigen, self.input_eigen)

    def _transposed_gradients(self, pair: CallPairs) -> Tensor:
        """A transposed convolution's per-sample weight-matrix gradients from a pair of its
        inputs and output-gradient rows, summed over the pass's calls
        (:func:`~natgrad.curvature.kfac_capture.transposed_per_sample_gradients`)."""
        total = None
        for layer_input, rows in zip(pair.features, pair.grads, strict=True):
            output_grad = transposed_output_grad(self.module, rows, layer_input.shape)
            gradients = transposed_per_sample_gradients(
                self.module, layer_input, output_grad, self.layer.has_bias, self.name
            )
            total = gradients if total is None else total.add_(gradients)
        return total


class GroupedConvState(KroneckerLayerState):
    """A convolution (transposed or not) with ``groups = g > 1`` (depthwise included): ``g``
    independent convolutions, group ``j`` mapping input channels ``j·C_in/g …`` to output
    channels ``j·C_out/g …`` with weight-matrix rows ``j·C_out/g …``
    (:func:`~natgrad.curvature.kfac_capture.weight_as_matrix`). Each group gets its own block
    ``G_j ⊗ A_j`` (the layer's block is block diagonal over its groups, as the model's is over
    its layers), built exactly as for an ungrouped convolution on the group's channels; the
    factors are stacked, ``(g, d, d)``, and every product is batched over the groups."""

    def __init__(
        self, name: str, module: nn.Module, keep_pairs: bool, reduce: bool = False
    ) -> None:
        super().__init__(name, module, keep_pairs, reduce)
        self.groups = module.groups
        self._rows = self.layer.output_dim // self.groups

    def _input_template(self) -> Tensor:
        size = self._columns + int(self.layer.has_bias)
        return torch.empty(self.groups, size, size, dtype=self.dtype, device=self.weight.device)

    def _output_template(self) -> Tensor:
        size = self._rows
        return torch.empty(self.groups, size, size, dtype=self.dtype, device=self.weight.device)

    def record_input(self, layer_input: Tensor) -> Tensor | None:
        """Add each group's ``Σ_n Σ_t a aᵀ`` (reduce: ``Σ_n ā āᵀ``) from its block of patch
        rows (:func:`~natgrad.curvature.kfac_capture.conv_patches`); returns the features
        ``(g, N, T, d_in [+ 1])`` if pairs are kept (EKFAC), else ``None``."""
        layer_input = layer_input.detach()
        if self._phased():
            return self._record_transposed_gram(layer_input)
        patches = None
        if self.reduce and not self._keeps_patches():
            columns = conv_patch_means(self.module, layer_input.to(self.dtype), self.name)
        else:
            patches = conv_patches(self.module, layer_input, self.name).to(self.dtype)
            columns = patches.mean(dim=2) if self.reduce else patches.flatten(1)
        columns = columns.reshape(self.groups, self._columns, -1)
        fresh = self.input_count == 0
        self.input_sum = add_column_gram(self.input_sum, columns, self.layer.has_bias, fresh)
        self.input_count += columns.shape[-1]
        if not self._keeps_patches():
            return self._kept_input(layer_input)
        return patch_features(patches, self.layer.has_bias, self.groups)

    def record_output_grad(
        self, grad: Tensor, scale: float, features: Tensor, call_pass: int, vector: int = 0
    ) -> None:
        """Add each group's ``Σ_n Σ_t g gᵀ`` (reduce: ``Σ_n ĝ ĝᵀ``) for output gradients
        ``scale · grad`` of shape ``(N, C_out, ...)`` of a call of forward pass ``call_pass``,
        from its ``vector``-th backward vector."""
        grad = grad.detach().to(self.dtype)
        samples = grad.shape[0]
        by_group = grad.reshape(samples, self.groups, self._rows, -1)  # (N, g, c, T)
        if scale != 1.0:
            by_group = by_group * scale
        rows = by_group.sum(dim=3, keepdim=True) if self.reduce else by_group
        columns = rows.permute(1, 2, 0, 3).reshape(self.groups, self._rows, -1)
        fresh = self.output_count == 0
        self.output_sum = add_column_gram(self.output_sum, columns, ones=False, fresh=fresh)
        pair = (features, by_group.permute(1, 0, 3, 2)) if self.keep_pairs else None
        self._count_samples(samples, call_pass, pair, vector)

    def eigen_inputs(self) -> list[Tensor]:
        return [*self.output_factor.unbind(), *self.input_factor.unbind()]

    def set_eigens(self, eigens: list[SymmetricEigen]) -> None:
        self.output_eigen, self.input_eigen = (
            SymmetricEigen(
                torch.stack([eigen.values for eigen in side]),
                torch.stack([eigen.vectors for eigen in side]),
            )
            for side in (eigens[: self.groups], eigens[self.groups :])
        )

    def factored_inverse_inputs(self, damping: float) -> tuple[list[Tensor], list[float]]:
        """Each group's ``G_j`` then each group's ``A_j``, with each group's π damping."""
        output_factor, input_factor = self.inverted_factors
        dampings = grouped_factored_damping(output_factor, input_factor, damping)
        matrices = [*output_factor.unbind(), *input_factor.unbind()]
        return matrices, [pair[0] for pair in dampings] + [pair[1] for pair in dampings]

    def _inverse_pair(self, inverses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        return torch.stack(inverses[: self.groups]), torch.stack(inverses[self.groups :])

    def grad_matrix(self) -> Tensor | None:
        weight_grad = self.weight.grad
        if weight_grad is None:
            return None
        bias_grad = None if self.bias is None else self.bias.grad
        if self.bias is not None and bias_grad is None:
            return None
        matrix = self.layer.to_matrix([weight_grad, bias_grad])  # (g, C_out / g, d_in [+ 1])
        return matrix if matrix.dtype == self.dtype else matrix.to(self.dtype)

    def writes_scaled(self) -> bool:
        return False

    def _write_product(
        self,
        left: Tensor,
        right: tuple[Tensor, Tensor | None] | None,
        scale: float | Tensor | None = None,
    ) -> None:
        bias_grad = None if self.bias is None else self.bias.grad
        if right is None:
            weight_part = left[..., : self._columns]
            bias_part = None if bias_grad is None else left[..., self._columns]
        else:
            weight_part = torch.matmul(left, right[0])
            bias_part = None
            if bias_grad is not None:
                bias_part = torch.matmul(left, right[1].unsqueeze(-1))
        weight_matrix = weight_part.reshape(self.layer.output_dim, -1)
        self.weight.grad.copy_(matrix_as_weight(self.module, weight_matrix))
        if bias_grad is not None:
            bias_grad.copy_(bias_part.reshape(bias_grad.shape))


class EmbeddingState(LayerState):
    """``nn.Embedding``: the weight gradient transposed, ``(d_embedding, vocabulary)``, has
    block ``G ⊗ diag(a)`` with ``a`` the token frequencies (mean over samples and positions) and
    ``G`` the output-gradient factor. Its eigenbasis is ``Q_G`` and the standard basis (``A`` is
    diagonal); EKFAC re-estimates the eigenvalues from the tokens and output gradients
    (:func:`~natgrad.curvature.ekfac.embedding_second_moment`).
    """

    def __init__(self, name: str, module: nn.Embedding, keep_pairs: bool) -> None:
        self.layer = KroneckerLayer(name, module, 0, None)
        self._columns = None
        super().__init__(name, module, keep_pairs)

    def _feature_layer(self) -> KroneckerLayer:
        return self.layer

    def _input_template(self) -> Tensor:
        vocabulary = self.weight.shape[0]
        return torch.empty(vocabulary, dtype=self.dtype, device=self.weight.device)

    def _output_template(self) -> Tensor:
        size = self.weight.shape[1]
        return torch.empty(size, size, dtype=self.dtype, device=self.weight.device)

    def record_input(self, layer_input: Tensor) -> Tensor | None:
        """Add the token counts (``padding_idx``'s as 0: its row gets no gradient, so no
        curvature, as in the builders' K-FAC); returns the tokens ``(N, T, 1)`` if pairs are
        kept (EKFAC), else ``None``."""
        tokens = layer_input.detach()
        counts = token_counts(self.module, tokens).to(self.dtype)
        self.input_sum = counts if self.input_count == 0 else self.input_sum.add_(counts)
        self.input_count += tokens.numel()
        return tokens.reshape(tokens.shape[0], -1, 1) if self.keep_pairs else None

    def eigen_inputs(self) -> list[Tensor]:
        return [self.output_factor]

    def set_eigens(self, eigens: list[SymmetricEigen]) -> None:
        (self.output_eigen,) = eigens
        self.input_eigen = SymmetricEigen(self.input_factor.clamp_min(0), None)

    def _empty_input_eigen(self) -> SymmetricEigen:
        return SymmetricEigen(torch.empty_like(self.input_factor), None)

    def _input_eigen_cost(self) -> float:
        return float(self.input_factor.shape[0])

    def grad_matrix(self) -> Tensor | None:
        grad = self.weight.grad
        if grad is None:
            return None
        if grad.is_sparse:
            raise ValueError(f"layer {self.name!r}: sparse embedding gradients are not supported")
        return grad.mT.to(self.dtype)

    def param_matrix(self) -> Tensor:
        return self.weight.detach().mT.to(self.dtype)

    def _write_product(
        self,
        left: Tensor,
        right: tuple[Tensor, Tensor | None] | None,
        scale: float | Tensor | None = None,
    ) -> None:
        self.weight.grad.copy_(left.mT)

    def projected_moment(self) -> tuple[Tensor, Tensor] | None:
        vocabulary = self.weight.shape[0]
        padding_idx = self.module.padding_idx
        total = torch.zeros_like(self.kfac_eigenvalues())
        count = torch.zeros((), dtype=self.dtype, device=total.device)
        for pair in self.pairs:
            tokens, grads = pair.joined()
            vectors = self.output_eigen.vectors
            total += embedding_second_moment(tokens, grads, vectors, vocabulary, padding_idx)
            count += pair.samples
        self.pairs.clear()
        return total, count
