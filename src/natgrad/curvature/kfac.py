"""K-FAC: Kronecker-factored Fisher blocks ``G_l ⊗ A_l`` per layer (Martens & Grosse, 2015).

The operator is block diagonal over the layers of a model, one block per ``nn.Linear``,
``nn.Conv1d``, ``nn.Conv2d``, ``nn.ConvTranspose1d``, ``nn.ConvTranspose2d`` (KFC, Grosse &
Martens 2016; a grouped convolution has one block per group, stacked as ``(g, d, d)`` factors;
a transposed one is the convolution of its zero-inserted input) or ``nn.Embedding`` (the block
``G ⊗ diag(a)`` of its transposed weight, ``a`` the token frequencies, kept as a vector ``(V,)``),
with the Fisher as the **mean** over the N data points. Factor conventions (row-major
vectorisation, bias folded into ``A``, convolution patches with ``A`` averaged and ``G`` summed
over spatial locations) are documented in :mod:`natgrad.curvature.kfac_capture` and
:mod:`natgrad.linalg.kron`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from natgrad._validation import one_of
from natgrad.curvature.base import CurvatureOperator, VectorLike
from natgrad.curvature.jacobians import check_curvature_model
from natgrad.curvature.kfac_capture import (
    CONV_TRANSPOSE_TYPES,
    CONV_TYPES,
    KFAC_APPROXIMATIONS,
    KFAC_LAYER_TYPES,
    ForwardCapture,
    KroneckerLayer,
    add_column_gram,
    backward_vectors,
    check_backward_vectors,
    check_fisher_kind,
    conv_patch_means,
    conv_patches,
    grouped_output_features,
    input_factor,
    input_features,
    join_calls,
    kronecker_layers,
    output_factor,
    output_features,
    patch_features,
    reduced_input_features,
    reduced_output_features,
    tied_parameters,
    token_frequencies,
    tokens_as_features,
    trainable_parameters,
    transposed_patch_gram,
)
from natgrad.curvature.likelihoods import Likelihood, get_likelihood
from natgrad.curvature.weight_locality import check_local_weights
from natgrad.linalg.kron import (
    SymmetricEigen,
    block_diagonal_kron,
    eigenbasis_solve,
    factor_eigh,
    factored_solve,
    kron_diagonal,
    kron_mv,
)

if TYPE_CHECKING:
    from natgrad.distributed.shards import Shard

__all__ = [
    "KFAC",
    "KroneckerBlockOperator",
    "LayerCalls",
    "LayerStatistics",
    "build_kfac",
    "collect_statistics",
    "finite_factors",
    "in_eigen_dtype",
    "kfac_from_statistics",
    "statistics_for_vectors",
    "tied_parameters",
]


@dataclass
class LayerStatistics:
    """What one forward pass and the backward vectors give for one layer.

    Attributes
    ----------
    layer : KroneckerLayer
    layer_input : Tensor
        The layer's input (detached).
    output_grads : list of Tensor of shape (N, T, d_out)
        Output gradients ``g``, one tensor per backward vector ``k``.
    kfac_approx : {"expand", "reduce"}
        How the factors treat the locations ``T`` (:mod:`natgrad.curvature.kfac_capture`); an
        embedding always expands.
    """

    layer: KroneckerLayer
    layer_input: Tensor
    output_grads: list[Tensor] = field(default_factory=list)
    kfac_approx: str = "expand"

    @cached_property
    def _patches(self) -> Tensor:
        """A convolution's feature-major patches ``(d_in, N, T)`` (gathered once)."""
        return conv_patches(self.layer.module, self.layer_input, self.layer.name)

    @property
    def reduces(self) -> bool:
        """Whether the factors are K-FAC-reduce's (``"reduce"``, but for an embedding)."""
        return self.kfac_approx == "reduce" and not self.layer.is_embedding

    @cached_property
    def inputs(self) -> Tensor:
        """Input features ``a``, shape ``(N, T, d_in [+ 1])`` (formed on first use); a grouped
        convolution's per group, ``(g, N, T, d_in [+ 1])``; an embedding's tokens, the indices
        of its one-hot features, ``(N, T, 1)``."""
        if self.layer.is_embedding:
            return tokens_as_features(self.layer_input)
        if isinstance(self.layer.module, CONV_TYPES):
            return patch_features(self._patches, self.layer.has_bias, self.layer.groups)
        return input_features(self.layer, self.layer_input)

    @property
    def grouped_output_grads(self) -> list[Tensor]:
        """:attr:`output_grads`, each as ``(g, N, T, d_out / g)`` for a grouped convolution;
        unchanged for every other layer."""
        groups = self.layer.groups
        if groups == 1:
            return self.output_grads
        return [grouped_output_features(grads, groups) for grads in self.output_grads]

    @property
    def input_factor(self) -> Tensor:
        """``A``, shape ``(d_in [+ 1], d_in [+ 1])`` (a grouped convolution's per group,
        ``(g, d_in [+ 1], d_in [+ 1])``); a convolution's from the feature-major patches, or
        with ``"reduce"`` from their means over the locations, which are summed without
        gathering the patches; a transposed convolution's (expand) from the non-zero entries of
        its expanded input alone (:func:`~natgrad.curvature.kfac_capture.transposed_patch_gram`);
        an embedding's diagonal, the token frequencies ``(V,)``
        (:func:`~natgrad.curvature.kfac_capture.token_frequencies`)."""
        reduce = self.reduces
        module = self.layer.module
        if self.layer.is_embedding:
            return token_frequencies(module, self.layer_input)
        if not isinstance(module, CONV_TYPES):
            return input_factor(reduced_input_features(self.inputs) if reduce else self.inputs)
        if isinstance(module, CONV_TRANSPOSE_TYPES) and not reduce:
            gram, count = transposed_patch_gram(
                module, self.layer_input, self.layer.has_bias, self.layer.name
            )
            return gram / count
        if reduce:
            columns = conv_patch_means(self.layer.module, self.layer_input, self.layer.name)
        else:
            columns = self._patches.flatten(1)
        if self.layer.groups > 1:
            columns = columns.reshape(self.layer.groups, -1, columns.shape[-1])
        gram = add_column_gram(None, columns, self.layer.has_bias, fresh=True)
        return gram / columns.shape[-1]

    @property
    def output_factor(self) -> Tensor:
        """``G = Σ_k 1/N Σ_n Σ_t g gᵀ`` (reduce: ``Σ_k 1/N Σ_n ĝ ĝᵀ``), shape
        ``(d_out, d_out)`` (a grouped convolution's per group, ``(g, d_out / g, d_out / g)``)."""
        grads = self.output_grads
        if self.reduces:
            grads = [reduced_output_features(features) for features in grads]
        groups = self.layer.groups
        if groups > 1:
            grads = [grouped_output_features(features, groups) for features in grads]
        return sum(output_factor(features) for features in grads)

    @property
    def input_rows(self) -> int:
        """The number of rows that :attr:`input_factor` averages: samples × locations (reduce:
        samples)."""
        samples = self.layer_input.shape[0]
        return samples if self.reduces else samples * self.output_grads[0].shape[1]


