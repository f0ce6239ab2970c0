"""Top-level curvature builders: :func:`fisher`, :func:`ggn` and :func:`hessian`.

Every builder returns a :class:`~natgrad.curvature.base.CurvatureOperator` over the flat vector of
the model's *trainable* parameters (those with ``requires_grad=True``, in ``model.parameters()``
order; frozen parameters are left out). Computations run in the dtype of the model's parameters.

The Fisher is the MEAN over the ``N`` inputs, ``F = 1/N Σₙ Jₙᵀ Bₙ Jₙ``, never the sum. The
dense, diagonal and block structures are assembled from per-sample rows ``Wₙ = Rₙᵀ Jₙ`` (``Jₙ``
the per-sample output Jacobian from ``torch.func.vmap(jacrev(...))`` and ``Rₙ Rₙᵀ = Bₙ``), so no
per-sample ``P × P`` matrix is formed, and ``"diag"``/``"block"`` never form the ``P × P`` one.
The Fisher diagonal of models whose trainable parameters all belong to ``nn.Linear`` /
``nn.Conv2d`` layers is taken per layer from captured layer inputs and output gradients
(:func:`~natgrad.curvature.layer_diagonal.layer_fisher_diagonal`, as BackPACK does), which is
much cheaper than the per-sample rows; other models take the generic path. The K-FAC and
EKFAC structures of the Fisher and of the GGN share the capture of
:func:`~natgrad.curvature.kfac.statistics_for_vectors`, which back-propagates the Fisher's
backward vectors or the square roots of the loss's per-sample output Hessians.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap
from torch.func import hessian as func_hessian

from natgrad.curvature.base import CurvatureOperator
from natgrad.curvature.block import BlockDiagonal
from natgrad.curvature.dense import Dense
from natgrad.curvature.diagonal import Diagonal
from natgrad.curvature.ekfac import ekfac_from_statistics
from natgrad.curvature.implicit import Implicit, check_cg_options
from natgrad.curvature.jacobians import (
    ModelFunction,
    check_curvature_model,
    check_finite_inputs,
)
from natgrad.curvature.kfac import (
    LayerCalls,
    collect_statistics,
    kfac_from_statistics,
    statistics_for_vectors,
)
from natgrad.curvature.kfac_capture import (
    KFAC_APPROXIMATIONS,
    backward_vectors,
    trainable_parameters,
)
from natgrad.curvature.layer_diagonal import LayerPass, layer_diagonal_for_vectors
from natgrad.curvature.likelihoods import Likelihood, as_matrix, get_likelihood
from natgrad.curvature.loss_hessians import output_hessian_roots
from natgrad.distributed.agreement import Agreement
from natgrad.distributed.shards import GlobalBatch, Shard

LossFn = Callable[[Tensor, Tensor], Tensor]

FISHER_KINDS = ("exact", "mc", "empirical")
FISHER_STRUCTURES = ("dense", "diag", "block", "kfac", "ekfac", "implicit")
LOSS_STRUCTURES = ("dense", "diag", "block", "implicit")
GGN_STRUCTURES = (*LOSS_STRUCTURES, "kfac", "ekfac")
ROW_BUDGET = 2**22
"""Entries of per-sample rows ``Wₙ`` held at once while the Fisher is assembled (chunking)."""


# -- validation --------------------------------------------------------------------------------
def _check_choice(argument: str, value: object, known: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in known:
        raise ValueError(f"unknown {argument} {value!r}; expected one of {list(known)}")


def _check_targets(targets: Tensor, num_samples: int) -> None:
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.ndim == 0 or targets.shape[0] != num_samples:
        raise ValueError(
            f"targets must have {num_samples} entries along dim 0 (one per input), "
            f"got shape {tuple(targets.shape)}"
        )
    if targets.is_floating_point() and not bool(torch.isfinite(targets).all()):
        raise ValueError("targets must not contain infs or NaNs")


def _check_mc_samples(mc_samples: int) -> None:
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int):
        raise TypeError(f"mc_samples must be an int, got {type(mc_samples).__name__}")
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be at least 1, got {mc_samples}")


def _check_kfac_approx(kfac_approx: str, structure: str) -> None:
    _check_choice("kfac_approx", kfac_approx, KFAC_APPROXIMATIONS)
    if kfac_approx != "expand" and structure not in ("kfac", "ekfac"):
        raise ValueError(
            f"kfac_approx={kfac_approx!r} applies to structure='kfac' or 'ekfac', "
            f"got structure={structure!r}"
        )


def checked_cg_options(
    structure: str, cg_rtol: object, cg_max_iter: object
) -> dict[str, float | int | None]:
    """The implicit operator's conjugate-gradient options, checked
    (:func:`~natgrad.curvature.implicit.check_cg_options`); refused with another structure,
    which they would not affect."""
    rtol, max_iter = check_cg_options(cg_rtol, cg_max_iter)
    options = {"cg_rtol": rtol, "cg_max_iter": max_iter}
    for name, value in options.items():
        if value is not None and structure != "implicit":
            raise ValueError(
                f"{name}={value!r} applies to structure='implicit' (conjugate-gradient solves), "
                f"got structure={structure!r}"
            )
    return options


def _num_samples(inputs: Tensor) -> int:
    check_finite_inputs(inputs)
    return inputs.shape[0]


def _shard(global_batch: GlobalBatch | None, num_samples: int, agreement: Agreement) -> Shard:
    """This process's :class:`~natgrad.distributed.shards.Shard` of ``global_batch``, or the
    whole batch where there is none; ``agreement`` rides on the all-reduce of the counts."""
    if global_batch is None:
        return Shard.whole(num_samples)
    return global_batch.shard(num_samples, agreement)


# -- assembly from per-sample rows --------------------------------------------------------------
class _SandwichSum:
    """Accumulates ``Σ leftᵀ right`` over row chunks in one structure, then scales it."""

    def __init__(self, structure: str, function: ModelFunction) -> None:
        self.structure = structure
        self.function = function
        size = sum(function.param_numels)
        options = {"dtype": function.dtype, "device": function.device}
        if structure == "dense":
            self.total: Tensor | list[Tensor] = torch.zeros(size, size, **options)
        elif structure == "diag":
            self.total = torch.zeros(size, **options)
        else:
            self.total = [torch.zeros(n, n, **options) for n in function.param_numels]

    @property
    def parts(self) -> list[Tensor]:
        """The tensors holding the sum."""
        return self.total if isinstance(self.total, list) else [self.total]

    def add(self, left: Tensor, right: Tensor) -> None:
        """Add ``leftᵀ right`` for row blocks ``left``, ``right`` of shape ``(m, P)``."""
        if self.structure == "dense":
            self.total += left.T @ right
        elif self.structure == "diag" and left is right:
            self.total += left.square().sum(0)
        elif self.structure == "diag":
            self.total += (left * right).sum(0)
        else:
            numels = self.function.param_numels
            pieces = zip(left.split(numels, dim=1), right.split(numels, dim=1), strict=True)
            for block, (left_part, right_part) in zip(self.total, pieces, strict=True):
                block += left_part.T @ right_part

    def operator(self, scale: float) -> CurvatureOperator:
        """The accumulated sum times ``scale``, symmetrised, as an operator."""
        shapes = self.function.param_shapes
        if self.structure == "dense":
            return Dense(_symmetrised(self.total) * scale, shapes)
        if self.structure == "diag":
            return Diagonal(self.total * scale, shapes)
        return BlockDiagonal([_symmetrised(block) * scale for block in self.total], shapes)


def _symmetrised(matrix: Tensor) -> Tensor:
    return 0.5 * (matrix + matrix.T)


# -- Fisher ---------------------------------------------------------------------------------------
def output_factors(
    likelihood: Likelihood,
    outputs: Tensor,
    kind: str,
    targets: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample output-space factors ``Rₙ`` with ``Fisher = 1/N Σₙ Jₙᵀ Rₙ Rₙᵀ Jₙ``.

    Parameters
    ----------
    likelihood : Likelihood
    outputs : Tensor of shape (N, C)
        Model outputs (natural parameters of p(y | f)).
    kind : {"exact", "mc", "empirical"}
        ``"exact"``: ``Rₙ = ∇²A(fₙ)^{1/2}`` (``C`` columns). ``"mc"``: column ``m`` is
        ``∇_f nll(fₙ, y_nm) / √M`` with ``y_·m = likelihood.sample(outputs, generator)`` drawn
        for ``m = 0, …, M − 1`` in turn (``M = mc_samples``). ``"empirical"``: the single column
        ``∇_f nll(fₙ, yₙ)`` at the observed ``targets``.

    Returns
    -------
    Tensor of shape (N, C, K)

    Raises
    ------
    ValueError
        If a factor is not finite (outputs outside the likelihood's domain, e.g. NaN, or an
        overflow in the outputs' dtype); the message names the first such sample.
    """
    if kind == "exact":
        factors = likelihood.natural_hessian_sqrt(outputs)
    elif kind == "empirical":
        likelihood.check_observed(outputs, targets)
        factors = likelihood.nll_gradient(outputs, targets).unsqueeze(-1)
    else:
        draws = [
            likelihood.nll_gradient(outputs, likelihood.sample(outputs, generator))
            for _ in range(mc_samples)
        ]
        factors = torch.stack(draws, dim=-1) / math.sqrt(mc_samples)
    _check_finite_factors(factors, outputs, likelihood, kind)
    return factors


