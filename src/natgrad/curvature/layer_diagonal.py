"""Diagonal Fisher from per-layer inputs and output gradients (BackPACK-style).

For a model whose trainable parameters all sit in ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``
(or transposed ``nn.ConvTranspose1d`` / ``nn.ConvTranspose2d``) layers, the Fisher diagonal
needs no per-sample Jacobian: one forward pass records every layer's input features ``a`` and
the Fisher's backward vectors
(:func:`~natgrad.curvature.kfac_capture.backward_vectors`) are back-propagated to every layer
output, giving gradients ``g``. The per-sample gradient of the layer's weight matrix (bias
folded in as a constant-1 input column, as in :mod:`natgrad.curvature.kfac_capture`) for
backward vector ``k`` is ``Σ_t g_nkt a_ntᵀ``, so

    diag F_W = 1/N Σ_n Σ_k (Σ_t g_nkt a_ntᵀ)²          (entrywise square)

which for ``T = 1`` (an ordinary ``(N, d_in)`` Linear input) is ``1/N (Σ_k g_k²)ᵀ (a²)``:
elementwise squares and one matrix product per layer. The backward vectors are
back-propagated together, in one batched backward pass (``is_grads_batched``) per group.

The model's forward pass must treat the samples of a batch independently (as the generic
per-sample path of :func:`natgrad.curvature.fisher` assumes), and each supported layer's input
must have the batch along dim 0 (checked on the shape). A layer called several times in the
forward pass (weight sharing across calls) has a per-sample gradient summed over its calls:
the calls' features and output gradients are joined along the locations ``t``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from natgrad.curvature.jacobians import (
    check_curvature_model,
    check_finite_inputs,
    training_batch_norms,
    training_dropouts,
)
from natgrad.curvature.kfac_capture import (
    KRONECKER_LAYER_TYPES,
    ForwardCapture,
    KroneckerLayer,
    backward_vectors,
    check_backward_vectors,
    check_fisher_kind,
    input_features,
    join_calls,
    kronecker_layers,
    output_features,
    per_sample_gradients,
    shared_weights,
    tied_parameters,
    trainable_parameters,
)
from natgrad.curvature.likelihoods import Likelihood, get_likelihood
from natgrad.curvature.weight_locality import foreign_weight_uses

if TYPE_CHECKING:
    from natgrad.distributed.shards import Shard

__all__ = [
    "OUTPUT_GRADIENT_BUDGET",
    "PER_SAMPLE_GRADIENT_BUDGET",
    "LayerPass",
    "layer_diagonal_for_vectors",
    "layer_fisher_diagonal",
    "squared_gradient_sum",
    "supported_layers",
]

PER_SAMPLE_GRADIENT_BUDGET = 2**18
"""Entries of per-sample weight gradients held at once for layers with ``T > 1`` locations
(small enough to stay in cache: about 15% faster than 2**22 on a small CNN, 1 thread)."""
OUTPUT_GRADIENT_BUDGET = 2**24
"""Entries of layer-output gradients held at once: bounds how many backward vectors are
back-propagated together."""


def supported_layers(model: nn.Module) -> list[KroneckerLayer] | None:
    """The layers carrying all trainable parameters of ``model``, or ``None`` if they cannot.

    ``None`` when the model has no trainable parameter, a trainable parameter outside an
    ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.ConvTranspose1d`` /
    ``nn.ConvTranspose2d`` or also held by another module (tied
    weights, :func:`~natgrad.curvature.kfac_capture.tied_parameters`), a trainable bias with a
    frozen weight, a BatchNorm layer in training mode (which couples the samples) or dropout in
    training mode (which makes the model random).
    """
    params = trainable_parameters(model)
    if not params or _random_or_coupled(model):
        return None
    for module in model.modules():
        if not isinstance(module, KRONECKER_LAYER_TYPES):
            continue
        bias = module.bias
        if bias is not None and bias.requires_grad and not module.weight.requires_grad:
            return None
    layers = kronecker_layers(model, strict=False)
    if shared_weights(layers) or tied_parameters(model, layers):
        return None
    covered = sum(1 + layer.has_bias for layer in layers)
    return layers if covered == len(params) else None


def _random_or_coupled(model: nn.Module) -> bool:
    return bool(training_dropouts(model) or training_batch_norms(model))


def _batch_first(layers: Sequence[KroneckerLayer], capture: ForwardCapture, samples: int) -> bool:
    """Whether every layer was called, each time on inputs whose dim 0 runs over the
    ``samples``."""
    return all(
        layer.name in capture.calls
        and all(layer_input.shape[0] == samples for layer_input, _ in capture.calls[layer.name])
        for layer in layers
    )


def squared_gradient_sum(features: Tensor, output_grads: Tensor) -> Tensor:
    """``Σ_k Σ_n (Σ_t g_knt a_ntᵀ)²`` (entrywise square), shape ``(..., d_out, d_in [+ 1])``.

    Parameters
    ----------
    features : Tensor of shape (..., N, T, d_in [+ 1])
        Input features ``a``; leading dimensions (e.g. the groups of a grouped convolution)
        are batched over.
    output_grads : Tensor of shape (..., K, N, T, d_out)
        Output gradients ``g``, one slice per backward vector ``k``.
    """
    *_, vectors, samples, locations, outputs = output_grads.shape
    inputs = features.shape[-1]
    if locations == 1:
        return output_grads[..., 0, :].square().sum(-3).mT @ features[..., 0, :].square()
    stacked = output_grads.movedim(-4, -2).flatten(-2)  # (..., N, T, K d_out)
    batch = features.shape[:-3].numel()
    chunk = max(1, PER_SAMPLE_GRADIENT_BUDGET // (batch * vectors * outputs * inputs))
    total = features.new_zeros(*features.shape[:-3], outputs, inputs)
    for start in range(0, samples, chunk):
        rows = slice(start, start + chunk)
        gradients = per_sample_gradients(features[..., rows, :, :], stacked[..., rows, :, :])
        total += gradients.square().unflatten(-2, (vectors, outputs)).sum((-4, -3))
    return total


def layer_fisher_diagonal(
    model: nn.Module,
    inputs: Tensor,
    *,
    likelihood: str | Likelihood,
    kind: str = "exact",
    targets: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    shard: Shard | None = None,
) -> Tensor | None:
    """Diagonal of the Fisher of ``model`` on ``inputs`` (MEAN over the N inputs), or ``None``.

    The values of the generic ``natgrad.fisher(..., structure="diag")`` (with the same ``generator``
    state, ``kind="mc"`` draws the same targets in the same order: ``mc_samples`` calls of
    ``likelihood.sample`` on the whole batch), from one forward pass and batched backward
    passes of the backward vectors (``C`` for ``"exact"``, ``mc_samples`` for ``"mc"``, 1 for
    ``"empirical"``) to the layer outputs; no per-sample Jacobian is formed.

    Parameters
    ----------
    model : nn.Module
        Outputs of shape ``(N, C)`` or ``(N,)``, the natural parameters of the likelihood;
        samples treated independently.
    inputs : Tensor of shape (N, ...)
        Floating-point inputs are cast to the dtype of the model's parameters.
    likelihood : {"categorical", "gaussian", "bernoulli", "poisson"} or Likelihood
    kind : {"exact", "mc", "empirical"}, default "exact"
    targets : Tensor, optional
        Observed targets, required for ``kind="empirical"``.
    mc_samples : int, default 1
    generator : torch.Generator, optional
        Randomness for ``kind="mc"``.
    shard : Shard, optional
        ``inputs`` as a process's :class:`~natgrad.distributed.shards.Shard` of a global batch
        (as in :func:`layer_diagonal_for_vectors`); for ``"mc"``, give a ``likelihood`` that
        draws the global batch's targets (:meth:`~natgrad.distributed.shards.Shard.sampling`).

    Returns
    -------
    Tensor of shape (P,) or None
        The diagonal over the trainable parameters in ``model.parameters()`` order, in their
        dtype. ``None`` (nothing computed, no random draw made) when :func:`supported_layers`
        gives ``None``; ``None`` after the forward pass when a supported layer is not called, or
        on an input whose dim 0 is not the batch (a sequence-first or batch-flattened Linear
        input), or when a layer's weight or bias is also used outside its calls (detected
        before any random draw: :func:`~natgrad.curvature.weight_locality.
        foreign_weight_uses`). The caller then uses a general method. A layer called several
        times (weight sharing across calls) has per-sample gradients summed over its calls,
        its calls' locations joined (:func:`~natgrad.curvature.kfac_capture.join_calls`).

    Raises
    ------
    TypeError
        ``model`` not an ``nn.Module``, ``inputs`` not a tensor, ``mc_samples`` not an int.
    ValueError
        Unknown ``kind`` or likelihood, ``kind="empirical"`` without targets, ``mc_samples < 1``,
        non-finite or empty inputs, a model refused by
        :func:`~natgrad.curvature.jacobians.check_curvature_model` (BatchNorm or dropout in
        training mode, ...).
    """
    resolved = get_likelihood(likelihood)
    check_fisher_kind(kind, targets, mc_samples)

    def vectors(outputs: Tensor) -> Tensor:
        return backward_vectors(outputs, resolved, kind, targets, mc_samples, generator)

    return layer_diagonal_for_vectors(model, inputs, vectors, shard)


def layer_diagonal_for_vectors(
    model: nn.Module,
    inputs: Tensor,
    vectors_of: Callable[[Tensor], Tensor | None],
    shard: Shard | None = None,
) -> Tensor | None:
    """Diagonal of ``1/N Σ_n Σ_k J_nᵀ v_nk v_nkᵀ J_n`` from one forward pass, or ``None``.

    :func:`layer_fisher_diagonal` with the backward vectors of any curvature of that form (the
    GGN's: the square roots of the loss's per-sample output Hessians).

    Parameters
    ----------
    model : nn.Module
    inputs : Tensor of shape (N, ...)
    vectors_of : callable
        Maps the model's outputs ``(N, ...)`` to the vectors ``(K, N, D)``, ``D`` the size of
        one sample's outputs, or to ``None`` (the caller then uses a general method). Called
        only once the model is known to be supported.
    shard : Shard, optional
        ``inputs`` as this process's :class:`~natgrad.distributed.shards.Shard` of a global
        batch: the diagonal is then the global batch's (the processes' sums all-reduced and
        divided by the global count), and whether the layers serve is agreed by all processes
        (one all-reduce), so that they all return ``None`` or none does.

    Returns
    -------
    Tensor of shape (P,) or None
        As for :func:`layer_fisher_diagonal`.

    Raises
    ------
    TypeError
        ``model`` not an ``nn.Module``.
    ValueError
        Non-finite or empty inputs, vectors of the wrong shape (both shapes named), a model
        refused by :func:`~natgrad.curvature.jacobians.check_curvature_model`.
    """
    recorded = LayerPass.record(model, inputs)
    if recorded is None or not recorded.serves_everywhere(shard):
        return None
    squared_sums = recorded.squared_sums(vectors_of)
    if squared_sums is None:
        return None
    return recorded.diagonal(squared_sums, shard)


@dataclass(frozen=True)
class LayerPass:
    """One forward pass through a model whose trainable parameters all sit in supported
    layers, with every layer call recorded: the process-local first half of
    :func:`layer_diagonal_for_vectors`, which a caller under ``torch.distributed`` can run
    before its first collective (so that its failures ride on that collective).

    Attributes
    ----------
    layers : list of KroneckerLayer
    capture : ForwardCapture
        The layers' calls in the pass.
    outputs : Tensor of shape (N, ...)
        The model's outputs, attached to the graph.
    serves : bool
        Whether the per-layer diagonal applies to this pass (every layer called on batch-first
        inputs, no weight used outside its calls).
    num_samples : int
        The ``N`` of ``inputs``.
    num_params : int
        Number of trainable parameter tensors.
    """

    layers: list[KroneckerLayer]
    capture: ForwardCapture
    outputs: Tensor
    serves: bool
    num_samples: int
    num_params: int

    @classmethod
    def record(cls, model: nn.Module, inputs: Tensor) -> LayerPass | None:
        """The pass of ``model`` on ``inputs``, or ``None`` (no forward pass) when
        :func:`supported_layers` gives ``None``.

        Raises
        ------
        TypeError, ValueError
            As :func:`layer_diagonal_for_vectors`.
        """
        check_curvature_model(model)
        check_finite_inputs(inputs)
        layers = supported_layers(model)
        if layers is None:
            return None
        params = trainable_parameters(model)
        if inputs.is_floating_point():
            inputs = inputs.to(params[0].dtype)
        with torch.enable_grad(), ForwardCapture(layers) as capture:
            outputs = model(inputs)
        serves = _batch_first(layers, capture, inputs.shape[0]) and not foreign_weight_uses(
            model, layers, capture.calls, outputs
        )
        return cls(layers, capture, outputs, serves, inputs.shape[0], len(params))

    def serves_everywhere(self, shard: Shard | None = None) -> bool:
        """:attr:`serves` on every process of ``shard`` (one all-reduce when sharded)."""
        return self.serves if shard is None else shard.all(self.serves)

    def squared_sums(self, vectors_of: Callable[[Tensor], Tensor | None]) -> list[Tensor] | None:
        """Per layer, the sum over this pass's samples and the backward vectors
        ``vectors_of(outputs)`` (``(K, N, D)``) of the squared per-sample weight gradients,
        shape ``(d_out, d_in [+ 1])``; ``None`` where ``vectors_of`` gives ``None``."""
        vectors = vectors_of(self.outputs)
        if vectors is None:
            return None
        matrix = self.outputs.reshape(len(self.outputs), -1)
        check_backward_vectors(vectors, matrix)
        return _squared_gradient_sums(self.layers, self.capture, matrix, vectors)

    def diagonal(self, squared_sums: list[Tensor], shard: Shard | None = None) -> Tensor:
        """The diagonal ``(P,)`` from :meth:`squared_sums`: divided by the number of samples,
        or, with a ``shard``, summed over its processes (one all-reduce) and divided by the
        global batch's number."""
        if shard is not None:
            shard.sum_(squared_sums)
        count = self.num_samples if shard is None else shard.total
        pieces: dict[int, Tensor] = {}
        for layer, squared_sum in zip(self.layers, squared_sums, strict=True):
            pieces.update(layer.from_matrix(squared_sum / count))
        return torch.cat([pieces[index].reshape(-1) for index in range(self.num_params)])