@dataclass
class LayerCalls:
    """A layer's statistics from all its calls in one forward pass, as one call's.

    One call gives its :class:`LayerStatistics` unchanged. A layer called several times
    (weight sharing across calls) applies its weight at the locations of every call, which are
    pooled (:mod:`natgrad.curvature.kfac_capture`): ``A`` averages the rows of all calls, ``G``
    sums the calls' terms, and the features join along the locations, so that the per-sample
    gradient ``Σ_t g_t a_tᵀ`` sums over the calls.

    """

    calls: list[LayerStatistics]

    @property
    def layer(self) -> KroneckerLayer:
        return self.calls[0].layer

    @property
    def inputs(self) -> Tensor:
        """Input features of all calls joined along the locations, ``(N, T, d_in [+ 1])``
        (``(g, N, T, d_in [+ 1])`` per group; an embedding's tokens ``(N, T, 1)``)."""
        return join_calls([call.inputs for call in self.calls])

    @property
    def grouped_output_grads(self) -> list[Tensor]:
        """Per backward vector, the output gradients of all calls joined along the locations."""
        per_call = [call.grouped_output_grads for call in self.calls]
        return [join_calls(grads) for grads in zip(*per_call, strict=True)]

    @property
    def input_factor(self) -> Tensor:
        """``A`` over the rows of all calls."""
        if len(self.calls) == 1:
            return self.calls[0].input_factor
        rows = [call.input_rows for call in self.calls]
        total = sum(call.input_factor * count for call, count in zip(self.calls, rows, strict=True))
        return total / sum(rows)

    @property
    def output_factor(self) -> Tensor:
        """``G``: the sum of the calls' terms."""
        return sum(call.output_factor for call in self.calls)


