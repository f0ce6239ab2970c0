"""K-FAC gradient preconditioner in the hook pattern (Martens & Grosse 2015; kfac-pytorch).

Attach it to a model and call it between ``loss.backward()`` and any ``torch.optim`` step::

    precond = natgrad.optim.KFAC(model, damping=1e-3)
    for inputs, targets in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)     # mean over the batch
        loss.backward()
        precond.step()          # rewrites .grad of the preconditioned layers in place
        optimizer.step()

With ``adaptive_damping=True`` the damping ``λ`` follows the Levenberg–Marquardt rule of Martens
& Grosse (2015, §6.5): every ``damping_adaptation_interval`` steps :meth:`KFAC.step` records the
gradient and the parameters, and after the optimizer's step the loss of the same batch is
reported back::

        loss.backward()
        precond.step()
        optimizer.step()
        if precond.damping_update_due:
            with torch.no_grad():
                loss_after = loss_fn(model(inputs), targets)
            precond.update_damping(loss, loss_after)

Forward hooks (attached only for steps that record statistics) record layer inputs and tensor
hooks on the layer outputs record output gradients; :meth:`KFAC.step` folds them into running
factors ``A_l``, ``G_l`` (exponential moving average), refreshes the eigendecompositions every
``inv_update_interval`` steps and replaces each layer's gradient ``∇W_l`` by
``(G_l ⊗ A_l + λI)⁻¹ ∇W_l``. With factored damping no eigendecomposition is needed: at a
refresh the factors are kept, and their damped inverses ``(G_l + λ_G I)⁻¹`` and
``(A_l + λ_A I)⁻¹`` are formed by Cholesky (batched over layers of equal size) from those
factors, again whenever the damping changes. Parameters outside the chosen layers keep their
gradients.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.parameter import is_lazy
from torch.nn.utils.parametrize import is_parametrized

from natgrad._validation import (
    nonnegative_float,
    nonnegative_int,
    one_of,
    positive_float,
    positive_int,
    unit_interval,
)
from natgrad._warnings import warn_at_caller
from natgrad.curvature.evaluation_scope import in_curvature_evaluation
from natgrad.curvature.kfac_capture import (
    CONV_TYPES,
    KFAC_APPROXIMATIONS,
    backward_vectors,
    check_layer_input,
    check_layer_output,
)
from natgrad.curvature.likelihoods import Likelihood, get_likelihood
from natgrad.curvature.weight_locality import foreign_weight_uses
from natgrad.distributed.agreement import Agreement
from natgrad.distributed.reduce import (
    assign_owners,
    is_distributed,
    rank,
    world_size,
)
from natgrad.linalg.kron import damped_factor_inverses, symmetric_eigh_batch
from natgrad.optim.kfac_attention import (
    SEPARATE,
    AttentionLayers,
    AttentionRecording,
    PackedInProjection,
    PackedProjectionState,
    attention_projections,
)
from natgrad.optim.kfac_layers import (
    EmbeddingState,
    GroupedConvState,
    KroneckerLayerState,
    LayerState,
    fold_factors,
)
from natgrad.optim.kfac_mode_hooks import ModeHooks
from natgrad.optim.kfac_recurrent import (
    RECURRENT_TYPES,
    PackedRows,
    RecurrentLayers,
    RecurrentRecording,
    StepCalls,
    recurrent_projections,
)
from natgrad.optim.trust_region import damping_update, loss_resolution

__all__ = ["KFAC"]

Schedule = float | Callable[[int], float]
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, *CONV_TYPES, nn.Embedding)


def _schedule_value(name: str, schedule: Schedule, step: int) -> float:
    value = float(schedule(step) if callable(schedule) else schedule)
    if math.isfinite(value) and value >= 0.0:  # read every step: no message built in vain
        return value
    return nonnegative_float(f"{name} at step {step}", value)


def _check_adaptive_damping(
    adaptive: bool,
    damping: Schedule,
    decay: float | None,
    bounds: tuple[float, float],
    interval: int,
) -> float:
    """Validate the adaptive-damping options; returns the decay ``ω``."""
    omega = (
        (19 / 20) ** interval
        if decay is None
        else unit_interval("damping_decay", decay, closed_left=False)
    )
    low, high = bounds
    if not 0 < low <= high < math.inf:
        raise ValueError(f"damping_bounds {bounds!r} must satisfy 0 < low <= high < inf")
    if not adaptive:
        return omega
    if callable(damping) or not (math.isfinite(damping) and damping > 0):
        raise ValueError(
            f"adaptive_damping needs a positive float initial damping, got {damping!r}"
        )
    if not low <= damping <= high:
        raise ValueError(f"damping_bounds {bounds!r} must satisfy 0 < low <= damping <= high")
    return omega


def _device_kl_scale(
    products: list[Tensor], squared_rates: list[float], kl_clip: float
) -> Tensor | None:
    """``min(1, sqrt(kl_clip / |Σ_l lr_l² p_l|))`` as a 0-dim tensor without a host sync (``1``
    where the sum is 0); ``None`` where every ``lr_l = 0`` (nothing to scale)."""
    if not any(squared_rates):
        return None
    if len(set(squared_rates)) == 1:
        quadratic, factor = torch.stack(products).sum(), squared_rates[0] / kl_clip
    else:
        quadratic = torch.stack(products) @ products[0].new_tensor(squared_rates)
        factor = 1 / kl_clip
    return quadratic.abs_().mul_(factor).rsqrt_().clamp_(max=1.0)


@dataclass
class _DampingProbe:
    """What :meth:`KFAC.update_damping` needs from the step it assesses: the damping used and,
    per layer, the raw gradient matrix and the parameter matrix before the optimizer's step."""

    damping: float
    layers: list[tuple[LayerState, Tensor, Tensor]]

    def dtype(self) -> torch.dtype:
        """The dtype of the recorded gradients (float64 if none): that of a loss given as a
        float, whose round-off bounds the change the assessment can resolve."""
        return self.layers[0][1].dtype if self.layers else torch.float64


def _take_factored_inverses(states: list[LayerState], damping: float) -> None:
    """Give each of ``states`` its damped factor inverses, formed in one batched Cholesky."""
    requests = [state.factored_inverse_inputs(damping) for state in states]
    inverses = iter(
        damped_factor_inverses(
            [matrix for matrices, _ in requests for matrix in matrices],
            [value for _, dampings in requests for value in dampings],
        )
    )
    for state, (matrices, _) in zip(states, requests, strict=True):
        state.take_factored_inverses(damping, [next(inverses) for _ in matrices])


def _scale_partials(
    partials: list[tuple[LayerState, Tensor]], scale: float | Tensor | None
) -> None:
    """Multiply by ``scale`` the partial solutions of the layers that do not apply it as they
    write (:meth:`~natgrad.optim.kfac_layers.LayerState.writes_scaled`), in one
    ``torch._foreach_mul_``."""
    if scale is None:
        return
    unscaled = [partial for state, partial in partials if not state.writes_scaled()]
    if unscaled:
        torch._foreach_mul_(unscaled, scale)


def _stamp(grad: Tensor) -> tuple[weakref.ref, int]:
    """A weak reference to a gradient and its version, to recognise it unchanged later
    (:func:`_unchanged_since`) without keeping it alive."""
    return weakref.ref(grad), grad._version


def _unchanged_since(stamp: tuple[weakref.ref, int] | None, grad: Tensor) -> bool:
    """Whether ``grad`` is the very tensor of ``stamp``, not written since. (Weak references
    are compared through their referents, which for tensors compares values: hence ``is``.)"""
    return stamp is not None and stamp[0]() is grad and stamp[1] == grad._version


def _preconditionable(module: nn.Module) -> bool:
    """A layer type K-FAC covers, with a dense gradient of its own weight."""
    if not isinstance(module, DEFAULT_LAYER_TYPES) or is_parametrized(module, "weight"):
        return False  # a parametrized weight (weight_norm, ...) is computed, with no .grad
    if not isinstance(module.weight, nn.Parameter):
        return False  # computed by a forward pre-hook (pruning: weight_orig · mask)
    return not (isinstance(module, nn.Embedding) and module.sparse)


def _supported(module: nn.Module) -> bool:
    return _preconditionable(module) and module.weight.requires_grad