def _check_finite_factors(
    factors: Tensor, outputs: Tensor, likelihood: Likelihood, kind: str
) -> None:
    """Raise, naming the first sample and its outputs, unless every factor is finite."""
    finite = torch.isfinite(factors).flatten(1).all(dim=1)
    if not bool(finite.all()):
        sample = int((~finite).nonzero()[0])
        raise ValueError(
            f"the {kind} Fisher of the {likelihood.name} likelihood is not finite at sample "
            f"{sample}, model outputs {as_matrix(outputs)[sample].tolist()} (NaN, infinite, or "
            f"overflowing in {outputs.dtype})"
        )


def _assembled_sum(
    function: ModelFunction,
    factors: Tensor,
    structure: str,
    scale: float,
    weights: Tensor | None = None,
    shard: Shard | None = None,
) -> CurvatureOperator:
    """``scale · Σₙ Jₙᵀ Rₙ diag(wₙ) Rₙᵀ Jₙ`` from per-sample rows ``Rₙᵀ Jₙ``, in chunks.

    ``factors`` has shape ``(N, D, K)`` and ``weights`` (ones by default) ``(N, K)``. With a
    ``shard``, the sum runs over the samples of every process's shard (one all-reduce).
    """
    total = _SandwichSum(structure, function)
    chunk_size = max(1, ROW_BUDGET // (factors.shape[-1] * sum(function.param_numels)))
    for start in range(0, function.num_samples, chunk_size):
        chunk = slice(start, start + chunk_size)
        rows = function.per_sample_rows(function.inputs[chunk], factors[chunk]).flatten(0, 1)
        left = rows if weights is None else rows * weights[chunk].reshape(-1, 1)
        total.add(left, rows)
    if shard is not None:
        shard.sum_(total.parts)
    return total.operator(scale)


def _implicit_fisher(
    function: ModelFunction,
    factors: Tensor,
    cg_options: dict[str, float | int | None],
    shard: Shard,
) -> Implicit:
    """Products with the Fisher of the global batch of ``shard``: each process's terms, scaled
    by the global count and summed over the processes (one all-reduce per product)."""
    outputs, transpose_product = function.vjp_function()
    scale = 1.0 / shard.total

    def fisher_vector_product(vector: Tensor) -> Tensor:
        tangent = as_matrix(function.jvp(vector))
        projected = torch.einsum("nck,nc->nk", factors, tangent)
        weighted = torch.einsum("nck,nk->nc", factors, projected) * scale
        return transpose_product(weighted.reshape(outputs.shape))

    return Implicit(
        fisher_vector_product,
        function.param_shapes,
        function.dtype,
        function.device,
        reduce_products=shard.sum_ if shard.sharded else None,
        **cg_options,
    )


def _kronecker_operator(
    structure: str, model: nn.Module, statistics: list[LayerCalls], shard: Shard | None = None
) -> CurvatureOperator:
    if structure == "kfac":
        return kfac_from_statistics(model, statistics, shard)
    return ekfac_from_statistics(model, statistics, shard)


def fisher(
    model: nn.Module,
    inputs: Tensor,
    likelihood: str | Likelihood = "categorical",
    kind: str = "exact",
    structure: str = "dense",
    targets: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    kfac_approx: str = "expand",
    *,
    cg_rtol: float | None = None,
    cg_max_iter: int | None = None,
    global_batch: GlobalBatch | None = None,
) -> CurvatureOperator:
    """Fisher information of ``model`` on ``inputs``: the MEAN over the ``N`` inputs.

    ``F = 1/N Σₙ Jₙᵀ Bₙ Jₙ`` with ``Jₙ = ∂f(xₙ)/∂θ`` over the trainable parameters and ``Bₙ``
    given by ``kind``:

    - ``"exact"``: ``Bₙ = ∇²A(fₙ)``, the expectation over ``y ~ p(y | fₙ)`` in closed form;
    - ``"mc"``: ``Bₙ = 1/M Σₘ gₙₘ gₙₘᵀ``, ``gₙₘ = ∇_f nll(fₙ, yₙₘ)`` at ``M = mc_samples``
      sampled targets (drawn with ``generator``; see :func:`output_factors` for the order);
    - ``"empirical"``: ``Bₙ = gₙ gₙᵀ`` at the observed ``targets`` (the "empirical Fisher").

    Parameters
    ----------
    model : nn.Module
        Outputs of shape ``(N, C)`` (or ``(N,)``) are the natural parameters of the likelihood.
        Parameters with ``requires_grad=False`` are excluded from the operator.
    inputs : Tensor of shape (N, ...)
    likelihood : {"categorical", "gaussian", "bernoulli", "poisson"} or Likelihood
        Logits, unit-variance mean, logits, log-rate respectively.
    kind : {"exact", "mc", "empirical"}, default "exact"
    structure : {"dense", "diag", "block", "kfac", "ekfac", "implicit"}, default "dense"
        ``"block"``: one dense block per parameter tensor. ``"kfac"``/``"ekfac"``: built by
        :mod:`natgrad.curvature.kfac` / :mod:`natgrad.curvature.ekfac`. ``"implicit"``:
        matrix-free products (one jvp and one vjp each) and conjugate-gradient solves.
    targets : Tensor, optional
        Observed targets with ``N`` entries along dim 0; required for ``kind="empirical"``.
    mc_samples : int, default 1
        Number of sampled targets per input for ``kind="mc"``.
    generator : torch.Generator, optional
        Source of randomness for ``kind="mc"``; the same seed gives the same Fisher.
    kfac_approx : {"expand", "reduce"}, default "expand"
        For ``structure="kfac"``/``"ekfac"``: the factors of layers with several locations per
        sample (see :func:`natgrad.curvature.kfac.build_kfac`).
    cg_rtol : float, optional
        For ``structure="implicit"``: the relative residual tolerance of the solve's conjugate
        gradients, in ``(0, 1)``; by default
        :func:`~natgrad.curvature.implicit.default_cg_rtol` of the model's dtype (``1.9e-6``
        in float32, ``1.5e-8`` in float64). Looser is faster and less accurate.
    cg_max_iter : int, optional
        For ``structure="implicit"``: the solve's iteration cap, at least 1;
        ``min(10 · P, 1000)`` by default.
    global_batch : natgrad.distributed.GlobalBatch, optional
        Declares ``inputs`` (and ``targets``) this process's shard of one global batch split
        over the processes of its group (data parallelism, every process calling
        :func:`fisher` with the same model and options): the Fisher is then that of the
        global batch, the mean over all its samples, the same on every process. The processes'
        sums of the statistics (the Fisher or its diagonal, blocks, Kronecker factors and EKFAC
        eigenvalues) are all-reduced with their sample counts, so shards of unequal sizes give
        the global batch's Fisher too; an ``"implicit"`` operator all-reduces each product
        (conjugate gradients then run alike on every process). ``"mc"`` draws the targets of
        the whole global batch on every process (its outputs gathered once for the
        ``mc_samples`` draws) and keeps each process's rows: with generators in the same state
        on every process (one seed) they are the draws of one process on the global batch. An
        exception of one process's checks, forward pass or (but for ``"mc"``) output factors
        or per-layer diagonal before the first all-reduce is raised on every process (the
        others raise :class:`~natgrad.distributed.ProcessFailure` naming it; see
        ``docs/kfac.md``). A no-op without ``torch.distributed`` or with one process.

    Returns
    -------
    CurvatureOperator
        Of shape ``(P, P)``, ``P`` the number of trainable parameters, in the model's dtype.

    Raises
    ------
    ValueError
        Unknown ``likelihood``, ``kind``, ``structure`` or ``kfac_approx`` (or ``"reduce"``
        with another structure than ``"kfac"``/``"ekfac"``); ``kind="empirical"`` without
        ``targets``; targets not one per input, or outside the likelihood's support (a class
        index out of range, a negative count); ``mc_samples < 1``; non-finite inputs or
        targets; a model with no trainable parameters, or one that is not a deterministic
        function of independent samples (BatchNorm or dropout in training mode, embeddings
        with ``max_norm`` or ``scale_grad_by_freq``; see ``docs/curvature.md``); model
        outputs at which the Fisher is not finite (NaN, or overflowing the dtype), or with a
        single logit for ``"categorical"``; ``cg_rtol`` outside ``(0, 1)`` (NaN and
        infinities included) or ``cg_max_iter < 1``, or either given with another structure
        than ``"implicit"``.
    TypeError
        A model that does not return one tensor of outputs; ``cg_rtol`` not a real number or
        ``cg_max_iter`` not an integer; ``global_batch`` not a ``GlobalBatch``.
    """
    _check_choice("kind", kind, FISHER_KINDS)
    _check_choice("structure", structure, FISHER_STRUCTURES)
    _check_kfac_approx(kfac_approx, structure)
    cg_options = checked_cg_options(structure, cg_rtol, cg_max_iter)
    resolved = get_likelihood(likelihood)
    check_curvature_model(model)
    _check_mc_samples(mc_samples)
    if kind == "empirical" and targets is None:
        raise ValueError('kind="empirical" needs the observed targets: pass targets=...')
    agreement = _agreement(global_batch)
    count, statistics, terms, layered = 0, None, None, None
    deferred = _DeferredShard(global_batch, agreement)
    with agreement.local():  # the work that needs no other process: failures ride on the count
        count = _num_samples(inputs)
        if targets is not None:
            _check_targets(targets, count)
        if kind == "mc" and structure in ("kfac", "ekfac"):
            vectors = deferred.monte_carlo_vectors(count, resolved, mc_samples, generator)
            statistics = statistics_for_vectors(model, inputs, vectors, kfac_approx)
        elif structure in ("kfac", "ekfac"):
            statistics = collect_statistics(
                model,
                inputs,
                likelihood=resolved,
                kind=kind,
                targets=targets,
                kfac_approx=kfac_approx,
            )
        elif structure == "diag":
            layered = _local_layer_diagonal(model, inputs, resolved, kind, targets)
        if structure not in ("kfac", "ekfac") and (layered is None or not layered.pass_.serves):
            terms = _model_terms(model, inputs, resolved, kind, targets)
    shard = deferred.shard if deferred.shard is not None else _shard(global_batch, count, agreement)
    agreement.settle()  # a failure after the counts' all-reduce: this process's alone
    if structure in ("kfac", "ekfac"):  # their Monte-Carlo draws were made with the shard
        return _kronecker_operator(structure, model, statistics, shard)
    if kind == "mc":
        resolved = shard.sampling(resolved)
    if layered is not None and layered.pass_.serves_everywhere(shard):
        return _layer_diagonal(
            model, layered, resolved, kind, targets, mc_samples, generator, shard
        )
    if terms is None:
        terms = _model_terms(model, inputs, resolved, kind, targets)
    function, outputs, factors = terms
    if factors is None:
        factors = output_factors(resolved, outputs, kind, targets, mc_samples, generator)
    if structure == "implicit":
        return _implicit_fisher(function, factors, cg_options, shard)
    return _assembled_sum(function, factors, structure, 1.0 / shard.total, shard=shard)


class _DeferredShard:
    """The shard of a Monte-Carlo K-FAC/EKFAC Fisher, made between its forward pass and its
    draws (which need the global batch's outputs), so that the counts' all-reduce carries a
    failure of the forward pass (:class:`~natgrad.distributed.agreement.Agreement`)."""

    def __init__(self, global_batch: GlobalBatch | None, agreement: Agreement) -> None:
        self.global_batch = global_batch
        self.agreement = agreement
        self.shard: Shard | None = None

    def monte_carlo_vectors(
        self,
        count: int,
        likelihood: Likelihood,
        mc_samples: int,
        generator: torch.Generator | None,
    ) -> Callable[[Tensor], Tensor]:
        """The backward vectors of the model's outputs ``(N, C)``: ``mc_samples`` draws for
        this process's rows of the global batch, made once the shard is (the counts'
        all-reduce)."""

        def vectors(outputs: Tensor) -> Tensor:
            self.shard = _shard(self.global_batch, count, self.agreement)
            sampling = self.shard.sampling(likelihood)
            return backward_vectors(outputs, sampling, "mc", None, mc_samples, generator)

        return vectors


def _agreement(global_batch: GlobalBatch | None) -> Agreement:
    """The :class:`~natgrad.distributed.agreement.Agreement` of the processes sharing
    ``global_batch``: their local failures before the all-reduce of the shards' counts are
    raised on all of them (one that agrees with no other process without a global batch)."""
    if global_batch is None:
        return Agreement.alone()
    if not isinstance(global_batch, GlobalBatch):
        raise TypeError(
            f"global_batch must be a natgrad.distributed.GlobalBatch or None, got "
            f"{type(global_batch).__name__}"
        )
    return Agreement(global_batch.group)


class _LocalLayerDiagonal(NamedTuple):
    """The per-layer diagonal's pass and, for the kinds that draw nothing, its squared
    sums (:class:`~natgrad.curvature.layer_diagonal.LayerPass`)."""

    pass_: LayerPass
    squared_sums: list[Tensor] | None


def _local_layer_diagonal(
    model: nn.Module, inputs: Tensor, likelihood: Likelihood, kind: str, targets: Tensor | None
) -> _LocalLayerDiagonal | None:
    """This process's part of the per-layer Fisher diagonal: the forward pass and, except for
    ``"mc"`` (whose draws need the global batch's outputs) or a pass that does not serve,
    the squared sums; ``None`` (no forward pass) when the model's trainable parameters are
    not all in supported layers (:func:`~natgrad.curvature.layer_diagonal.supported_layers`).
    Non-finite backward vectors raise as in :func:`output_factors`, naming the sample."""
    recorded = LayerPass.record(model, inputs)
    if recorded is None:
        return None
    if kind == "mc" or not recorded.serves:
        return _LocalLayerDiagonal(recorded, None)
    vectors = backward_vectors(recorded.outputs, likelihood, kind, targets)
    _check_finite_factors(vectors.permute(1, 2, 0), recorded.outputs, likelihood, kind)
    return _LocalLayerDiagonal(recorded, recorded.squared_sums(lambda outputs: vectors))


def _layer_diagonal(
    model: nn.Module,
    layered: _LocalLayerDiagonal,
    likelihood: Likelihood,
    kind: str,
    targets: Tensor | None,
    mc_samples: int,
    generator: torch.Generator | None,
    shard: Shard,
) -> Diagonal:
    """The per-layer Fisher diagonal of the global batch of ``shard`` from this process's
    part (its ``"mc"`` draws made now, from the global batch's outputs)."""
    squared_sums = layered.squared_sums
    if squared_sums is None:
        vectors = functools.partial(
            backward_vectors,
            likelihood=likelihood,
            kind=kind,
            targets=targets,
            mc_samples=mc_samples,
            generator=generator,
        )
        squared_sums = layered.pass_.squared_sums(vectors)
    shapes = [param.shape for param in trainable_parameters(model)]
    return Diagonal(layered.pass_.diagonal(squared_sums, shard), shapes)


def _model_terms(
    model: nn.Module,
    inputs: Tensor,
    likelihood: Likelihood,
    kind: str,
    targets: Tensor | None,
) -> tuple[ModelFunction, Tensor, Tensor | None]:
    """The model function on this process's samples, its outputs ``(N, C)`` and, except for
    ``"mc"`` (whose draws need the global batch's outputs), its per-sample output factors
    (:func:`output_factors`)."""
    function = ModelFunction(model, inputs)
    outputs = as_matrix(function.outputs())
    if kind == "mc":
        return function, outputs, None
    return function, outputs, output_factors(likelihood, outputs, kind, targets)


# -- GGN and Hessian ------------------------------------------------------------------------------
def _loss_setup(
    model: nn.Module,
    inputs: Tensor,
    loss_fn: LossFn,
    targets: Tensor,
    structure: str,
    structures: tuple[str, ...] = LOSS_STRUCTURES,
) -> ModelFunction:
    _check_choice("structure", structure, structures)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    _check_targets(targets, _num_samples(inputs))
    check_curvature_model(model)
    function = ModelFunction(model, inputs)
    with torch.no_grad():
        loss = loss_fn(function.outputs(), targets)
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise ValueError("loss_fn(outputs, targets) must return a scalar (0-d) tensor")
    if not bool(torch.isfinite(loss)):
        raise ValueError(f"loss_fn(outputs, targets) is not finite: {float(loss)}")
    return function


def ggn(
    model: nn.Module,
    inputs: Tensor,
    loss_fn: LossFn,
    targets: Tensor,
    structure: str = "dense",
    separable: bool | str | None = None,
    kfac_approx: str = "expand",
    *,
    cg_rtol: float | None = None,
    cg_max_iter: int | None = None,
) -> CurvatureOperator:
    """Generalised Gauss-Newton ``G = Jᵀ (∇²_f L) J`` of ``L = loss_fn(model(inputs), targets)``.

    ``J`` is the Jacobian of all outputs ``f = model(inputs)`` (flattened) with respect to the
    trainable parameters and ``∇²_f L`` the Hessian of the loss in the outputs. The loss's own
    reduction sets the normalisation: a ``"mean"`` reduction gives the MEAN over data points
    (``nn.CrossEntropyLoss()`` gives exactly the categorical Fisher), a ``"sum"`` the sum.

    For a loss that is a sum or mean of per-sample terms, ``L = s Σₙ ℓ(fₙ, yₙ)`` with
    ``ℓ(fₙ, yₙ) = loss_fn(fₙ[None], yₙ[None])`` and ``s = 1/N`` (mean) or ``1`` (sum), the output
    Hessian is block-diagonal and ``G = s Σₙ Jₙᵀ ∇²ℓ(fₙ) Jₙ`` is assembled from the ``N``
    per-sample ``D × D`` Hessians (``torch.func.vmap`` over ``torch.func.hessian`` of ``ℓ``)
    in chunks; the ``N·D × N·D`` output Hessian is never formed. ``nn.CrossEntropyLoss``
    (without ``weight``; no target equal to ``ignore_index``), ``nn.BCEWithLogitsLoss``
    (without ``weight`` or ``pos_weight``), ``nn.MSELoss`` and
    ``nn.PoissonNLLLoss(log_input=True)`` (those exact classes, with the ``s`` of their own
    reduction) take their per-sample Hessians in closed form instead, as roots ``Rₙ Rₙᵀ``
    (:mod:`natgrad.curvature.loss_hessians`). Any other loss (coupling the
    samples, e.g. through the batch mean) takes the general path: the full Jacobian
    (``N·D × P``) times output-space Hessian-vector products, a chunk of columns at a time.

    Parameters
    ----------
    model : nn.Module
        Parameters with ``requires_grad=False`` are excluded.
    inputs : Tensor of shape (N, ...)
    loss_fn : callable
        ``loss_fn(outputs, targets)`` returning a scalar tensor, twice differentiable in
        ``outputs`` (e.g. ``nn.CrossEntropyLoss()``, ``nn.MSELoss()``).
    targets : Tensor with N entries along dim 0
    structure : {"dense", "diag", "block", "kfac", "ekfac", "implicit"}, default "dense"
        ``"implicit"`` uses one jvp, one output-space Hessian-vector product and one vjp per
        product and never forms a matrix. ``"kfac"``/``"ekfac"``: Kronecker factors as for
        :func:`fisher`, from square roots ``Rₙ`` of the per-sample output Hessians
        (``Rₙ Rₙᵀ = ∇²ℓ(fₙ)``: the closed forms above, or ``Qₙ Λₙ^{1/2}`` from ``eigh``)
        back-propagated to every layer (the models and options of ``structure="kfac"`` there);
        they need a separable loss convex in the outputs. ``"diag"`` of such a loss, for a
        model whose trainable parameters all sit in Linear/Conv layers, is built per layer from
        the same vectors, as the Fisher's, without per-sample Jacobians.
    separable : {None, True, False, "mean", "sum"}, default None
        Whether ``L`` is ``s Σₙ ℓ(fₙ, yₙ)`` as above. ``None``: detected, for the torch losses
        in ``SEPARABLE_LOSSES`` with reduction ``"mean"``, ``"sum"`` or ``"batchmean"`` whose
        value equals that decomposition (a class ``weight`` or an ignored target breaks it and
        selects the general path). ``"mean"``/``"sum"``: declared by the caller, with that
        ``s``. ``True``: declared, ``s`` read from ``loss_fn.reduction``. ``False``: always the
        general path. A declared decomposition is checked on the loss value.
    kfac_approx : {"expand", "reduce"}, default "expand"
        For ``structure="kfac"``/``"ekfac"``, as in :func:`fisher`.
    cg_rtol, cg_max_iter : optional
        For ``structure="implicit"``, as in :func:`fisher`.

    Returns
    -------
    CurvatureOperator of shape (P, P), symmetric; PSD when the loss is convex in the outputs.

    Raises
    ------
    ValueError
        Unknown structure or ``separable``, targets not one per input, a non-scalar or
        non-finite loss, non-finite inputs, a model with no trainable parameters, a loss
        declared separable whose value is not ``s Σₙ ℓ(fₙ, yₙ)``; for ``"kfac"``/``"ekfac"``
        a loss that is not separable or whose per-sample output Hessians are not PSD;
        ``cg_rtol`` or ``cg_max_iter`` out of range or given with another structure than
        ``"implicit"`` (as in :func:`fisher`).
    TypeError
        ``cg_rtol`` not a real number or ``cg_max_iter`` not an integer.
    """
    function = _loss_setup(model, inputs, loss_fn, targets, structure, GGN_STRUCTURES)
    _check_kfac_approx(kfac_approx, structure)
    cg_options = checked_cg_options(structure, cg_rtol, cg_max_iter)
    scale = _declared_scale(loss_fn, separable, function.num_samples)
    if structure in ("kfac", "ekfac"):
        vectors = _hessian_root_vectors(loss_fn, targets, scale, separable is None)
        statistics = statistics_for_vectors(model, inputs, vectors, kfac_approx)
        return _kronecker_operator(structure, model, statistics)
    if structure == "diag" and scale is not None:
        vectors = _hessian_root_vectors(loss_fn, targets, scale, separable is None, strict=False)
        diagonal = layer_diagonal_for_vectors(model, inputs, vectors)
        if diagonal is not None:
            return Diagonal(diagonal, function.param_shapes)
    outputs = function.outputs()

    def loss_of_outputs(values: Tensor) -> Tensor:
        return loss_fn(values, targets)

    if structure == "implicit":
        return _implicit_ggn(function, loss_of_outputs, cg_options)
    if scale is not None:
        roots = _closed_form_roots(loss_fn, outputs, targets, scale)
        if roots is not None:
            return _assembled_sum(function, roots, structure, scale)
        blocks = _per_sample_output_hessians(loss_fn, outputs, targets, scale, separable is None)
        if blocks is not None:
            eigenvalues, eigenvectors = torch.linalg.eigh(blocks)
            return _assembled_sum(function, eigenvectors, structure, scale, weights=eigenvalues)
    return _coupled_ggn(function, loss_of_outputs, outputs, structure)


SEPARABLE_LOSSES = (
    nn.CrossEntropyLoss,
    nn.NLLLoss,
    nn.MSELoss,
    nn.L1Loss,
    nn.HuberLoss,
    nn.SmoothL1Loss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.PoissonNLLLoss,
    nn.KLDivLoss,
    nn.MultiLabelSoftMarginLoss,
)
"""Torch losses :func:`ggn` treats as per-sample separable when their value confirms it."""
_REDUCTION_PER_SAMPLE = {"mean": True, "batchmean": True, "sum": False}
SEPARABLE_CHECK_RTOL = 64.0
"""Tolerance of the separability check on the loss value, in units of ``N · eps(dtype)``."""
KRONECKER_PSD_RTOL = 1024.0
"""A per-sample output Hessian eigenvalue below ``-KRONECKER_PSD_RTOL · eps · max |λ|`` makes
``ggn(structure="kfac"/"ekfac")`` refuse the loss as not convex (rounding stays above it)."""


def _declared_scale(loss_fn: LossFn, separable: object, num_samples: int) -> float | None:
    """``s`` of ``L = s Σₙ ℓ(fₙ, yₙ)`` when ``separable`` declares or detects it, else ``None``."""
    if separable is None or separable is True:
        reduction = getattr(loss_fn, "reduction", None)
        if separable is None and not isinstance(loss_fn, SEPARABLE_LOSSES):
            return None
        if reduction not in _REDUCTION_PER_SAMPLE:
            if separable is None:
                return None
            raise ValueError(
                f"separable=True reads the reduction from loss_fn.reduction, got {reduction!r}; "
                "pass separable='mean' or separable='sum' instead"
            )
    elif separable is False:
        return None
    elif separable in ("mean", "sum"):
        reduction = separable
    else:
        raise ValueError(f"separable must be None, True, False, 'mean' or 'sum', got {separable!r}")
    return 1.0 / num_samples if _REDUCTION_PER_SAMPLE[reduction] else 1.0


def _hessian_root_vectors(
    loss_fn: LossFn, targets: Tensor, scale: float | None, detected: bool, strict: bool = True
) -> Callable[[Tensor], Tensor | None]:
    """The backward vectors of ``s Σₙ Jₙᵀ ∇²ℓ(fₙ) Jₙ`` as a mean over the ``N`` samples: the
    columns of roots ``Rₙ Rₙᵀ = s N ∇²ℓ(fₙ)``, shape ``(D, N, D)``: the closed form's scaled
    by ``√(s N)`` (:func:`_closed_form_roots`), else ``Qₙ (s N Λₙ)^{1/2}``, from the
    model's outputs. A loss that is not separable, or not convex in the outputs, raises
    (``strict``) or gives ``None``."""

    def refuse(message: str) -> None:
        if strict:
            raise ValueError(f"structure='kfac'/'ekfac' needs a loss {message}")

    def vectors(outputs: Tensor) -> Tensor | None:
        outputs = outputs.detach()
        roots = _closed_form_roots(loss_fn, outputs, targets, scale)
        if roots is not None:
            return (roots * math.sqrt(scale * len(outputs))).permute(2, 0, 1)
        hessians = None
        if scale is not None:
            hessians = _per_sample_output_hessians(loss_fn, outputs, targets, scale, detected)
        if hessians is None:
            return refuse("that is a sum or mean of per-sample terms (see separable)")
        values, bases = torch.linalg.eigh(hessians)
        floor = KRONECKER_PSD_RTOL * torch.finfo(values.dtype).eps * values.abs().max()
        if bool((values < -floor).any()):
            return refuse(
                "convex in the outputs: its per-sample output Hessians have eigenvalues down "
                f"to {float(values.min()):.3g}"
            )
        roots = (values.clamp_min(0) * (scale * len(outputs))).sqrt()
        return (bases * roots.unsqueeze(-2)).permute(2, 0, 1)

    return vectors


def _closed_form_roots(
    loss_fn: LossFn, outputs: Tensor, targets: Tensor, scale: float | None
) -> Tensor | None:
    """Roots ``Rₙ`` of the per-sample output Hessians, ``Rₙ Rₙᵀ = ∇²ℓ(fₙ)``, ``(N, D, D)``, for
    the torch losses with a closed form (:mod:`~natgrad.curvature.loss_hessians`) whose own
    reduction gives ``scale``; ``None`` otherwise (a declared ``scale`` that the reduction
    contradicts is left to the check of :func:`_per_sample_output_hessians`)."""
    if scale is None or scale != _declared_scale(loss_fn, None, len(outputs)):
        return None
    return output_hessian_roots(loss_fn, outputs, targets)


def _per_sample_output_hessians(
    loss_fn: LossFn, outputs: Tensor, targets: Tensor, scale: float, detected: bool
) -> Tensor | None:
    """The ``(N, D, D)`` Hessians ``∇²ℓ(fₙ)`` of the per-sample losses, symmetrised.

    The decomposition ``L = scale · Σₙ ℓ(fₙ, yₙ)`` is checked on the loss value first; when it
    fails, ``None`` for a ``detected`` loss (the caller takes the general path), else a
    ValueError.
    """

    def sample_loss(output: Tensor, target: Tensor) -> Tensor:
        return loss_fn(output.unsqueeze(0), target.unsqueeze(0))

    with torch.no_grad():
        total = loss_fn(outputs, targets)
        pieces = vmap(sample_loss)(outputs, targets)
    decomposed = scale * pieces.sum()
    eps = torch.finfo(outputs.dtype).eps
    slack = SEPARABLE_CHECK_RTOL * outputs.shape[0] * eps * (scale * pieces.abs().sum() + eps)
    if not bool(torch.abs(total - decomposed) <= slack):
        if detected:
            return None
        raise ValueError(
            f"loss_fn was declared separable with scale {scale:g}, but loss_fn(outputs, targets)"
            f" = {float(total):.6g} differs from scale · Σₙ loss_fn(fₙ[None], yₙ[None]) = "
            f"{float(decomposed):.6g}"
        )
    size = math.prod(outputs.shape[1:])
    hessians = vmap(func_hessian(sample_loss))(outputs, targets).reshape(-1, size, size)
    return 0.5 * (hessians + hessians.transpose(-1, -2))


def _coupled_ggn(
    function: ModelFunction,
    loss_of_outputs: Callable[[Tensor], Tensor],
    outputs: Tensor,
    structure: str,
) -> CurvatureOperator:
    """``Jᵀ (∇²_f L) J`` for any loss: the full ``(N·D, P)`` Jacobian and output-space HVPs.

    ``(∇²_f L) J`` is formed a chunk of columns at a time (vmapped forward-over-reverse
    products), so the ``N·D × N·D`` output Hessian is never held.
    """
    jacobian = function.per_sample_jacobians(function.inputs).flatten(0, 1)
    curvature = _HessianProduct(loss_of_outputs)

    def output_hessian_product(column: Tensor) -> Tensor:
        return curvature(outputs, column.reshape(outputs.shape)).reshape(-1)

    products = vmap(output_hessian_product, in_dims=1, out_dims=1)
    total = _ColumnSum(structure, function, jacobian)
    width = max(1, ROW_BUDGET // jacobian.shape[0])
    for start in range(0, jacobian.shape[1], width):
        total.add(start, products(jacobian[:, start : start + width]))
    return total.operator()


class _ColumnSum:
    """Collects ``Jᵀ M`` in one structure from column chunks ``M[:, start:stop]``."""

    def __init__(self, structure: str, function: ModelFunction, jacobian: Tensor) -> None:
        self.structure = structure
        self.function = function
        self.jacobian = jacobian
        size = jacobian.shape[1]
        options = {"dtype": jacobian.dtype, "device": jacobian.device}
        if structure == "dense":
            self.total: Tensor | list[Tensor] = torch.zeros(size, size, **options)
        elif structure == "diag":
            self.total = torch.zeros(size, **options)
        else:
            self.total = [torch.zeros(n, n, **options) for n in function.param_numels]
        self.offsets = [0, *itertools.accumulate(function.param_numels)]

    def add(self, start: int, columns: Tensor) -> None:
        """Add the chunk ``columns = M[:, start:start + width]``."""
        stop = start + columns.shape[1]
        if self.structure == "dense":
            self.total[:, start:stop] = self.jacobian.T @ columns
            return
        if self.structure == "diag":
            self.total[start:stop] = (self.jacobian[:, start:stop] * columns).sum(0)
            return
        for block, low, high in zip(self.total, self.offsets, self.offsets[1:], strict=False):
            first, last = max(start, low), min(stop, high)
            if first < last:
                block[:, first - low : last - low] = (
                    self.jacobian[:, low:high].T @ columns[:, first - start : last - start]
                )

    def operator(self) -> CurvatureOperator:
        """The collected ``Jᵀ M``, symmetrised, as an operator."""
        shapes = self.function.param_shapes
        if self.structure == "dense":
            return Dense(_symmetrised(self.total), shapes)
        if self.structure == "diag":
            return Diagonal(self.total, shapes)
        return BlockDiagonal([_symmetrised(block) for block in self.total], shapes)


class _HessianProduct:
    """``(x, t) ↦ ∇²φ(x) t`` for a scalar function ``φ``, by forward-over-reverse
    differentiation; reverse-over-reverse (a vjp of ``∇φ``, equal since ``∇²φ`` is symmetric)
    once an operation turns out to have no forward-mode derivative in torch (``HuberLoss``), or
    one that fails (``MSELoss``: "ZeroTensors are immutable", torch 2.13)."""

    def __init__(self, function: Callable[[Tensor], Tensor]) -> None:
        self.gradient = grad(function)
        self.forward_mode = True

    def __call__(self, point: Tensor, tangent: Tensor) -> Tensor:
        if self.forward_mode:
            try:
                return jvp(self.gradient, (point,), (tangent,))[1]
            except (NotImplementedError, RuntimeError):  # no or a failing forward-mode rule
                self.forward_mode = False
        _, pullback = vjp(self.gradient, point)
        return pullback(tangent)[0]


def _implicit_ggn(
    function: ModelFunction,
    loss_of_outputs: Callable[[Tensor], Tensor],
    cg_options: dict[str, float | int | None],
) -> Implicit:
    outputs, transpose_product = function.vjp_function()
    curvature = _HessianProduct(loss_of_outputs)

    def ggn_vector_product(vector: Tensor) -> Tensor:
        return transpose_product(curvature(outputs, function.jvp(vector)))

    return Implicit(
        ggn_vector_product, function.param_shapes, function.dtype, function.device, **cg_options
    )


def hessian(
    model: nn.Module,
    inputs: Tensor,
    loss_fn: LossFn,
    targets: Tensor,
    structure: str = "dense",
    *,
    cg_rtol: float | None = None,
    cg_max_iter: int | None = None,
) -> CurvatureOperator:
    """Hessian ``∇²_θ loss_fn(model(inputs; θ), targets)`` over the trainable parameters.

    The loss's own reduction sets the normalisation (``"mean"`` gives the MEAN over data points).
    The Hessian may be indefinite: solves of the dense and block structures then clamp negative
    eigenvalues (see :func:`natgrad.linalg.damped_solve`), and conjugate gradients (implicit)
    stop at a direction of negative curvature; damp accordingly.

    Parameters
    ----------
    model : nn.Module
        Parameters with ``requires_grad=False`` are excluded.
    inputs : Tensor of shape (N, ...)
    loss_fn : callable
        ``loss_fn(outputs, targets)`` returning a scalar tensor.
    targets : Tensor with N entries along dim 0
    structure : {"dense", "diag", "block", "implicit"}, default "dense"
        ``"dense"``: ``torch.func.hessian`` over the flat parameters. ``"block"``: one
        ``torch.func.hessian`` per parameter tensor, cross-parameter terms dropped.
        ``"diag"``: the diagonals of those blocks (each block is formed, one at a time).
        ``"implicit"``: Hessian-vector products by forward-over-reverse differentiation
        (reverse-over-reverse for losses without forward-mode derivatives, e.g. ``HuberLoss``).
    cg_rtol, cg_max_iter : optional
        For ``structure="implicit"``, as in :func:`fisher`.

    Returns
    -------
    CurvatureOperator of shape (P, P), symmetric.

    Raises
    ------
    ValueError, TypeError
        As :func:`ggn`.
    """
    function = _loss_setup(model, inputs, loss_fn, targets, structure)
    cg_options = checked_cg_options(structure, cg_rtol, cg_max_iter)
    loss_of_flat = function.loss_function(loss_fn, targets)
    flat = function.flat_params()
    shapes = function.param_shapes
    if structure == "implicit":
        curvature = _HessianProduct(loss_of_flat)

        def hessian_vector_product(vector: Tensor) -> Tensor:
            return curvature(flat, vector)

        return Implicit(
            hessian_vector_product, shapes, function.dtype, function.device, **cg_options
        )
    if structure == "dense":
        return Dense(_symmetrised(func_hessian(loss_of_flat)(flat)), shapes)
    blocks = _hessian_blocks(loss_of_flat, flat, function.param_numels)
    if structure == "diag":
        return Diagonal(torch.cat([block.diagonal() for block in blocks]), shapes)
    return BlockDiagonal(blocks, shapes)


def _hessian_blocks(
    loss_of_flat: Callable[[Tensor], Tensor], flat: Tensor, numels: list[int]
) -> list[Tensor]:
    """The diagonal ``(p_i, p_i)`` blocks of the Hessian, one parameter tensor at a time."""
    blocks = []
    start = 0
    for size in numels:
        before, after = flat[:start], flat[start + size :]

        def loss_of_piece(piece: Tensor, before: Tensor = before, after: Tensor = after) -> Tensor:
            return loss_of_flat(torch.cat([before, piece, after]))

        blocks.append(_symmetrised(func_hessian(loss_of_piece)(flat[start : start + size])))
        start += size
    return blocks