def _squared_gradient_sums(
    layers: Sequence[KroneckerLayer], capture: ForwardCapture, outputs: Tensor, vectors: Tensor
) -> list[Tensor]:
    """Per layer, ``Σ_k Σ_n (Σ_t g_knt a_ntᵀ)²`` over the backward vectors ``k``.

    The vectors are back-propagated together (``is_grads_batched``), as many at once as
    :data:`OUTPUT_GRADIENT_BUDGET` allows.
    """
    calls = [capture.calls[layer.name] for layer in layers]
    features = [
        join_calls([input_features(layer, layer_input) for layer_input, _ in layer_calls])
        for layer, layer_calls in zip(layers, calls, strict=True)
    ]
    layer_outputs = [output for layer_calls in calls for _, output in layer_calls]
    sums = [
        a.new_zeros(layer.output_dim, layer.input_dim)
        for a, layer in zip(features, layers, strict=True)
    ]
    group = max(1, OUTPUT_GRADIENT_BUDGET // sum(output.numel() for output in layer_outputs))
    for vector_group in vectors.split(group):
        grads = iter(
            torch.autograd.grad(
                outputs,
                layer_outputs,
                grad_outputs=vector_group,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        )
        for layer, layer_calls, total, a in zip(layers, calls, sums, features, strict=True):
            call_grads = [next(grads) for _ in layer_calls]
            if all(grad is None for grad in call_grads):
                continue
            joined = join_calls(
                [
                    _batched_output_features(layer, _or_zeros(grad, output, len(vector_group)))
                    for grad, (_, output) in zip(call_grads, layer_calls, strict=True)
                ]
            )
            total += _layer_squared_sum(layer, a, joined)
    return sums


def _or_zeros(grad: Tensor | None, output: Tensor, vectors: int) -> Tensor:
    """A call's batched output gradient ``(K, N, ...)``, detached; zeros where its output did
    not reach the model's (another call's did)."""
    if grad is None:
        return output.new_zeros(vectors, *output.shape)
    return grad.detach()


def _layer_squared_sum(layer: KroneckerLayer, features: Tensor, output_grads: Tensor) -> Tensor:
    """:func:`squared_gradient_sum` of one layer, shape ``(d_out, d_in [+ 1])``; for a grouped
    convolution (features ``(g, N, T, d)``) of each group's weights, their rows stacked."""
    if layer.groups == 1:
        return squared_gradient_sum(features, output_grads)
    by_group = output_grads.unflatten(-1, (layer.groups, -1)).movedim(-2, 0)  # (g, K, N, T, c)
    return squared_gradient_sum(features, by_group).flatten(0, 1)


def _batched_output_features(layer: KroneckerLayer, grads: Tensor) -> Tensor:
    """:func:`output_features` of ``(K, N, ...)`` gradients, shape ``(K, N, T, d_out)``."""
    return output_features(layer, grads.flatten(0, 1)).unflatten(0, grads.shape[:2])