def collect_statistics(
    model: nn.Module,
    inputs: Tensor,
    *,
    likelihood: str | Likelihood,
    kind: str = "exact",
    targets: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    kfac_approx: str = "expand",
) -> list[LayerCalls]:
    """Run ``model(inputs)`` once and back-propagate the Fisher's vectors to every layer output.

    Arguments are those of :func:`build_kfac`. Returns one :class:`LayerCalls` per layer, in
    module order.
    """
    likelihood = get_likelihood(likelihood)
    check_fisher_kind(kind, targets, mc_samples)

    def vectors(outputs: Tensor) -> Tensor:
        return backward_vectors(outputs, likelihood, kind, targets, mc_samples, generator)

    return statistics_for_vectors(model, inputs, vectors, kfac_approx)


def statistics_for_vectors(
    model: nn.Module,
    inputs: Tensor,
    vectors_of: Callable[[Tensor], Tensor],
    kfac_approx: str = "expand",
) -> list[LayerCalls]:
    """Run ``model(inputs)`` once and back-propagate ``vectors_of(outputs)`` to every layer
    output: the statistics of the curvature ``1/N Σ_n Σ_k J_nᵀ v_nk v_nkᵀ J_n``.

    Parameters
    ----------
    model, inputs, kfac_approx
        As in :func:`build_kfac`.
    vectors_of : callable
        Maps the model's outputs ``(N, ...)`` to the backward vectors ``(K, N, D)``, ``D`` the
        size of one sample's outputs (the Fisher's: :func:`~natgrad.curvature.kfac_capture.
        backward_vectors`).

    Returns
    -------
    list of LayerCalls
        One per layer, in module order.

    Raises
    ------
    ValueError
        A model that is not one deterministic function of independent samples
        (:func:`~natgrad.curvature.jacobians.check_curvature_model`: BatchNorm or dropout in
        training mode, ...), empty inputs, a model without trainable parameters, a layer's
        parameter tied to another module's (both named), a layer not called, or called on an
        input whose dim 0 is not the batch (named), a layer whose weight or bias is also used
        outside its calls (named; :func:`~natgrad.curvature.weight_locality.
        check_local_weights`), tokens of an embedding that are not integers in ``[0, V)``
        (layer and value named), vectors of the wrong shape (both shapes named).
    """
    kfac_approx = one_of("kfac_approx", kfac_approx, KFAC_APPROXIMATIONS)
    check_curvature_model(model)
    if not isinstance(inputs, Tensor) or inputs.ndim == 0 or inputs.shape[0] == 0:
        raise ValueError("inputs must be a tensor with a non-empty leading batch dimension")
    layers = kronecker_layers(model, KFAC_LAYER_TYPES)
    if not layers:
        raise ValueError("model has no trainable parameters")
    with torch.enable_grad(), ForwardCapture(layers) as capture:
        outputs = model(inputs)
    capture.check_all_called()
    _check_batch_first(capture, len(inputs))
    check_local_weights(model, layers, capture.calls, outputs)
    vectors = vectors_of(outputs)
    matrix = outputs.reshape(len(outputs), -1)
    check_backward_vectors(vectors, matrix)
    calls = [
        (LayerStatistics(layer, layer_input, kfac_approx=kfac_approx), layer_output)
        for layer in layers
        for layer_input, layer_output in capture.calls[layer.name]
    ]
    layer_outputs = [layer_output for _, layer_output in calls]
    for vector in vectors:
        grads = torch.autograd.grad(
            matrix, layer_outputs, grad_outputs=vector, retain_graph=True, allow_unused=True
        )
        for (stats, layer_output), grad in zip(calls, grads, strict=True):
            grad = torch.zeros_like(layer_output) if grad is None else grad
            stats.output_grads.append(output_features(stats.layer, grad.detach()))
    by_layer: dict[str, list[LayerStatistics]] = {layer.name: [] for layer in layers}
    for stats, _ in calls:
        by_layer[stats.layer.name].append(stats)
    return [LayerCalls(by_layer[layer.name]) for layer in layers]