def _weight_used_directly(model: nn.Module) -> set[int]:
    """Ids of the layers whose parent uses their weight without calling their ``forward()``,
    so that no layer hook sees their inputs: ``nn.MultiheadAttention.out_proj`` (recorded with
    its attention instead, :mod:`natgrad.optim.kfac_attention`)."""
    return {
        id(module.out_proj)
        for module in model.modules()
        if isinstance(module, nn.MultiheadAttention)
    }


def _check_initialized(selected: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """``selected``, unless a lazy layer (``nn.LazyLinear``, ...) has no shapes yet."""
    for name, module in selected:
        if any(is_lazy(param) for param in module.parameters(recurse=False)):
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}) is not initialized yet: run the model "
                "on a batch before building the preconditioner"
            )
    return selected


def _without_shared_weights(
    selected: list[tuple[str, nn.Module]], explicit: bool
) -> list[tuple[str, nn.Module]]:
    """``selected`` without the layers that share their weight (tied embeddings) or their
    trainable bias with another selected layer: the shared gradient sums both uses, which no
    Kronecker block of one layer describes, and each layer would overwrite the other's
    preconditioned gradient. Left out with a warning, or refused if the layers were chosen one
    by one."""
    owners: dict[int, list[str]] = {}
    for name, module in selected:
        for param in (module.weight, getattr(module, "bias", None)):
            if param is not None and param.requires_grad:
                owners.setdefault(id(param), []).append(name)
    tied = [names for names in owners.values() if len(names) > 1]
    if not tied:
        return selected
    if explicit:
        raise ValueError(
            f"layers {tied[0]} share one parameter; precondition it through one of them at most"
        )
    warn_at_caller(
        f"KFAC leaves out the layers {[name for names in tied for name in names]}: they share "
        "a parameter (tied weights or biases), whose gradient sums both uses, which a layer's "
        "Kronecker block does not describe. Pass layers=[...] with one of them to precondition "
        "the parameter as that layer's",
        RuntimeWarning,
    )
    left_out = {name for names in tied for name in names}
    return [(name, module) for name, module in selected if name not in left_out]


def _without_frequency_scaled(
    selected: list[tuple[str, nn.Module]], explicit: bool
) -> list[tuple[str, nn.Module]]:
    """``selected`` without the embeddings with ``scale_grad_by_freq=True``: autograd divides
    their gradient by the tokens' counts in the batch, which ``A`` (the tokens' frequencies)
    would divide again. Left out with a warning, or refused if chosen one by one."""
    scaled = [
        name
        for name, module in selected
        if isinstance(module, nn.Embedding) and module.scale_grad_by_freq
    ]
    if not scaled:
        return selected
    reason = (
        "scale_grad_by_freq=True: autograd divides their gradient by the tokens' counts in the "
        "batch, which K-FAC's input factor (the tokens' frequencies) would divide again"
    )
    if explicit:
        raise ValueError(f"embeddings {scaled} cannot be preconditioned: they have {reason}")
    warn_at_caller(
        f"KFAC leaves out the embeddings {scaled}, whose gradients keep their values: they have "
        f"{reason}. Set scale_grad_by_freq=False on them to precondition them",
        RuntimeWarning,
    )
    return [(name, module) for name, module in selected if name not in scaled]


