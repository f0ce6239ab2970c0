"""A model as a pure function of its trainable parameters, with its Jacobian products.

:class:`ModelFunction` wraps ``torch.func.functional_call`` so that the curvature builders can
ask for per-sample Jacobians (``torch.func.vmap`` over ``torch.func.jacrev``), Jacobian-vector
products (``torch.func.jvp``) and vector-Jacobian products (``torch.func.vjp``) with respect to
the flat vector of trainable parameters. Parameters with ``requires_grad=False`` are held fixed
and left out of that vector; buffers are used as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from natgrad.curvature.evaluation_scope import curvature_evaluation, is_training_dropout

ParamDict = dict[str, Tensor]


def check_finite_inputs(inputs: Tensor) -> None:
    """Raise unless ``inputs`` is a tensor ``(N, ...)`` of finite values."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must have shape (N, ...) with N >= 1, got {tuple(inputs.shape)}")
    if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        raise ValueError("inputs must not contain infs or NaNs")


def _names_of(model: nn.Module, predicate: Callable[[nn.Module], bool]) -> list[str]:
    return [name for name, module in model.named_modules() if predicate(module)]


def training_batch_norms(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers of ``model`` in training mode: they couple the samples
    of a batch."""
    return _names_of(
        model,
        lambda module: isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training,
    )


def _check_no_training_batch_norm(model: nn.Module) -> None:
    names = training_batch_norms(model)
    if names:
        raise ValueError(
            f"module {names[0]!r} is a BatchNorm layer in training mode, which couples the "
            "samples of a batch; call model.eval() before building the curvature"
        )


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding | nn.EmbeddingBag)


def training_dropouts(model: nn.Module) -> list[str]:
    """Names of the dropout layers of ``model`` in training mode with ``p > 0``: they draw
    random masks, so the model is a random function."""
    return _names_of(model, is_training_dropout)


def check_curvature_model(model: nn.Module) -> None:
    """Refuse a model that is not one deterministic, differentiable function of independent
    samples: BatchNorm in training mode (couples the samples), dropout in training mode
    (random masks, drawn from the global random state), an embedding with ``max_norm``
    (renormalises its weight in place in the forward pass, which ``torch.func`` cannot trace)
    or one whose backward pass is not its derivative (:func:`check_no_frequency_scaling`).
    Called before the model runs."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_no_training_batch_norm(model)
    dropouts = training_dropouts(model)
    if dropouts:
        raise ValueError(
            f"modules {dropouts} are dropout layers in training mode, which draw random masks: "
            "the curvature would be that of one random sub-network; call model.eval() before "
            "building the curvature"
        )
    renormed = _names_of(
        model, lambda module: _is_embedding(module) and module.max_norm is not None
    )
    if renormed:
        raise ValueError(
            f"embeddings {renormed} have a max_norm: their forward pass renormalises the weight "
            "in place, which the per-sample derivatives (torch.func) cannot trace; set "
            "max_norm=None on them while building the curvature (the forward pass then differs "
            "only in rows whose norm exceeds max_norm)"
        )
    check_no_frequency_scaling(model)


def check_no_frequency_scaling(model: nn.Module) -> None:
    """Refuse embeddings with a trainable weight and ``scale_grad_by_freq=True``: autograd
    divides their gradient by the tokens' counts in the batch, so the backward pass is not the
    derivative of the model and no curvature of the model matches it."""
    names = _names_of(
        model,
        lambda module: (
            _is_embedding(module) and module.scale_grad_by_freq and module.weight.requires_grad
        ),
    )
    if names:
        raise ValueError(
            f"embeddings {names} have scale_grad_by_freq=True: autograd divides their gradient "
            "by the tokens' counts in the batch, so the backward pass is not the derivative of "
            "the model and gives none of its curvatures; set scale_grad_by_freq=False on them "
            "(the forward pass is the same) or freeze their weights"
        )


class ModelFunction:
    """``θ ↦ model(inputs; θ)`` over the flat vector ``θ`` of a model's trainable parameters.

    Parameters
    ----------
    model : nn.Module
        Must have at least one parameter with ``requires_grad=True``. Its forward pass must treat
        the samples of a batch independently for the per-sample Jacobians to be those of the
        batched model; BatchNorm layers in training mode are rejected (the builders check the
        rest of :func:`check_curvature_model` before they build one).
    inputs : Tensor of shape (N, ...)
        Floating-point inputs are cast to the dtype of the model's parameters.

    Attributes
    ----------
    names : list of str
        Names of the trainable parameters, in ``model.parameters()`` order.
    params : dict of str to Tensor
        Their current values (detached).
    param_shapes : list of torch.Size
    dtype, device
        Of the first trainable parameter.
    """

    def __init__(self, model: nn.Module, inputs: Tensor) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_finite_inputs(inputs)
        _check_no_training_batch_norm(model)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters (all have requires_grad=False)")
        self.model = model
        self.names = [name for name, _ in named]
        self.params: ParamDict = {name: p.detach() for name, p in named}
        self.param_shapes = [p.shape for _, p in named]
        self.param_numels = [math.prod(shape) for shape in self.param_shapes]
        self.dtype = named[0][1].dtype
        self.device = named[0][1].device
        self.inputs = inputs.to(self.dtype) if inputs.is_floating_point() else inputs
        self.num_samples = inputs.shape[0]

    # -- conversions -------------------------------------------------------------------------
    def unflatten(self, flat: Tensor) -> ParamDict:
        """Split a flat ``(P,)`` vector into a parameter dict."""
        chunks = torch.split(flat, self.param_numels)
        return {
            name: chunk.reshape(shape)
            for name, chunk, shape in zip(self.names, chunks, self.param_shapes, strict=True)
        }

    def flatten(self, tensors: ParamDict, batch_dims: int = 0) -> Tensor:
        """Concatenate a parameter dict into ``(*batch, P)``, keeping ``batch_dims`` dims."""
        parts = []
        for name in self.names:
            tensor = tensors[name]
            parts.append(tensor.reshape(*tensor.shape[:batch_dims], -1))
        return torch.cat(parts, dim=-1)

    # -- evaluation ----------------------------------------------------------------------------
    def forward(self, params: ParamDict, inputs: Tensor | None = None) -> Tensor:
        """Model outputs at ``params`` on ``inputs`` (the stored inputs by default)."""
        batch = self.inputs if inputs is None else inputs
        with curvature_evaluation():
            return functional_call(self.model, params, (batch,))

    def outputs(self) -> Tensor:
        """Model outputs at the current parameters, detached, shape ``(N, ...)``."""
        with torch.no_grad():
            outputs = self.forward(self.params)
        if not isinstance(outputs, Tensor):
            raise TypeError(
                f"the model must return one tensor of outputs, got {type(outputs).__name__}"
            )
        if outputs.ndim == 0 or outputs.shape[0] != self.num_samples:
            raise ValueError(
                f"model outputs must have shape (N, ...) with N = {self.num_samples}, "
                f"got {tuple(outputs.shape)}"
            )
        return outputs

    def per_sample_jacobians(self, inputs: Tensor) -> Tensor:
        """Jacobians of the flattened per-sample outputs, shape ``(n, D, P)`` for ``n`` inputs."""

        def single(params: ParamDict, sample: Tensor) -> Tensor:
            return self.forward(params, sample.unsqueeze(0)).reshape(-1)

        jacobians = vmap(jacrev(single), in_dims=(None, 0))(self.params, inputs)
        return self.flatten(jacobians, batch_dims=2)

    def per_sample_rows(self, inputs: Tensor, cotangents: Tensor) -> Tensor:
        """Rows ``Rₙᵀ Jₙ`` for ``n`` inputs and cotangents ``Rₙ`` of shape ``(n, D, K)``.

        One vector-Jacobian product per column of ``Rₙ`` (vmapped), without forming ``Jₙ``.

        Returns
        -------
        Tensor of shape ``(n, K, P)``
        """

        def single(params: ParamDict, sample: Tensor, columns: Tensor) -> ParamDict:
            def output(values: ParamDict) -> Tensor:
                return self.forward(values, sample.unsqueeze(0)).reshape(-1)

            _, pullback = vjp(output, params)
            (rows,) = vmap(pullback, in_dims=1)(columns)
            return rows

        rows = vmap(single, in_dims=(None, 0, 0))(self.params, inputs, cotangents)
        return self.flatten(rows, batch_dims=2)

    def jvp(self, vector: Tensor) -> Tensor:
        """``J v`` for a flat ``(P,)`` vector; shape of the model outputs ``(N, ...)``."""
        _, tangent = jvp(self.forward, (self.params,), (self.unflatten(vector),))
        return tangent

    def output_tangents(self, directions: Sequence[ParamDict]) -> tuple[Tensor, list[Tensor]]:
        """Outputs and ``J v`` for each direction ``v``, by forward-mode differentiation.

        One forward pass with dual numbers per direction (cheaper on small batches than a
        vmapped ``torch.func.jvp``, and computed under ``torch.no_grad()`` so that forward hooks
        that record only when gradients are enabled stay silent).

        Parameters
        ----------
        directions : sequence of dict of str to Tensor
            Directions in parameter space, each holding every trainable parameter's name.

        Returns
        -------
        outputs : Tensor of shape (N, ...)
            Model outputs at the current parameters.
        tangents : list of Tensor of shape (N, ...)
            ``J v`` for each direction, in order.
        """
        if not directions:
            raise ValueError("output_tangents needs at least one direction")
        outputs, tangents = None, []
        with torch.no_grad():
            for direction in directions:
                with forward_ad.dual_level():
                    duals = {
                        name: forward_ad.make_dual(value, direction[name].to(value.dtype))
                        for name, value in self.params.items()
                    }
                    primal, tangent = forward_ad.unpack_dual(self.forward(duals))
                outputs = primal
                tangents.append(torch.zeros_like(primal) if tangent is None else tangent)
        return outputs, tangents

    def vjp_function(self) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """Outputs and ``u ↦ Jᵀ u`` (flat ``(P,)``), reusing one forward pass."""
        outputs, pullback = vjp(self.forward, self.params)

        def transpose_product(cotangent: Tensor) -> Tensor:
            (grads,) = pullback(cotangent)
            return self.flatten(grads)

        return outputs.detach(), transpose_product

    def loss_function(
        self, loss_fn: Callable[[Tensor, Tensor], Tensor], targets: Tensor
    ) -> Callable[[Tensor], Tensor]:
        """``θ ↦ loss_fn(model(inputs; θ), targets)`` over the flat parameter vector."""

        def loss_of_flat(flat: Tensor) -> Tensor:
            return loss_fn(self.forward(self.unflatten(flat)), targets)

        return loss_of_flat

    def flat_params(self) -> Tensor:
        """The current trainable parameters as one flat ``(P,)`` vector."""
        return self.flatten(self.params)