def in_eigen_dtype(matrix: Tensor, eigens: tuple[SymmetricEigen, SymmetricEigen]) -> Tensor:
    """``matrix`` in the dtype of the eigendecompositions ``eigens``: float32 for the factors
    of a float16/bfloat16 model (:func:`~natgrad.linalg.kron.symmetric_eigh`), whose
    eigenbasis products and solves run in float32 and are cast back."""
    return matrix.to(eigens[0].values.dtype)


class KroneckerBlockOperator(CurvatureOperator):
    """Block-diagonal operator with one Kronecker-structured block per layer.

    Subclasses define the block maths on stacks of ``K`` matrices ``(K, d_out, d_in [+ 1])``
    (a grouped convolution's ``(K, g, d_out / g, d_in [+ 1])``), one per column of a block of
    vectors (``K = 1`` for a vector); this class gathers each layer's weight and bias entries
    from the flat vectors and scatters the results back, so that a block of ``K`` vectors costs
    one batched product per layer.

    Parameters
    ----------
    layers : sequence of KroneckerLayer
        Covering every parameter of ``param_shapes``.
    param_shapes : sequence of torch.Size
        Shapes of the trainable parameters, in ``model.parameters()`` order.
    dtype, device

    Attributes
    ----------
    positions : list of Tensor
        Per layer, the flat positions of its matrix entries, in row-major matrix order
        (:meth:`~natgrad.curvature.kfac_capture.KroneckerLayer.flat_indices`).
    """

    def __init__(
        self,
        layers: Sequence[KroneckerLayer],
        param_shapes: Sequence[torch.Size],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(param_shapes, dtype, device)
        self.layers = list(layers)
        self.offsets = [0, *torch.tensor(self.param_numels).cumsum(0).tolist()[:-1]]
        self.positions = [layer.flat_indices(self.offsets).to(self.device) for layer in self.layers]

    def _map_blocks(self, block: Tensor, block_fn: Callable[[int, Tensor], Tensor]) -> Tensor:
        """Apply ``block_fn(index, matrices)`` to each layer's entries of the columns of
        ``block`` ``(P, K)``: ``matrices`` holds ``K`` matrices of the layer's layout,
        ``(K, d_out, d_in [+ 1])`` (a grouped convolution's ``(K, g, d_out / g, d_in [+ 1])``),
        and ``block_fn`` returns the same shape."""
        result = torch.zeros_like(block)
        columns = block.shape[1]
        for index, (layer, positions) in enumerate(zip(self.layers, self.positions, strict=True)):
            rows, width = layer.output_dim, len(positions) // layer.output_dim
            layout = (
                (rows, width) if layer.groups == 1 else (layer.groups, rows // layer.groups, width)
            )
            matrices = block[positions].T.reshape(columns, *layout)
            result[positions] = block_fn(index, matrices).reshape(columns, -1).T
        return result

    def _mv_flat(self, vector: Tensor) -> Tensor:
        return self._mm_flat(vector.unsqueeze(1)).squeeze(1)

    def _mm_flat(self, block: Tensor) -> Tensor:
        return self._map_blocks(block, self._block_mv)

    def _solve_flat(self, vector: Tensor, damping: float) -> Tensor:
        return self._solve_block(vector.unsqueeze(1), damping).squeeze(1)

    def _solve_block(self, block: Tensor, damping: float) -> Tensor:
        return self._map_blocks(
            block, lambda index, matrices: self._block_solve(index, matrices, damping)
        )

    def _diag_flat(self) -> Tensor:
        diagonal = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        for index, positions in enumerate(self.positions):
            diagonal[positions] = self._block_diag(index).reshape(-1).to(self.dtype)
        return diagonal

    def _to_dense(self) -> Tensor:
        dense = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        for index, positions in enumerate(self.positions):
            block = self._block_dense(index).to(self.dtype)
            dense[positions.unsqueeze(1), positions.unsqueeze(0)] = block
        return dense

    def _block_mv(self, index: int, matrix: Tensor) -> Tensor:
        raise NotImplementedError

    def _block_solve(self, index: int, matrix: Tensor, damping: float) -> Tensor:
        raise NotImplementedError

    def _block_diag(self, index: int) -> Tensor:
        raise NotImplementedError

    def _block_dense(self, index: int) -> Tensor:
        raise NotImplementedError


class KFAC(KroneckerBlockOperator):
    """K-FAC approximation of the Fisher (mean over data points): ``diag_l(G_l ⊗ A_l)``.

    Build it with :func:`build_kfac`. ``solve(g, damping)`` applies exact eigenbasis damping
    ``(G ⊗ A + λI)⁻¹`` per block (at ``damping=0`` the pseudo-inverse, eigenvalues at round-off
    level treated as zero); :meth:`solve_factored` applies factored π-damping instead. The
    solves of a float16/bfloat16 model run in float32 and are cast back.

    Attributes
    ----------
    layers : list of KroneckerLayer
    output_factors : list of Tensor
        ``G_l``, shape ``(d_out, d_out)``.
    input_factors : list of Tensor
        ``A_l``, shape ``(d_in [+ 1], d_in [+ 1])``; an embedding's is diagonal, held as its
        diagonal ``a`` of shape ``(V,)`` (the token frequencies).
    """

    def __init__(
        self,
        layers: Sequence[KroneckerLayer],
        output_factors: Sequence[Tensor],
        input_factors: Sequence[Tensor],
        param_shapes: Sequence[torch.Size],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(layers, param_shapes, dtype, device)
        self.output_factors = list(output_factors)
        self.input_factors = list(input_factors)
        self._eigens: dict[int, tuple[SymmetricEigen, SymmetricEigen]] = {}

    def eigens(self, index: int) -> tuple[SymmetricEigen, SymmetricEigen]:
        """Eigendecompositions ``(G_l, A_l)`` of layer ``index`` (computed once, cached); a
        diagonal ``A_l``'s is the standard basis (:func:`~natgrad.linalg.kron.factor_eigh`)."""
        if index not in self._eigens:
            self._eigens[index] = (
                factor_eigh(self.output_factors[index]),
                factor_eigh(self.input_factors[index]),
            )
        return self._eigens[index]

    def solve_factored(self, vector: VectorLike, damping: float) -> VectorLike:
        """Solve with factored π-damping: ``(G + λ_G I)⁻¹ ⊗ (A + λ_A I)⁻¹`` per block.

        ``λ_G = √λ / π``, ``λ_A = π √λ`` with ``π² = (tr A / d_A) / (tr G / d_G)`` (Martens &
        Grosse 2015, section 6.3). Cheaper to keep up to date than exact damping, but only an
        approximation of ``(C + λI)⁻¹``. ``vector`` is taken as by :meth:`solve`: ``(P,)``,
        a block ``(P, K)`` or a list, in the operator's dtype.

        Raises
        ------
        TypeError
            If ``vector`` is not in the operator's dtype (both named).
        ValueError
            If ``damping`` is not a finite positive number, or ``vector`` has the wrong shape
            or contains infs or NaNs.
        """
        if not (math.isfinite(damping) and damping > 0):
            raise ValueError(f"factored damping must be finite and positive, got {damping!r}")
        flat, was_list = self._checked(vector)

        def block_solve(index: int, matrices: Tensor) -> Tensor:
            eigens = self.eigens(index)
            solution = factored_solve(*eigens, in_eigen_dtype(matrices, eigens), float(damping))
            return solution.to(matrices.dtype)

        columns = flat.unsqueeze(1) if flat.ndim == 1 else flat
        solution = self._map_blocks(columns, block_solve).reshape(flat.shape)
        return self._as_input_form(solution, was_list)

    def _block_mv(self, index: int, matrix: Tensor) -> Tensor:
        return kron_mv(self.output_factors[index], self.input_factors[index], matrix)

    def _block_solve(self, index: int, matrix: Tensor, damping: float) -> Tensor:
        output_eigen, input_eigen = self.eigens(index)
        eigenvalues = output_eigen.values.unsqueeze(-1) * input_eigen.values.unsqueeze(-2)
        working = in_eigen_dtype(matrix, (output_eigen, input_eigen))
        solution = eigenbasis_solve(output_eigen, input_eigen, eigenvalues, working, damping)
        return solution.to(matrix.dtype)

    def _block_diag(self, index: int) -> Tensor:
        return kron_diagonal(self.output_factors[index], self.input_factors[index])

    def _block_dense(self, index: int) -> Tensor:
        return block_diagonal_kron(self.output_factors[index], self.input_factors[index])


def build_kfac(
    model: nn.Module,
    inputs: Tensor,
    *,
    likelihood: str | Likelihood,
    kind: str = "exact",
    targets: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    kfac_approx: str = "expand",
) -> KFAC:
    """K-FAC Fisher of ``model`` on ``inputs`` (mean over the N data points).

    Parameters
    ----------
    model : nn.Module
        Every trainable parameter must belong to an ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``,
        ``nn.ConvTranspose1d``, ``nn.ConvTranspose2d`` or ``nn.Embedding`` called in the forward
        pass. A grouped convolution (``groups = g``) gets one Kronecker block per group, the
        blocks of ``g`` separate convolutions on the groups' channels. An embedding's block is
        ``G ⊗ diag(a)`` over its transposed weight ``(d, V)``, ``a`` the token frequencies
        (``0`` at ``padding_idx``), kept as a vector. A layer called several times pools the
        locations of its calls as one call's (:mod:`natgrad.curvature.kfac_capture`).
    inputs : Tensor of shape (N, ...)
    likelihood : str or Likelihood
        ``"categorical"``, ``"gaussian"``, ``"bernoulli"``, ``"poisson"`` or an instance.
    kind : {"exact", "mc", "empirical"}, default "exact"
        ``"exact"`` back-propagates the C columns of ``∇²A(f)^{1/2}``; ``"mc"`` the gradients of
        the NLL at ``mc_samples`` sampled targets per point (averaged); ``"empirical"`` the
        gradient at the observed ``targets``.
    targets : Tensor, optional
        Observed targets, required for ``kind="empirical"``.
    mc_samples : int, default 1
    generator : torch.Generator, optional
        Randomness for ``kind="mc"``.
    kfac_approx : {"expand", "reduce"}, default "expand"
        For layers with several locations ``T`` per sample (convolutions, ``Linear`` on
        ``(N, ..., d_in)`` inputs): ``"expand"`` treats every location as a sample (KFC);
        ``"reduce"`` averages each sample's inputs and sums its output gradients over the
        locations first (Eschenhagen et al. 2023), ``T`` times cheaper and exact when the inputs
        do not vary over the locations. Embeddings always expand (a reduced ``A`` would be
        dense). See :mod:`natgrad.curvature.kfac_capture`.

    Returns
    -------
    KFAC
        Over all trainable parameters in ``model.parameters()`` order.

    Raises
    ------
    ValueError
        For a trainable parameter outside Linear/Conv1d/Conv2d/ConvTranspose1d/ConvTranspose2d/
        Embedding layers (named in the message, with its module's type: an ``nn.EmbeddingBag``,
        ...), an embedding's tokens that are not integers in ``[0, V)`` (layer and value named),
        a layer's parameter tied to another module's (an output layer's, another layer's bias), a
        model refused by :func:`~natgrad.curvature.jacobians.check_curvature_model` (BatchNorm
        or dropout in training mode, ...), an unknown ``kind``, likelihood or ``kfac_approx``,
        missing targets, a layer not called, or called on an input whose dim 0 is not the
        batch, a layer whose weight or bias is also used outside its calls (``F.linear(x,
        layer.weight)``, a decoder applying an encoder's weight: the hooks on the layer do not
        see that use).
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
    return kfac_from_statistics(model, statistics)


def _check_batch_first(capture: ForwardCapture, samples: int) -> None:
    """Every call of every layer must see the batch's samples along dim 0 of its input: the
    factors average over that dim as the samples."""
    for name, calls in capture.calls.items():
        for layer_input, _ in calls:
            if layer_input.shape[0] != samples:
                raise ValueError(
                    f"layer {name!r} was called on an input of shape {tuple(layer_input.shape)}, "
                    f"whose dim 0 is not the batch's {samples} samples; Kronecker factors need "
                    "the samples along dim 0 of every layer's input (batch_first=True for "
                    "sequence models, (N, T, d) rather than (N T, d) inputs)"
                )


def finite_factors(
    statistics: Sequence[LayerCalls], shard: Shard | None = None
) -> list[tuple[Tensor, Tensor]]:
    """``(G_l, A_l)`` of each layer's statistics, checked finite (one read-back for all).

    With a ``shard`` (:class:`~natgrad.distributed.shards.Shard`), the factors are those of
    its global batch: the processes' means weighted by their shares and summed (one
    all-reduce), before the check, so that every process raises alike.

    Raises
    ------
    ValueError
        Naming the first layer with a non-finite factor (NaN or infinite model outputs or
        layer inputs, or an overflow in the model's dtype).
    """
    factors = [(stats.output_factor, stats.input_factor) for stats in statistics]
    if shard is not None:
        shard.mean_([factor for pair in factors for factor in pair])
    finite = torch.stack([torch.isfinite(factor).all() for pair in factors for factor in pair])
    if not bool(finite.all()):
        stats = statistics[int((~finite).nonzero()[0]) // 2]
        raise ValueError(
            f"the Kronecker factors of layer {stats.layer.name!r} are not finite: NaN or "
            "infinite model outputs or layer inputs, or an overflow in "
            f"{stats.layer.module.weight.dtype}"
        )
    return factors


def kfac_from_statistics(
    model: nn.Module, statistics: Sequence[LayerCalls], shard: Shard | None = None
) -> KFAC:
    """The K-FAC operator of ``model`` from its layers' statistics
    (:func:`collect_statistics`, :func:`statistics_for_vectors`); with a ``shard``, of its
    global batch (:func:`finite_factors`).

    Raises
    ------
    ValueError
        If a layer's factors are not finite (:func:`finite_factors`).
    """
    params = trainable_parameters(model)
    factors = finite_factors(statistics, shard)
    return KFAC(
        [stats.layer for stats in statistics],
        [output_factor for output_factor, _ in factors],
        [input_factor for _, input_factor in factors],
        [param.shape for param in params],
        params[0].dtype,
        params[0].device,
    )