def _select_modules(
    model: nn.Module, layers: Sequence[nn.Module] | Sequence[type[nn.Module]] | None
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """The ``(name, layer)`` pairs to precondition (see ``KFAC``'s ``layers``), and those that
    a selection by type leaves out only because their weight is frozen."""
    chosen = _chosen_layers(layers)
    by_type = chosen is None or all(isinstance(item, type) for item in chosen)
    candidates = _candidates(model, chosen, by_type)
    frozen = [(name, module) for name, module in candidates if not module.weight.requires_grad]
    selected = [(name, module) for name, module in candidates if module.weight.requires_grad]
    selected = _without_frequency_scaled(selected, explicit=not by_type)
    selected = _check_initialized(_without_shared_weights(selected, explicit=not by_type))
    return selected, frozen


def _chosen_layers(
    layers: Sequence[nn.Module] | Sequence[type[nn.Module]] | None,
) -> list[nn.Module] | list[type[nn.Module]] | None:
    """``layers`` as a list, checked to be all module types or all modules."""
    if layers is None:
        return None
    if isinstance(layers, nn.Module | type):
        raise TypeError(f"layers must be a sequence of modules or module types, got {layers!r}")
    chosen = list(layers)
    others = [item for item in chosen if not isinstance(item, nn.Module | type)]
    if others:
        raise TypeError(
            f"layers must hold modules or module types, got {others!r} (for a layer's name, "
            "pass model.get_submodule(name))"
        )
    kinds = {isinstance(item, type) for item in chosen}
    if len(kinds) > 1:
        raise TypeError(
            "layers must be all module types (nn.Linear, ...) or all modules of the model, "
            f"not a mix: got {chosen!r}"
        )
    return chosen


def _candidates(
    model: nn.Module, chosen: list[nn.Module] | list[type[nn.Module]] | None, by_type: bool
) -> list[tuple[str, nn.Module]]:
    """Layers of the ``chosen`` types (default: all K-FAC covers), frozen ones included, or
    the ``chosen`` modules, checked."""
    bypassed = _weight_used_directly(model)
    named = [(name, module) for name, module in model.named_modules() if id(module) not in bypassed]
    if by_type:
        types = DEFAULT_LAYER_TYPES if chosen is None else tuple(chosen)
        unknown = [item.__name__ for item in types if not issubclass(item, DEFAULT_LAYER_TYPES)]
        if unknown:
            raise ValueError(
                f"unsupported layer types {unknown}; use Linear, Conv1d, Conv2d, "
                "ConvTranspose1d, ConvTranspose2d, Embedding"
            )
        layers = []
        for name, module in named:
            if isinstance(module, nn.MultiheadAttention) and nn.Linear in types:
                layers += attention_projections(name, module)
            elif isinstance(module, RECURRENT_TYPES) and nn.Linear in types:
                layers += recurrent_projections(name, module)
            elif isinstance(module, types) and _preconditionable(module):
                layers.append((name, module))
        return layers
    names = {id(module): name for name, module in named}
    selected = []
    for module in chosen:
        if id(module) in bypassed:
            raise ValueError(
                "an nn.MultiheadAttention's out_proj is chosen with its attention: pass the "
                "nn.MultiheadAttention module (both its projections are preconditioned)"
            )
        if id(module) not in names:
            raise ValueError(f"layer {module!r} is not a submodule of the model")
        if isinstance(module, nn.MultiheadAttention) or isinstance(module, RECURRENT_TYPES):
            selected += _supported_projections(names[id(module)], module)
            continue
        if not _supported(module):
            raise ValueError(
                f"layer {names[id(module)]!r} ({type(module).__name__}) cannot be preconditioned: "
                "expected Linear, Conv1d, Conv2d, ConvTranspose1d, ConvTranspose2d or Embedding "
                "(dense gradients) with a "
                "trainable weight parameter (not one computed, by a parametrization or pruning)"
            )
        selected.append((names[id(module)], module))
    return selected


def _supported_projections(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The projections of an attention or the weights of a recurrent layer chosen by
    ``layers=``, refused if none can be preconditioned."""
    if isinstance(module, nn.MultiheadAttention):
        projections = attention_projections(name, module)
        covered = (
            "an attention's input projection (packed, or separate with kdim/vdim) and out_proj, "
            "with trainable weights"
        )
    else:
        projections = recurrent_projections(name, module)
        covered = "a recurrent layer's trainable weights that are not computed"
    supported = [pair for pair in projections if _supported(pair[1])]
    if not supported:
        raise ValueError(f"{name!r} cannot be preconditioned: K-FAC covers {covered}")
    return supported


class _LayerHook:
    """The forward hook of a preconditioned layer. It holds its preconditioner weakly (one
    that is dropped records nothing), and pickles and deep-copies to an inert hook: a model
    saved whole (``torch.save(model)``) or copied carries no preconditioner along, and a copy
    records nothing into this one's statistics."""

    def __init__(self, precond: KFAC | None, state: LayerState | None) -> None:
        self._precond = None if precond is None else weakref.ref(precond)
        self._state = state

    @torch.compiler.disable  # bookkeeping: under torch.compile it runs eagerly, uncompiled
    def __call__(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        precond = None if self._precond is None else self._precond()
        if precond is not None:
            precond._record_call(self._state, module, args[0], output)

    def __reduce__(self) -> tuple[type[_LayerHook], tuple[None, None]]:
        return _LayerHook, (None, None)


class _ModelHook:
    """The forward hook of the model while its layers' weights are not yet checked for uses
    outside the layers' calls (:meth:`KFAC._check_local_weights`); weakly held and inert when
    copied, as :class:`_LayerHook`."""

    def __init__(self, precond: KFAC | None) -> None:
        self._precond = None if precond is None else weakref.ref(precond)

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        precond = None if self._precond is None else self._precond()
        if precond is not None:
            precond._check_local_weights(module, output)

    def __reduce__(self) -> tuple[type[_ModelHook], tuple[None]]:
        return _ModelHook, (None,)


class _CallRecorder:
    """The output-gradient hook of one call of a preconditioned layer: on the first output
    gradient it records the call's input, then each output gradient (one per backward vector
    of the exact Fisher). A call on packed rows (``packed``) has ``packed.samples`` samples
    whatever its number of rows. A call at step ``steps[1]`` of a recurrent layer's unrolled
    loop hands its output gradients to ``steps[0]``, which records the loop's calls together."""

    def __init__(
        self,
        precond: KFAC,
        state: LayerState,
        layer_input: Tensor,
        call_pass: int,
        packed: PackedRows | None = None,
        steps: tuple[StepCalls | None, int] = (None, 0),
    ):
        self._precond = precond
        self._state = state
        self._layer_input: Tensor | None = layer_input
        self._features: Tensor | None = None
        self._call_pass = call_pass
        self._packed = () if packed is None else (packed,)  # passed on only when given
        self._steps = steps

    def __call__(self, grad: Tensor) -> None:
        precond = self._precond
        if precond._probing:  # the locality check's backward pass
            return
        if precond._sampling:
            self._record(grad, 1.0, precond._vector)
        elif precond.fisher_type == "empirical":
            samples = self._packed[0].samples if self._packed else grad.shape[0]
            scale = samples * precond.accumulation_steps / precond._current_loss_scale()
            self._record(grad, scale, 0)

    def _record(self, grad: Tensor, scale: float, vector: int) -> None:
        calls, step = self._steps
        if calls is not None:  # held until the step reads the statistics
            self._precond._step_calls.setdefault(id(calls), calls)
            calls.receive(step, grad, scale, vector)
            return
        if self._layer_input is not None:
            self._features = self._state.record_input(self._layer_input, *self._packed)
            self._layer_input = None
        self._state.record_output_grad(
            grad, scale, self._features, self._call_pass, vector, *self._packed
        )


class KFAC:
    """K-FAC preconditioner: rewrites ``.grad`` of Linear, (transposed) convolution and
    Embedding layers in place.

    Parameters
    ----------
    model : nn.Module
        The model (or its ``DistributedDataParallel`` wrapper).
    fisher_type : {"empirical", "mc", "exact"}, default "empirical"
        ``"empirical"``: output gradients from ``loss.backward()`` (the loss must be the MEAN
        over the batch, divided by ``accumulation_steps`` when accumulating; under
        ``DistributedDataParallel`` each process's loss is the mean over its own batch, and
        with local batches of unequal sizes the factors are still those of the global batch,
        although DDP's average of the local means is not the global batch's mean gradient).
        ``"mc"``: output
        gradients of the NLL at targets sampled from the model, recorded by
        :meth:`sample_backward`, which must be called after the forward pass and before
        ``loss.backward()``; needs ``likelihood``. ``"exact"``: the same, with the ``C``
        columns of ``∇²A(f)^{1/2}`` back-propagated in turn instead of one sampled gradient
        (the expectation over the targets, with no sampling noise, for ``C`` backward passes
        per recording step: for models with few outputs).
    likelihood : str or Likelihood, optional
        For ``fisher_type="mc"`` and ``"exact"``.
    mc_samples : int, default 1
        ``fisher_type="mc"``: targets drawn per sample on a recording step, one backward pass
        each, their outer products averaged (less noise in ``G`` for more backward passes).
    factor_decay : float in [0, 1) or callable(step) -> float, default 0.95
        Exponential-moving-average weight of the old factors (0 keeps only the last batch),
        applied once per factor update: the factors remember about
        ``factor_update_interval / (1 − factor_decay)`` steps. A schedule is read at each
        factor update with the step count, e.g. a short memory while the curvature changes
        fast early in training and a long one later.
    factor_update_interval, inv_update_interval : int, default 1 and 10
        Statistics are recorded, and factors updated, on steps divisible by the first;
        eigendecompositions (factored damping: the factors to invert) are refreshed on steps
        divisible by the second.
    damping : float or callable(step) -> float, default 1e-3
        Tikhonov damping ``λ`` (with ``adaptive_damping``: its initial value, a positive float).
    adaptive_damping : bool, default False
        Adapt ``λ`` by the Levenberg–Marquardt rule (see :meth:`update_damping`).
    damping_adaptation_interval : int, default 5
        ``T``: the damping is adapted after the steps divisible by ``T`` (from ``start_step``).
    damping_decay : float in (0, 1), optional
        ``ω``: ``λ ← ω λ`` when the reduction ratio exceeds 3/4, ``λ ← λ / ω`` when it is below
        1/4. Default ``(19/20)^T`` (Martens & Grosse 2015).
    damping_bounds : (float, float), default (1e-8, 1e8)
        The adapted damping is kept within these.
    damping_mode : {"eigen", "factored"}, default "eigen"
        ``"eigen"``: exact ``(G ⊗ A + λI)⁻¹`` in the Kronecker eigenbasis. ``"factored"``:
        ``(G + λ_G I)⁻¹ ⊗ (A + λ_A I)⁻¹`` with Martens & Grosse's π (needs ``λ > 0``), both
        inverses by Cholesky (float64 retry, then a clamped eigendecomposition, for a factor
        whose Cholesky fails), re-formed from the factors of the last refresh when ``λ``
        changes.
    kl_clip : float, optional
        If given, the preconditioned gradients ``d`` are scaled by
        ``ν = min(1, sqrt(kl_clip / |Σ_l lr_l² d_l · g_l|))`` (kfac-pytorch's KL clipping),
        ``lr_l`` the learning rate that layer ``l``'s step is taken with.
    lr : float, callable(step) -> float or torch.optim.Optimizer, optional
        Learning rate of the base optimizer, needed by ``kl_clip``. Given the optimizer itself,
        its current learning rates are read at every step, so LR schedulers are followed, each
        layer's from the param group holding its weight (its bias, if any, must be in a group
        with the same learning rate).
    layers : sequence of modules or module types, optional
        Layers to precondition; default every Linear, Conv1d, Conv2d, ConvTranspose1d and
        ConvTranspose2d (grouped convolutions, depthwise included, with one Kronecker block per
        group; a transposed convolution as the convolution of its zero-inserted, padded input,
        called without ``output_size=``) and Embedding (not ``sparse``)
        with a trainable weight that is not computed (parametrized by ``weight_norm``, or
        pruned by ``torch.nn.utils.prune``: such a weight has no gradient of its own), the
        packed input projection (``"{name}.in_proj"``) and ``out_proj`` of every
        ``nn.MultiheadAttention`` (the input projection with one block for each of its query,
        key and value rows, in self- and cross-attention; with ``kdim``/``vdim`` the separate
        weights ``"{name}.q_proj"``, ``"{name}.k_proj"``, ``"{name}.v_proj"``, their packed bias
        keeping its gradient; see
        :mod:`natgrad.optim.kfac_attention`; choose an attention's projections by passing the
        attention module), the weights of every ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and their
        cells (``"{name}.ih_l0"``, ``"{name}.hh_l0"``, ...: each with its bias, applied at
        every time step; see :mod:`natgrad.optim.kfac_recurrent`; choose them by passing the
        recurrent module; attentions and recurrent layers are selected with ``nn.Linear`` by
        type), except
        embeddings with ``scale_grad_by_freq=True`` (their gradient is divided by the
        tokens' counts, which ``A`` would divide again: left out with a warning; choosing
        one raises) and layers that share their weight with another (tied embeddings: left
        out with a warning; choosing several of them raises). A layer called several times
        in one forward pass (a siamese branch, an unrolled cell) pools the locations of its
        calls as those of one call (K-FAC-expand over the calls; with ``"reduce"``, each
        call reduced over its own locations). All other parameters keep their gradients. A
        chosen layer that records nothing on a recording step although its weight has a
        gradient (eval mode, a weight used without its layer) is named in a
        ``RuntimeWarning``, once. Layers frozen when the preconditioner is built are left
        out (named in a ``RuntimeWarning`` if they get gradients later); layers frozen
        afterwards record nothing while frozen and are preconditioned again once unfrozen
        (staged fine-tuning: build it with every layer trainable).
    accumulation_steps : int, default 1
        Number of backward passes per :meth:`step` (gradient accumulation); statistics of all
        of them are combined.
    start_step : int, default 0
        Before this step ``.grad`` is left untouched (statistics are still recorded), so the
        preconditioner reproduces the base optimizer exactly.
    inverse_placement : {"replicated", "assigned"}, default "replicated"
        Under ``torch.distributed``: ``"replicated"`` computes every eigendecomposition (factored
        damping: every damped inverse) on every process (no communication, redundant compute);
        ``"assigned"`` computes each layer's on one process (greedy balance of ``d³`` costs)
        and broadcasts it (less compute per process, one broadcast of ``O(d²)`` per layer and
        refresh or damping change). Both give identical results.
    kfac_approx : {"expand", "reduce"}, default "expand"
        How a layer with several locations per sample (a convolution's spatial positions, a
        ``Linear`` applied to ``(N, ..., d_in)``, e.g. a sequence) forms its factors:
        ``"expand"`` treats every location as a sample (KFC, Grosse & Martens 2016);
        ``"reduce"`` averages each sample's inputs and sums its output gradients over the
        locations first (K-FAC-reduce, Eschenhagen et al. 2023), which builds the factors
        from ``N`` rows instead of ``N·T`` (and, for a convolution, without gathering its
        patches). Both coincide for ``(N, d_in)`` inputs; embeddings always expand.
    process_group : ProcessGroup, optional
        Group over which factors are all-reduced (default: the world).
    generator : torch.Generator, optional
        Randomness of ``fisher_type="mc"``.
    grad_scaler : torch.amp.GradScaler or callable() -> float, optional
        Mixed precision with loss scaling: the scaler (or a function returning the current loss
        scale). The output gradients that ``fisher_type="empirical"`` records from the scaled
        ``loss.backward()`` are divided by the scale, which would otherwise multiply ``G`` by
        its square. Call ``scaler.unscale_(optimizer)`` before :meth:`step`, so that the
        unscaled gradients are preconditioned. (``"mc"`` records its own unscaled backward.)

    Attributes
    ----------
    layers : list of LayerState
        The preconditioned layers, in module order (``.name``, ``.input_factor``,
        ``.output_factor``, ...).
    steps : int
        Calls of :meth:`step` so far.
    last_kl_scale : float, Tensor or None
        With ``kl_clip``: the factor ``ν`` of the last step that preconditioned gradients, 1.0
        where the clip did not bind (a 0-dim tensor on an accelerator, which reading
        synchronises); ``None`` before such a step and without ``kl_clip``. How often the clip
        binds tells whether ``kl_clip`` or the learning rate sizes the steps.
    last_damping_update : dict of str to float or None
        With ``adaptive_damping``: the last :meth:`update_damping`'s record.

    Notes
    -----
    Factors follow :mod:`natgrad.curvature.kfac_capture` (mean over samples; convolutions
    averaged over locations in ``A``, summed in ``G``) and are kept in float32 (float64 for
    float64 parameters), also under ``torch.autocast``. Under ``torch.distributed`` the sums of
    the statistics and the sample counts are all-reduced, so N processes equal one process on the
    global batch.

    Statistics are recorded only by modules in training mode with gradients enabled, and not
    while natgrad's curvature builders (``natgrad.fisher``, ``ggn``, ``hessian``, and the
    optimizers built on them) run the model; call :meth:`remove` before running it under
    ``torch.func`` transforms of your own. Like a
    ``torch.optim`` optimizer, the preconditioner holds the layers' parameters: build it after
    anything that replaces them (``model.load_state_dict(..., assign=True)``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        fisher_type: str = "empirical",
        likelihood: str | Likelihood | None = None,
        mc_samples: int = 1,
        factor_decay: Schedule = 0.95,
        factor_update_interval: int = 1,
        inv_update_interval: int = 10,
        damping: Schedule = 1e-3,
        adaptive_damping: bool = False,
        damping_adaptation_interval: int = 5,
        damping_decay: float | None = None,
        damping_bounds: tuple[float, float] = (1e-8, 1e8),
        damping_mode: str = "eigen",
        kl_clip: float | None = None,
        lr: Schedule | torch.optim.Optimizer | None = None,
        layers: Sequence[nn.Module] | Sequence[type[nn.Module]] | None = None,
        accumulation_steps: int = 1,
        start_step: int = 0,
        inverse_placement: str = "replicated",
        kfac_approx: str = "expand",
        process_group: dist.ProcessGroup | None = None,
        generator: torch.Generator | None = None,
        grad_scaler: torch.amp.GradScaler | Callable[[], float] | None = None,
    ) -> None:
        fisher_type = one_of("fisher_type", fisher_type, ("empirical", "mc", "exact"))
        if fisher_type != "empirical" and likelihood is None:
            raise ValueError(
                f"fisher_type={fisher_type!r} needs a likelihood (its targets or ∇²A come from it)"
            )
        damping_mode = one_of("damping_mode", damping_mode, ("eigen", "factored"))
        kl_clip = positive_float("kl_clip", kl_clip, allow_none=True)
        if kl_clip is not None and lr is None:
            raise ValueError("kl_clip needs the base optimizer's learning rate (lr=...)")
        self.fisher_type = fisher_type
        self.likelihood = None if likelihood is None else get_likelihood(likelihood)
        self.factor_decay = (
            factor_decay if callable(factor_decay) else unit_interval("factor_decay", factor_decay)
        )
        self.factor_update_interval = positive_int("factor_update_interval", factor_update_interval)
        self.inv_update_interval = positive_int("inv_update_interval", inv_update_interval)
        self.damping = damping if callable(damping) else nonnegative_float("damping", damping)
        self.adaptive_damping = bool(adaptive_damping)
        self.damping_adaptation_interval = positive_int(
            "damping_adaptation_interval", damping_adaptation_interval
        )
        self.damping_decay = _check_adaptive_damping(
            adaptive_damping, damping, damping_decay, damping_bounds, damping_adaptation_interval
        )
        self.damping_bounds = (float(damping_bounds[0]), float(damping_bounds[1]))
        self.last_damping_update: dict[str, float] | None = None
        self.last_kl_scale: float | Tensor | None = None
        self._damping_probe: _DampingProbe | None = None
        self.damping_mode = damping_mode
        self.kl_clip = kl_clip
        self.lr = (
            lr
            if lr is None or callable(lr) or isinstance(lr, torch.optim.Optimizer)
            else nonnegative_float("lr", lr)
        )
        self.accumulation_steps = positive_int("accumulation_steps", accumulation_steps)
        self.start_step = nonnegative_int("start_step", start_step)
        self.inverse_placement = one_of(
            "inverse_placement", inverse_placement, ("replicated", "assigned")
        )
        self.kfac_approx = one_of("kfac_approx", kfac_approx, KFAC_APPROXIMATIONS)
        self.process_group = process_group
        self.generator = generator
        self.mc_samples = positive_int("mc_samples", mc_samples)
        if not (
            grad_scaler is None
            or callable(grad_scaler)
            or isinstance(grad_scaler, torch.amp.GradScaler)
        ):
            raise TypeError(
                "grad_scaler must be a torch.amp.GradScaler or a callable returning the loss "
                f"scale, got {type(grad_scaler).__name__}"
            )
        self.grad_scaler = grad_scaler
        self._loss_scale: float | None = None
        self._warned_silent: set[str] = set()
        self._warned_biases: set[str] = set()
        self._warned_samples = False
        self._written: dict[str, tuple[weakref.ref, int]] = {}
        self.steps = 0
        self._sampling = False
        self._vector = 0
        self._sampled = False
        self._paused = False
        self._probing = False
        self._output_edges: list[GradientEdge] = []
        self._model = model
        self._weights_checked = False
        self._probe_calls: dict[str, list[tuple[Tensor, GradientEdge]]] = {}
        selected, self._frozen_layers = _select_modules(model, layers)
        self.layers: list[LayerState] = [
            self._make_state(name, module) for name, module in selected
        ]
        if not self.layers:
            frozen = [name for name, _ in self._frozen_layers]
            kinds = "Linear, Conv1d, Conv2d, ConvTranspose1d, ConvTranspose2d or Embedding"
            if layers is not None and all(isinstance(item, type) for item in layers):
                kinds = " or ".join(item.__name__ for item in layers) or kinds
            raise ValueError(
                f"model has no {kinds} layer to precondition"
                + (f": those of {frozen} are frozen" if frozen else "")
            )
        self._attention = self._attention_layers(model)
        self._recurrent = self._recurrent_layers(model)
        self._attached = True
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._output_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._step_calls: dict[int, StepCalls] = {}  # the loops with output gradients, by id
        self._sync_hooks()

    # -- construction ----------------------------------------------------------------------
    def _make_state(self, name: str, module: nn.Module) -> LayerState:
        if isinstance(module, nn.Embedding):
            return EmbeddingState(name, module, keep_pairs=self._keeps_pairs())
        if isinstance(module, PackedInProjection):
            state_type = PackedProjectionState
        elif isinstance(module, CONV_TYPES) and module.groups > 1:
            state_type = GroupedConvState
        else:
            state_type = KroneckerLayerState
        return state_type(
            name, module, keep_pairs=self._keeps_pairs(), reduce=self.kfac_approx == "reduce"
        )

    def _keeps_pairs(self) -> bool:
        return False

    def _attention_layers(self, model: nn.Module) -> list[AttentionLayers]:
        """The attentions with a preconditioned projection, and their projections' states."""
        by_name = {state.name: state for state in self.layers}
        found = []
        for name, module in model.named_modules():
            if isinstance(module, nn.MultiheadAttention):
                prefix = f"{name}." if name else ""
                input_state = by_name.get(f"{prefix}in_proj")
                output_state = by_name.get(f"{prefix}out_proj")
                separate = tuple(by_name.get(f"{prefix}{kind}_proj") for kind in SEPARATE)
                if input_state is not None or output_state is not None or any(separate):
                    found.append(AttentionLayers(module, input_state, output_state, separate))
        return found

    def _recurrent_layers(self, model: nn.Module) -> list[RecurrentLayers]:
        """The recurrent layers with a preconditioned weight, and their weights' states."""
        by_weight = {id(state.weight): state for state in self.layers}
        found = []
        for module in model.modules():
            if isinstance(module, RECURRENT_TYPES):
                params = module.parameters(recurse=False)
                states = [by_weight[id(param)] for param in params if id(param) in by_weight]
                if states:
                    found.append(RecurrentLayers(module, states))
        return found

    # -- hooks ---------------------------------------------------------------------------------
    def _sync_hooks(self) -> None:
        """Forward hooks are on the layers only for steps that record statistics, so that the
        other steps run the model without any hook."""
        wanted = self._attached and self.steps % self.factor_update_interval == 0
        if wanted and not self._handles:
            self._handles = [
                state.module.register_forward_hook(_LayerHook(self, state)) for state in self.layers
            ]
            for layers in self._attention:
                hooks = ModeHooks(self, AttentionRecording, layers)
                self._handles += hooks.register(layers.module)
            for layers in self._recurrent:
                hooks = ModeHooks(self, RecurrentRecording, layers)
                self._handles += hooks.register(layers.module)
            if not self._weights_checked:
                self._handles.append(self._model.register_forward_hook(_ModelHook(self)))
        elif not wanted:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    def _recording(self, module: nn.Module) -> bool:
        return not self._paused and self._unrolling(module)

    def _unrolling(self, module: nn.Module) -> bool:
        """Whether a recording mode takes over ``module``'s fused function (unrolled recurrent
        steps, explicit attention projections): on recording steps, also while recording is
        paused, so that a recomputation under activation checkpointing in a paused backward
        pass (the weight-locality probe's) runs the operations of the forward it recomputes."""
        return (
            module.training
            and torch.is_grad_enabled()
            and self.steps % self.factor_update_interval == 0
            and not in_curvature_evaluation()  # natgrad.fisher & co. running the model
        )

    def _record_call(
        self,
        state: LayerState,
        module: nn.Module,
        layer_input: Tensor,
        output: Tensor,
        packed: PackedRows | None = None,
        steps: tuple[StepCalls | None, int] = (None, 0),
    ) -> None:
        """A call of ``state``'s layer (its forward hook): hook its output, so that the call
        is recorded (its input and output gradients) when the output gradient arrives.
        ``packed`` places the rows of a call on some of the batch's samples (a recurrent layer
        on a packed sequence): the call then counts all ``packed.samples`` samples. A call at
        step ``steps[1]`` of an unrolled loop is recorded with the loop's other steps by
        ``steps[0]`` (:class:`~natgrad.optim.kfac_recurrent.StepCalls`).

        A call whose output is never back-propagated (a forward pass with gradients enabled
        for a metric, say) records nothing: its inputs would add rows to ``A`` without any
        output gradient in ``G``."""
        if not self._recording(module) or not state.weight.requires_grad:  # frozen after build
            return
        check_layer_input(module, layer_input, state.name)
        check_layer_output(module, layer_input, output, state.name)
        if not output.requires_grad:
            return
        state.follow_weight()
        if not self._weights_checked:
            edge = get_gradient_edge(output)  # the output as produced, before in-place ops
            self._probe_calls.setdefault(state.name, []).append((layer_input.detach(), edge))
        call_pass = state.begin_call()
        layer_input = layer_input.detach()
        calls, step = steps
        if calls is not None:
            calls.add(step, layer_input, call_pass)
        hook = _CallRecorder(self, state, layer_input, call_pass, packed, steps)
        handle = output.register_hook(hook)
        if self.fisher_type != "empirical":  # the edge: an in-place op may rewrite `output`
            self._output_edges.append(get_gradient_edge(output))
            self._output_handles.append(handle)

    def _check_local_weights(self, model: nn.Module, outputs: Any) -> None:
        """At the end of the first forward pass that recorded, check that the weights of the
        layers called in it have no use outside the layers' calls
        (:func:`~natgrad.curvature.weight_locality.foreign_weight_uses`: one probe vector
        back-propagated from the model's outputs, once per model). Such a use (a tied
        decoder's ``F.linear(h, encoder.weight.t())``) adds gradient that the hooks never see:
        the layer's factors would describe another model.

        Raises
        ------
        ValueError
            Naming the first such layer.
        """
        calls, self._probe_calls = self._probe_calls, {}
        if not calls:  # a pass that recorded nothing (eval mode, no gradients): check later
            return
        self._weights_checked = True
        if not isinstance(outputs, Tensor):
            return
        layers = [
            state.layer
            for state in self.layers
            if type(state) in (KroneckerLayerState, GroupedConvState, EmbeddingState)
            and state.name in calls
            and all(param.requires_grad for param in state.layer.parameters())
        ]
        self._probing = True
        try:
            with self.recording_paused():
                foreign = foreign_weight_uses(model, layers, calls, outputs)
        finally:
            self._probing = False
        if foreign:
            raise ValueError(
                f"KFAC: the weight or bias of layer {foreign[0]!r} is also used outside the "
                "layer's calls (e.g. F.linear(x, layer.weight), or a decoder applying an "
                "encoder's weight transposed): the hooks on the layer do not see that use, so "
                "its Kronecker factors would describe another model. Call the layer itself for "
                "every use, give the other use its own parameter, or leave the layer out with "
                "layers=... (its gradient then passes through)"
            )

    def _current_loss_scale(self) -> float:
        """The loss scale of this step's backward passes (read once per step: a scaler changes
        it only in ``update()``, after the optimizer's step)."""
        if self._loss_scale is None:
            scaler = self.grad_scaler
            if scaler is None:
                scale = 1.0
            elif isinstance(scaler, torch.amp.GradScaler):
                scale = float(scaler.get_scale())
            else:
                scale = float(scaler())
            self._loss_scale = positive_float("loss scale of grad_scaler", scale)
        return self._loss_scale

    def sample_backward(self, outputs: Tensor) -> None:
        """Record output gradients of ``Σ_n nll(f_n, y_n)`` at targets ``y_n ~ p(y | f_n)``
        (``fisher_type="mc"``), or of ``Σ_n s_nc · f_n`` for each column ``s_c`` of
        ``∇²A(f_n)^{1/2}`` in turn (``"exact"``).

        Call after the forward pass that produced ``outputs`` and before ``loss.backward()``.
        Parameter gradients are not touched.

        Parameters
        ----------
        outputs : Tensor of shape (N, C) or (N,)
            The natural parameters of ``likelihood`` (logits, means, ...). Outputs per position
            ``(N, T, C)`` are passed flattened to ``(N·T, C)``: each position draws its own
            target, and ``G`` sums over the positions of a sample.
        """
        if self.fisher_type == "empirical":
            raise ValueError("sample_backward is used with fisher_type='mc' or 'exact'")
        if outputs.ndim > 2:
            raise ValueError(
                f"sample_backward takes outputs of shape (N, C) or (N,), got "
                f"{tuple(outputs.shape)}; for an output per position, (N, T, C), pass them "
                "flattened, outputs.flatten(0, -2): G then sums over the positions (see "
                "docs/kfac.md)"
            )
        edges, self._output_edges = self._output_edges, []
        handles, self._output_handles = self._output_handles, []
        if not edges:
            return
        self._sampled = True
        vectors = backward_vectors(
            outputs, self.likelihood, self.fisher_type, None, self.mc_samples, self.generator
        )
        self._sampling = True
        try:
            for index, vector in enumerate(vectors):
                self._vector = index
                vector = vector.reshape(outputs.shape)
                torch.autograd.grad(outputs, edges, vector, retain_graph=True, allow_unused=True)
        finally:
            self._sampling = False
            self._vector = 0
            for handle in handles:  # the loss backward has nothing to record
                handle.remove()

    @contextlib.contextmanager
    def recording_paused(self) -> Iterator[None]:
        """Within this block no statistics are recorded (e.g. while a closure is re-evaluated
        to measure the loss after a step), whatever the step."""
        paused, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = paused

    def discard_statistics(self) -> None:
        """Drop what has been recorded since the last :meth:`step` (the sums of the forward and
        backward passes so far, and the layer outputs awaiting :meth:`sample_backward`); the
        factors are kept. For a caller that undoes the parameters those passes ran at (a
        rejected step) and runs its closure again."""
        for state in self.layers:
            state.reset_sums()
            state.pairs.clear()
        self._step_calls.clear()
        for handle in self._output_handles:
            handle.remove()
        self._output_edges, self._output_handles = [], []
        self._sampled = False

    def remove(self) -> None:
        """Detach the hooks from the model."""
        self._attached = False
        self._sync_hooks()

    def __getstate__(self) -> dict[str, Any]:
        """``copy.deepcopy`` / ``pickle`` state: everything but the hook handles, the layer
        outputs of a pass not yet sampled and the stamps of written gradients (weak
        references). Copied with its model (``copy.deepcopy((model, precond, optimizer))``),
        the copy hooks the copied layers and continues as the original would."""
        state = dict(self.__dict__)
        state.update(
            _handles=[],
            _output_edges=[],
            _output_handles=[],
            _written={},
            _probe_calls={},
            _step_calls={},
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._sync_hooks()

    # -- the step ------------------------------------------------------------------------------
    def current_damping(self) -> float:
        """``λ`` at the current step."""
        return _schedule_value("damping", self.damping, self.steps)

    def current_factor_decay(self) -> float:
        """``factor_decay`` at the current step (a schedule's value, checked to lie in
        ``[0, 1)``)."""
        if not callable(self.factor_decay):
            return self.factor_decay
        value = self.factor_decay(self.steps)
        return unit_interval(f"factor_decay at step {self.steps}", value)

    @property
    def inverse_update_due(self) -> bool:
        """Whether the next :meth:`step` refreshes the eigenbases (factored damping: the factors
        to invert)."""
        return self.steps % self.inv_update_interval == 0

    @property
    def damping_update_due(self) -> bool:
        """Whether the last :meth:`step` waits for :meth:`update_damping`."""
        return self._damping_probe is not None

    @torch.no_grad()
    def update_damping(self, loss_before: float | Tensor, loss_after: float | Tensor) -> float:
        """Levenberg–Marquardt update of ``λ`` from the step taken since the last :meth:`step`.

        Call after ``optimizer.step()`` when :attr:`damping_update_due` is true, with the loss
        of the batch before the step (the one whose gradient :meth:`step` preconditioned) and
        the loss of the same batch at the new parameters (evaluate it under ``torch.no_grad()``
        so that no statistics are recorded). With ``δ`` the change of the preconditioned
        layers' parameters, ``g`` their gradient and ``C`` the K-FAC (EKFAC) curvature, the
        quadratic model predicts ``gᵀδ + ½ δᵀ(C + λI)δ``; the reduction ratio
        ``ρ = (loss_after − loss_before) / predicted`` sets ``λ ← ω λ`` if ``ρ > 3/4`` and
        ``λ ← λ / ω`` if ``ρ < 1/4``
        (:func:`~natgrad.optim.trust_region.levenberg_marquardt_damping`).
        Parameters outside the preconditioned layers are not in the model. Under
        ``torch.distributed`` pass losses averaged over the processes so that all agree.

        Returns
        -------
        float
            The new damping; :attr:`last_damping_update` holds ``actual``, ``predicted``,
            ``ratio`` and the old and new damping. The ratio is ``-inf`` (a failed step,
            ``λ`` raised) when the new loss is not finite, or the model predicted a rise and the
            loss rose; NaN (``λ`` unchanged) when the model predicts no change that the losses'
            round-off resolves (a zero gradient, a zero learning rate;
            :func:`~natgrad.optim.trust_region.loss_resolution`) or a rise that did not
            happen.

        Raises
        ------
        ValueError
            If no step awaits assessment (``adaptive_damping`` off, or not a step divisible by
            ``damping_adaptation_interval``, or already assessed), or ``loss_before`` is not
            finite.
        """
        if self._damping_probe is None:
            raise ValueError(
                "update_damping: no step awaits assessment; call it only when "
                "damping_update_due is true (adaptive_damping=True, once per adaptation step)"
            )
        before = float(loss_before)
        if not math.isfinite(before):
            raise ValueError(f"loss_before must be finite, got {before!r}")
        probe, self._damping_probe = self._damping_probe, None
        linear, quadratic = 0.0, 0.0
        for state, grad, params_before in probe.layers:
            delta = state.param_matrix() - params_before
            linear += float((grad * delta).sum())
            quadratic += float(
                state.curvature_quadratic(delta) + probe.damping * delta.square().sum()
            )
        predicted = linear + 0.5 * quadratic
        after = float(loss_after)
        dtype = loss_before.dtype if isinstance(loss_before, Tensor) else probe.dtype()
        self.last_damping_update = damping_update(
            probe.damping,
            after - before,
            predicted,
            decay=self.damping_decay,
            bounds=self.damping_bounds,
            tolerance=loss_resolution(before, after, dtype),
        )
        self.damping = self.last_damping_update["damping_after"]
        return self.damping

    @torch.no_grad()
    def step(self) -> None:
        """Update factors/eigenbases (or damped inverses) as scheduled, then precondition the
        gradients in place.

        Raises
        ------
        RuntimeError
            If no backward pass ran since the last step (every gradient is the one that step
            wrote, unchanged), or with ``fisher_type="mc"`` or ``"exact"`` if this step's
            forward pass was not followed by :meth:`sample_backward` (its statistics are
            discarded).
        """
        agreement = Agreement(self.process_group)
        with agreement.local():  # agreed at the factor all-reduce, if this step has one
            self._check_new_gradients()
            self._check_sampled()
        updates_factors = self.steps % self.factor_update_interval == 0
        if not updates_factors:
            agreement.settle()
        self._record_pending_steps()
        for state in self.layers:
            state.follow_weight()
            state.drop_frozen_bias()
        self._warn_unfrozen()
        self._warn_unfrozen_biases()
        self._damping_probe = None
        self._loss_scale = None
        if updates_factors:
            self._update_factors(agreement)
        factored = self._inverts_factors()
        stale = self._stale_layers(factored)
        if factored:
            for state in stale:
                state.refresh_inverted_factors()
        else:
            self._update_eigens(stale, agreement)
        self._update_eigenvalues(stale)
        if self.steps >= self.start_step:
            damping = self.current_damping()
            if factored:
                self._update_factored_inverses(damping, agreement)
            self._precondition(damping)
        self.steps += 1
        self._sync_hooks()

    def _stale_layers(self, factored: bool) -> list[LayerState]:
        """The layers with factors whose curvature (eigenbases; factored damping: the factors to
        invert) is refreshed at this step: all at a scheduled refresh, else those without any."""
        with_factors = [
            state
            for state in self.layers
            if state.input_factor is not None and state.weight.requires_grad
        ]
        if self.inverse_update_due:
            return with_factors
        return [state for state in with_factors if not state.has_curvature(factored)]

    def _check_new_gradients(self) -> None:
        """Refuse a second step on the same gradients (``step()`` called twice, or beside a
        :class:`~natgrad.optim.QuadraticModelOptimizer` that calls it): they would be
        preconditioned twice. A gradient is the same when it is the tensor the last step wrote
        (a weak reference, so no old gradient is kept alive) at the version it left it."""
        unchanged = False
        for state in self.layers:
            grad = state.weight.grad
            if grad is None:
                continue
            if not _unchanged_since(self._written.get(state.name), grad):
                return
            unchanged = True
        if not unchanged:
            return
        raise RuntimeError(
            "KFAC.step() was called again without a backward pass in between: the gradients "
            "are already preconditioned. Call it once per backward pass (a "
            "QuadraticModelOptimizer calls it itself)"
        )

    def _record_pending_steps(self) -> None:
        """Record the unrolled loops' steps whose output gradients have not all arrived (see
        :class:`~natgrad.optim.kfac_recurrent.StepCalls`), each backward vector's together."""
        calls, self._step_calls = list(self._step_calls.values()), {}
        vectors = sorted({vector for steps in calls for vector in steps.pending_vectors()})
        for vector in vectors:
            for steps in calls:
                steps.record_pending(vector)

    def _check_sampled(self) -> None:
        """Clear the layer outputs no :meth:`sample_backward` took (those of a recomputation
        under activation checkpointing, say), and refuse a Monte-Carlo step whose recorded
        forward pass was never sampled from: without :meth:`sample_backward` no output gradient
        is recorded and K-FAC would silently leave every gradient as it is."""
        sampled, self._sampled = self._sampled, False
        recorded = bool(self._output_edges)
        for handle in self._output_handles:
            handle.remove()
        self._output_edges, self._output_handles = [], []
        if self.fisher_type == "empirical" or sampled or not recorded:
            return
        raise RuntimeError(
            f"fisher_type={self.fisher_type!r} records its statistics in "
            "precond.sample_backward(outputs), which was not called after this step's forward "
            "pass: call it after the forward pass and before loss.backward()"
        )

    def _warn_unfrozen(self) -> None:
        """Warn (once per layer) about layers left out because their weight was frozen when the
        preconditioner was built, once they have gradients: those pass through."""
        unfrozen = [name for name, module in self._frozen_layers if module.weight.grad is not None]
        if not unfrozen:
            return
        self._frozen_layers = [pair for pair in self._frozen_layers if pair[0] not in unfrozen]
        warn_at_caller(
            f"KFAC: layers {unfrozen} have gradients but were frozen when the preconditioner "
            "was built, so their gradients are left as they are. Build it while they are "
            "trainable and freeze them afterwards: frozen layers record nothing and are "
            "preconditioned again once unfrozen",
            RuntimeWarning,
        )

    def _warn_unfrozen_biases(self) -> None:
        """Warn (once per layer) about biases left out because they were frozen when the
        preconditioner was built (or frozen since), once they have gradients."""
        names = [
            state.name
            for state in self.layers
            if state.name not in self._warned_biases and state.bias_passed_through()
        ]
        if not names:
            return
        self._warned_biases.update(names)
        warn_at_caller(
            f"KFAC: the biases of layers {names} have gradients but were frozen when the "
            "preconditioner was built (or frozen since), so their gradients are left as they "
            "are and the weights are preconditioned without them. Build the preconditioner "
            "while they are trainable to precondition them with their weights",
            RuntimeWarning,
        )

    def _warn_silent_layers(self, silent: list[LayerState]) -> None:
        """Warn (once per layer) about layers that recorded nothing on a recording step although
        their weight has a gradient: their gradients are passed through, which the user should
        know."""
        names = []
        for state in silent:
            grad = state.weight.grad
            if state.name in self._warned_silent or grad is None or not bool(grad.any()):
                continue
            self._warned_silent.add(state.name)
            names.append(state.name)
        if names:
            warn_at_caller(
                f"KFAC: layers {names} recorded no statistics on step {self.steps} although "
                "their weights have gradients, so their gradients are left as they are. Either a "
                "parent module uses their weights without calling their forward(), or they ran "
                "in eval mode (statistics are recorded in training mode only) or while recording "
                "was paused; call model.train(), or leave them out with layers=...",
                RuntimeWarning,
            )

    def _warn_unequal_samples(self, pending: list[LayerState]) -> None:
        """Warn (once) if the layers of one step counted different numbers of samples. K-FAC
        reads dim 0 of each layer's input and output as the samples; a layer that sees them
        elsewhere (a sequence-first transformer), or not at all (an input shared by the batch,
        such as the positions of a positional embedding), gets a ``G`` scaled by the wrong
        count."""
        if self._warned_samples:
            return
        by_count: dict[int, list[str]] = {}
        for state in pending:
            by_count.setdefault(round(state.output_count), []).append(state.name)
        if len(by_count) < 2:
            return
        self._warned_samples = True
        warn_at_caller(
            f"KFAC: the layers counted different numbers of samples on step {self.steps} "
            f"(samples: layers {by_count}). K-FAC takes dim 0 of every layer's input and output "
            "as the samples: give sequence models their batch first (batch_first=True for "
            "nn.Transformer, nn.MultiheadAttention and RNNs), and expand an input that all "
            "samples share to the batch (a positional embedding's "
            "torch.arange(T).expand(N, T), not torch.arange(T)), or the layers whose dim 0 is "
            "not the batch get their output factor scaled by the wrong count",
            RuntimeWarning,
        )

    def _update_factors(self, agreement: Agreement) -> None:
        """Fold this step's statistics into the factors; under ``torch.distributed`` after
        all-reducing them, with ``agreement``'s failure flag (every process raises if one
        failed before)."""
        if is_distributed(self.process_group):
            statistics = [state.statistics() for state in self.layers]
            agreement.all_reduce_sum_([tensor for group in statistics for tensor in group])
            for state, group in zip(self.layers, statistics, strict=True):
                state.set_statistics(group)
        pending = [state for state in self.layers if state.has_pending()]
        silent = [state for state in self.layers if not state.has_pending()]
        for state in silent:  # inputs without output gradients: this step's only
            state.reset_sums()
        self._warn_silent_layers(silent)
        self._warn_unequal_samples(pending)
        sums = [tensor for state in pending for tensor in (state.input_sum, state.output_sum)]
        if sums and not bool(torch.stack(torch._foreach_norm(sums)).isfinite().all()):
            if self.grad_scaler is None:  # with one, an overflow is routine: the scaler backs off
                warn_at_caller(
                    "KFAC skipped a factor update: the recorded statistics are not finite (a "
                    "diverging loss or non-finite inputs); the factors are kept as they were",
                    RuntimeWarning,
                )
            for state in pending:
                state.reset_sums()
            return
        fold_factors(pending, self.current_factor_decay())

    def _update_eigens(self, stale: list[LayerState], agreement: Agreement) -> None:
        """Eigendecompose the factors of ``stale``; under ``inverse_placement="assigned"``
        each on its owner, then broadcast with the owner's failure flag (``agreement``)."""
        size = world_size(self.process_group)
        if self.inverse_placement == "replicated" or size == 1:
            factors = [state.eigen_inputs() for state in stale]
            eigens = iter(symmetric_eigh_batch([factor for group in factors for factor in group]))
            for state, group in zip(stale, factors, strict=True):
                state.set_eigens([next(eigens) for _ in group])
            return
        owners = assign_owners([state.eigen_cost() for state in stale], size)
        me = rank(self.process_group)
        for state, owner in zip(stale, owners, strict=True):
            if owner == me:
                with agreement.local():
                    state.update_eigens()
            if owner != me or agreement.failed:
                state.allocate_eigens()
            agreement.broadcast_from_(state.eigen_tensors(), owner)

    def _inverts_factors(self) -> bool:
        """Whether the damped factors are inverted directly (factored damping: nothing needs
        the eigenbasis)."""
        return self.damping_mode == "factored"

    def _update_factored_inverses(self, damping: float, agreement: Agreement) -> None:
        """Form ``(G + λ_G I)⁻¹`` and ``(A + λ_A I)⁻¹`` of every layer whose refreshed factors
        or damping changed since they were last formed, by batched Cholesky; under
        ``inverse_placement="assigned"`` each on its owner, then broadcast with the owner's
        failure flag (``agreement``)."""
        if not damping > 0:
            raise ValueError(f"factored damping needs damping > 0, got {damping!r}")
        due = [
            state
            for state in self.layers
            if state.inverted_factors is not None and not state.has_factored_inverses(damping)
        ]
        if not due:
            return
        size = world_size(self.process_group)
        assigned = self.inverse_placement == "assigned" and size > 1
        owners = assign_owners([state.eigen_cost() for state in due], size) if assigned else []
        me = rank(self.process_group) if assigned else 0
        mine = [state for index, state in enumerate(due) if not assigned or owners[index] == me]
        with agreement.local() if assigned else contextlib.nullcontext():
            _take_factored_inverses(mine, damping)
        if not assigned:
            return
        for state, owner in zip(due, owners, strict=True):
            if owner != me or agreement.failed:
                state.allocate_factored_inverses(damping)
            agreement.broadcast_from_(state.factored_inverse_tensors(), owner)

    def _update_eigenvalues(self, refreshed: list[LayerState]) -> None:
        """Hook for EKFAC's eigenvalue re-estimation; K-FAC uses ``outer(g, a)``."""

    def _precondition(self, damping: float) -> None:
        factored = self.damping_mode == "factored"
        with_product = self.kl_clip is not None
        updates = []
        for state in self.layers:
            grad = state.grad_matrix() if state.has_curvature(factored) else None
            if grad is not None:
                updates.append(
                    (state, grad, *state.partial_solve(grad, damping, factored, with_product))
                )
        if self.adaptive_damping and self.steps % self.damping_adaptation_interval == 0:
            probes = [
                (state, grad.clone(), state.param_matrix().clone()) for state, grad, _, _ in updates
            ]
            self._damping_probe = _DampingProbe(damping, probes)
        scale = None
        if with_product and updates:
            scale = self._kl_scale([(state, product) for state, _, _, product in updates])
            self.last_kl_scale = 1.0 if scale is None else scale
            _scale_partials([(state, partial) for state, _, partial, _ in updates], scale)
        for state, _, partial, _ in updates:
            state.write_solution(partial, scale if state.writes_scaled() else None)
            self._written[state.name] = _stamp(state.weight.grad)

    def _kl_scale(self, products: list[tuple[LayerState, Tensor]]) -> float | Tensor | None:
        """``ν = min(1, sqrt(kl_clip / |Σ_l lr_l² g_l · d_l|))`` from the per-layer products;
        ``None`` where no scaling is needed. On the CPU the sum is read back (free there); on
        an accelerator ``ν`` stays a 0-dim device tensor, so the step never waits for it."""
        rates = self._learning_rates([state for state, _ in products])
        values = [product for _, product in products]
        if values[0].device.type != "cpu":
            return _device_kl_scale(values, [rate**2 for rate in rates], self.kl_clip)
        products = torch.stack(values).tolist()  # one read-back
        if len(set(rates)) == 1:  # the sum first, as with one learning rate
            curvature = abs(sum(products)) * rates[0] ** 2
        else:
            pairs = zip(products, rates, strict=True)
            curvature = abs(sum(value * rate**2 for value, rate in pairs))
        if not curvature > self.kl_clip:  # ν = 1 (also for a zero or NaN product)
            return None
        return math.sqrt(self.kl_clip / curvature)

    def _learning_rates(self, states: list[LayerState]) -> list[float]:
        """The base optimizer's learning rate at this step for each of ``states``: the one
        ``lr``, or from an optimizer the rate of the param group that holds the layer."""
        if not isinstance(self.lr, torch.optim.Optimizer):
            return [_schedule_value("lr", self.lr, self.steps)] * len(states)
        groups = self.lr.param_groups
        if len(groups) == 1 or len({group["lr"] for group in groups}) == 1:
            return [_schedule_value("lr", groups[0]["lr"], self.steps)] * len(states)
        rates = {id(param): group["lr"] for group in groups for param in group["params"]}
        return [
            _schedule_value("lr", self._layer_rate(state, rates), self.steps) for state in states
        ]

    @staticmethod
    def _layer_rate(state: LayerState, rates: dict[int, float]) -> float:
        """The learning rate of the param group holding ``state``'s weight and bias."""
        params = [state.weight, getattr(state.module, "bias", None)]
        found = {
            rates.get(id(param)) for param in params if param is not None and param.requires_grad
        }
        if len(found) > 1 or None in found:
            raise ValueError(
                f"kl_clip: the parameters of layer {state.name!r} are in param groups with "
                f"learning rates {sorted(found, key=str)} (None: in no group of the optimizer); "
                "a layer's weight and bias must share one learning rate"
            )
        return found.pop()

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Step counter, per-layer factors, eigenbases (factored damping: the factors of the
        last refresh) and pending sums (cloned tensors), the current damping unless it is a
        schedule (it changes under ``adaptive_damping`` or when set from outside, e.g. by
        :class:`~natgrad.optim.QuadraticModelOptimizer`), and the state of ``generator`` if one
        was given (so that ``fisher_type="mc"`` resumes with the same samples; under
        ``torch.distributed`` with the saving process's rank, for
        :meth:`load_state_dict` on another process keeps that process's own generator)."""
        state = {
            "steps": self.steps,
            "layers": {layer.name: layer.state_dict() for layer in self.layers},
        }
        if not callable(self.damping):
            state["damping"] = self.damping
        if self.generator is not None:
            state["generator_state"] = self.generator.get_state()
            if is_distributed(self.process_group):
                state["generator_rank"] = rank(self.process_group)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`; the layer names must match.

        Raises
        ------
        ValueError
            If the saved layers differ from this preconditioner's, by name or by shape (the
            preconditioner is then left as it was).
        """
        saved = state_dict["layers"]
        names = [state.name for state in self.layers]
        if sorted(saved) != sorted(names):
            raise ValueError(f"state_dict has layers {sorted(saved)}, expected {sorted(names)}")
        for state in self.layers:
            state.check_state(saved[state.name])
        self.steps = int(state_dict["steps"])
        self._sync_hooks()
        if "damping" in state_dict and not callable(self.damping):
            self.damping = float(state_dict["damping"])
        if self.generator is not None and "generator_state" in state_dict:
            self._load_generator_state(state_dict)
        for state in self.layers:
            state.load_state_dict(saved[state.name])

    def _load_generator_state(self, state_dict: dict) -> None:
        """Take the saved generator state, unless another process saved it: each process draws
        its own Monte-Carlo targets, and another's state would make them repeat its draws."""
        saved_by = state_dict.get("generator_rank", 0)
        me = rank(self.process_group)
        if saved_by == me or not is_distributed(self.process_group):
            self.generator.set_state(state_dict["generator_state"])
            return
        warn_at_caller(
            f"KFAC.load_state_dict: the generator state was saved on rank {saved_by}; rank "
            f"{me} keeps its own generator, so that the processes' Monte-Carlo draws stay "
            "independent. To resume every process's draws exactly, save and load each "
            "process's own state_dict",
            RuntimeWarning,
        )

    def __repr__(self) -> str:
        names = [state.name for state in self.layers]
        return f"{type(self).__name__}(layers={names}, steps={self.steps})"
