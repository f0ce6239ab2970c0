"""EKFAC: eigenvalue-corrected K-FAC (George et al., 2018).

Each layer block keeps K-FAC's Kronecker eigenbasis ``Q_G ⊗ Q_A`` but replaces the Kronecker
eigenvalues ``outer(g, a)`` by the second moment of the per-sample gradients projected onto that
basis,

    S_ij = 1/N Σ_n Σ_k (Q_Gᵀ ∇W_nk Q_A)_ij²,

the Fisher being the **mean** over the N data points (``k`` runs over the backward vectors of
the Fisher kind). ``S`` is the diagonal of ``(Q_G ⊗ Q_A)ᵀ F_l (Q_G ⊗ Q_A)``, so EKFAC is the
Frobenius-closest matrix to the exact block ``F_l`` that is diagonal in K-FAC's eigenbasis.
An ``nn.Embedding``'s ``A`` is diagonal: its basis is ``Q_G`` and the standard one, and ``S``
comes from its tokens and output gradients (:func:`embedding_second_moment`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from natgrad.curvature.kfac import (
    KroneckerBlockOperator,
    LayerCalls,
    collect_statistics,
    finite_factors,
    in_eigen_dtype,
)
from natgrad.curvature.kfac_capture import KroneckerLayer, trainable_parameters
from natgrad.curvature.likelihoods import Likelihood
from natgrad.linalg.kron import SymmetricEigen, eigenbasis_mv, eigenbasis_solve, factor_eigh

if TYPE_CHECKING:
    from natgrad.distributed.shards import Shard

__all__ = [
    "EKFAC",
    "build_ekfac",
    "ekfac_from_statistics",
    "embedding_second_moment",
    "projected_second_moment",
]


def projected_second_moment(
    inputs: Tensor,
    output_grads: Tensor,
    output_eigen: SymmetricEigen,
    input_eigen: SymmetricEigen,
) -> Tensor:
    """``Σ_n (Q_Gᵀ (Σ_t g_nt a_ntᵀ) Q_A)²``, the SUM over samples; shape ``(d_out, d_in)``.

    Parameters
    ----------
    inputs : Tensor of shape (N, T, d_in), or (g, N, T, d_in) for the groups of a grouped
        convolution
    output_grads : Tensor of shape (N, T, d_out), or (g, N, T, d_out)
    output_eigen, input_eigen : SymmetricEigen
        Eigenbases of ``G`` and ``A`` (vectors ``(g, d, d)`` with groups).

    Returns
    -------
    Tensor of shape (d_out, d_in), or (g, d_out, d_in)
    """
    projected_inputs = _project(inputs, input_eigen.vectors)
    projected_grads = _project(output_grads, output_eigen.vectors)
    if inputs.shape[-2] == 1:
        return projected_grads[..., 0, :].square().mT @ projected_inputs[..., 0, :].square()
    coordinates = torch.einsum("...nto,...nti->...noi", projected_grads, projected_inputs)
    return coordinates.square().sum(-3)


def embedding_second_moment(
    tokens: Tensor,
    output_grads: Tensor,
    output_vectors: Tensor,
    vocabulary: int,
    padding_idx: int | None = None,
) -> Tensor:
    """:func:`projected_second_moment` of an embedding: ``Σ_n (Q_Gᵀ Σ_t g_nt e_{x_nt}ᵀ)²``, the
    SUM over samples; shape ``(d, vocabulary)``.

    The weight gradient of sample ``n`` (transposed, ``(d, vocabulary)``) has in column ``v``
    the sum of the output gradients at the positions holding token ``v``; ``A`` is diagonal, so
    its eigenbasis is the standard one and only ``Q_G`` projects. Positions are summed per
    (sample, token) pair by index, so no ``(N, vocabulary, d)`` tensor is formed.

    Parameters
    ----------
    tokens : Tensor of shape (N, T, 1), integer
        Token indices ``x_nt``.
    output_grads : Tensor of shape (N, T, d)
        Per-sample output gradients ``g_nt``.
    output_vectors : Tensor of shape (d, d)
        Eigenvectors ``Q_G`` of ``G``.
    vocabulary : int
    padding_idx : int, optional
        A token whose embedding gets no gradient (``nn.Embedding``'s ``padding_idx``; a
        negative one counts from the end of the vocabulary, as there).

    Raises
    ------
    ValueError
        Shapes that do not fit together (named), non-integer tokens, (on the CPU) tokens
        outside ``[0, vocabulary)``, or ``padding_idx`` outside ``[-vocabulary, vocabulary)``.
    """
    _check_embedding_pairs(tokens, output_grads, output_vectors, vocabulary)
    if padding_idx is not None:
        if not -vocabulary <= padding_idx < vocabulary:
            raise ValueError(
                f"padding_idx must lie in [-{vocabulary}, {vocabulary}), got {padding_idx}"
            )
        padding_idx %= vocabulary
    samples, locations = tokens.shape[:2]
    ids = tokens.reshape(-1)
    projected = (output_grads @ output_vectors).reshape(samples * locations, -1)
    rows = torch.arange(samples, device=ids.device).repeat_interleave(locations)
    if padding_idx is not None:
        kept = ids != padding_idx
        ids, rows, projected = ids[kept], rows[kept], projected[kept]
    pairs, pair_of_position = torch.unique(rows * vocabulary + ids, return_inverse=True)
    per_pair = projected.new_zeros(len(pairs), projected.shape[-1])
    per_pair.index_add_(0, pair_of_position, projected)
    moment = projected.new_zeros(vocabulary, projected.shape[-1])
    return moment.index_add_(0, pairs % vocabulary, per_pair.square()).mT


def _check_embedding_pairs(
    tokens: Tensor, output_grads: Tensor, output_vectors: Tensor, vocabulary: int
) -> None:
    shapes = f"tokens {tuple(tokens.shape)}, output_grads {tuple(output_grads.shape)}"
    width = output_grads.shape[-1] if output_grads.ndim == 3 else None
    if (
        tokens.ndim != 3
        or tokens.shape[-1] != 1
        or output_grads.shape[:2] != tokens.shape[:2]
        or output_vectors.shape != (width, width)
    ):
        raise ValueError(
            f"expected tokens (N, T, 1), output_grads (N, T, d) and output_vectors (d, d), got "
            f"{shapes} and output_vectors {tuple(output_vectors.shape)}"
        )
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be integer indices, got dtype {tokens.dtype}")
    if tokens.device.type != "cpu" or not tokens.numel():
        return  # on an accelerator a range check would wait for the device
    if not (0 <= int(tokens.min()) and int(tokens.max()) < vocabulary):
        raise ValueError(
            f"tokens must lie in [0, {vocabulary}), got [{int(tokens.min())}, {int(tokens.max())}]"
        )


def _project(features: Tensor, vectors: Tensor) -> Tensor:
    """``features @ vectors`` for features ``(N, T, d)`` and a basis ``(d, d)``, or per group
    for ``(g, N, T, d)`` and ``(g, d, d)`` (one batched product)."""
    if vectors.ndim == 2:
        return features @ vectors
    rows = features.reshape(features.shape[0], -1, features.shape[-1])
    return (rows @ vectors).reshape(*features.shape[:-1], vectors.shape[-1])


class EKFAC(KroneckerBlockOperator):
    """EKFAC approximation of the Fisher (mean over data points), block diagonal over layers.

    Block ``l`` is ``(Q_G ⊗ Q_A) diag(vec S_l) (Q_G ⊗ Q_A)ᵀ``. ``solve(g, damping)`` applies
    ``(block + λI)⁻¹`` exactly in the eigenbasis. Build it with :func:`build_ekfac`.

    Attributes
    ----------
    layers : list of KroneckerLayer
    eigenbases : list of (SymmetricEigen, SymmetricEigen)
        Eigendecompositions of ``(G_l, A_l)`` (an embedding's ``A_l`` diagonal: the standard
        basis, ``vectors=None``).
    eigenvalues : list of Tensor
        ``S_l``, shape ``(d_out, d_in [+ 1])``, in the eigenbases' dtype (float32 for a
        float16/bfloat16 model, whose products and solves run in float32 and are cast back).
    """

    def __init__(
        self,
        layers: Sequence[KroneckerLayer],
        eigenbases: Sequence[tuple[SymmetricEigen, SymmetricEigen]],
        eigenvalues: Sequence[Tensor],
        param_shapes: Sequence[torch.Size],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(layers, param_shapes, dtype, device)
        self.eigenbases = list(eigenbases)
        self.eigenvalues = list(eigenvalues)

    def _block_mv(self, index: int, matrix: Tensor) -> Tensor:
        eigens = self.eigenbases[index]
        working = in_eigen_dtype(matrix, eigens)
        return eigenbasis_mv(*eigens, self.eigenvalues[index], working).to(matrix.dtype)

    def _block_solve(self, index: int, matrix: Tensor, damping: float) -> Tensor:
        eigens = self.eigenbases[index]
        working = in_eigen_dtype(matrix, eigens)
        solution = eigenbasis_solve(*eigens, self.eigenvalues[index], working, damping)
        return solution.to(matrix.dtype)

    def _block_diag(self, index: int) -> Tensor:
        output_eigen, input_eigen = self.eigenbases[index]
        diagonal = output_eigen.vectors.square() @ self.eigenvalues[index]
        if input_eigen.vectors is None:  # the standard basis
            return diagonal
        return diagonal @ input_eigen.vectors.square().mT

    def _block_dense(self, index: int) -> Tensor:
        output_eigen, input_eigen = self.eigenbases[index]
        eigenvalues = self.eigenvalues[index]
        if eigenvalues.ndim == 2:
            return _eigenbasis_dense(output_eigen.vectors, input_eigen.vectors, eigenvalues)
        groups = zip(output_eigen.vectors, input_eigen.vectors, eigenvalues, strict=True)
        return torch.block_diag(*(_eigenbasis_dense(*group) for group in groups))


def _eigenbasis_dense(
    output_vectors: Tensor, input_vectors: Tensor | None, eigenvalues: Tensor
) -> Tensor:
    """``(Q_G ⊗ Q_A) diag(vec S) (Q_G ⊗ Q_A)ᵀ`` as a dense matrix (``Q_A = I`` for ``None``)."""
    if input_vectors is None:
        input_vectors = torch.eye(
            eigenvalues.shape[-1], dtype=output_vectors.dtype, device=output_vectors.device
        )
    basis = torch.kron(output_vectors, input_vectors)
    return basis @ torch.diag(eigenvalues.reshape(-1)) @ basis.mT


def build_ekfac(
    model: nn.Module,
    inputs: Tensor,
    *,
    likelihood: str | Likelihood,
    kind: str = "exact",
    targets: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    kfac_approx: str = "expand",
) -> EKFAC:
    """EKFAC Fisher of ``model`` on ``inputs`` (mean over the N data points).

    Arguments, supported models and errors are those of
    :func:`natgrad.curvature.kfac.build_kfac`; the eigenbases and the re-estimated eigenvalues
    come from the same forward pass and backward vectors. ``kfac_approx`` chooses the factors
    whose eigenbases are used; the eigenvalues are always the second moments of the exact
    per-sample gradients ``Σ_t g_t a_tᵀ`` in that basis.

    Returns
    -------
    EKFAC
        Over all trainable parameters in ``model.parameters()`` order.
    """
    statistics = collect_statistics(
        model,
        inputs,
        likelihood=likelihood,
        kind=kind,
        targets=targets,
        mc_samples=mc_samples,
        generator=generator,
        kfac_approx=kfac_approx,
    )
    return ekfac_from_statistics(model, statistics)


def _refit_eigenvalues(stats: LayerCalls, eigens: tuple[SymmetricEigen, SymmetricEigen]) -> Tensor:
    """``S`` of one layer, ``(d_out, d_in [+ 1])`` (per group ``(g, ...)``): the mean over the
    samples of :func:`projected_second_moment` (an embedding's: of
    :func:`embedding_second_moment`), in the eigenbases' dtype (float32 for a float16/bfloat16
    model)."""
    if stats.layer.is_embedding:
        return _refit_embedding_eigenvalues(stats, eigens[0])
    inputs = in_eigen_dtype(stats.inputs, eigens)
    moments = (
        projected_second_moment(inputs, in_eigen_dtype(grads, eigens), *eigens)
        for grads in stats.grouped_output_grads
    )
    return sum(moments) / inputs.shape[-3]


def _refit_embedding_eigenvalues(stats: LayerCalls, output_eigen: SymmetricEigen) -> Tensor:
    """``S`` of an embedding, ``(d, V)``: the mean over the samples of
    :func:`embedding_second_moment` (zero in the column of ``padding_idx``)."""
    module, tokens = stats.layer.module, stats.inputs
    vectors = output_eigen.vectors
    moments = (
        embedding_second_moment(
            tokens, grads.to(vectors.dtype), vectors, module.num_embeddings, module.padding_idx
        )
        for grads in stats.grouped_output_grads
    )
    return sum(moments) / tokens.shape[0]


def ekfac_from_statistics(
    model: nn.Module, statistics: Sequence[LayerCalls], shard: Shard | None = None
) -> EKFAC:
    """The EKFAC operator of ``model`` from its layers' statistics
    (:func:`~natgrad.curvature.kfac.collect_statistics`,
    :func:`~natgrad.curvature.kfac.statistics_for_vectors`).

    With a ``shard`` (:class:`~natgrad.distributed.shards.Shard`) it is that of its global
    batch: the eigenbases are those of the global batch's factors
    (:func:`~natgrad.curvature.kfac.finite_factors`), in which each process projects its own
    samples' gradients; the eigenvalues are then averaged as the factors are (two all-reduces
    in all).

    Raises
    ------
    ValueError
        If a layer's factors are not finite (:func:`~natgrad.curvature.kfac.finite_factors`).
    """
    eigenbases = [
        (factor_eigh(output_factor), factor_eigh(input_factor))
        for output_factor, input_factor in finite_factors(statistics, shard)
    ]
    eigenvalues = [
        _refit_eigenvalues(stats, eigens)
        for stats, eigens in zip(statistics, eigenbases, strict=True)
    ]
    if shard is not None:
        shard.mean_(eigenvalues)
    params = trainable_parameters(model)
    return EKFAC(
        [stats.layer for stats in statistics],
        eigenbases,
        eigenvalues,
        [param.shape for param in params],
        params[0].dtype,
        params[0].device,
    )
