"""Whether each Kronecker layer's weight is used only by the layer's own calls (also of an
``nn.Embedding``, whose weight gradient adds each token's output gradient to its row).

The Kronecker-factored operators (:mod:`natgrad.curvature.kfac`, :mod:`natgrad.curvature.ekfac`)
and the per-layer diagonal (:mod:`natgrad.curvature.layer_diagonal`) take a layer's weight
gradient from what hooks on the layer's calls record: per sample ``Σ_t g_t a_tᵀ``. A weight or
bias also used outside those calls (a tied autoencoder's decoder ``F.linear(h, enc.weight.t())``,
``lin(x) + F.linear(x, lin.weight)``) gets gradient through that use too, which no hook sees: the
curvature would be that of another model, silently.

:func:`foreign_weight_uses` finds such layers after the forward pass. It back-propagates one
probe vector (standard normal, fixed seed: no random state is used) from the model's outputs to
the recorded layer outputs and to the layers' parameters in one backward pass, rebuilds each
layer's parameter gradient from its calls' recorded inputs and output gradients with the
layer's own operation (``Σ_n Σ_t g_nt a_ntᵀ``, the SUM over samples, locations and calls: a
matrix product for ``nn.Linear``, ``convolution_backward`` of the padded input for a
convolution, which also sums the patches' products, and the transposed convolution's own
``convolution_backward`` for ``nn.ConvTranspose1d`` / ``nn.ConvTranspose2d``), and compares
it with autograd's gradient of the same backward. Both are the same sums of the same
products, so they agree to round-off unless the parameter has another use.

Cost: one extra backward pass and one weight-gradient product per layer call. A model found
clean is remembered (weakly, with the parameters of its layers), so the check runs at the
first build of each model, not at every build of an optimizer that rebuilds the curvature at
every step; a model whose layers or parameters change is checked again.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from natgrad.curvature.kfac_capture import (
    CONV_TRANSPOSE_TYPES,
    CONV_TYPES,
    KroneckerLayer,
    conv_as_2d,
    padded_conv_input,
)

__all__ = ["PROBE_SEED", "check_local_weights", "foreign_weight_uses"]

_CLEAN: weakref.WeakKeyDictionary[nn.Module, frozenset[tuple]] = weakref.WeakKeyDictionary()
"""Models found free of foreign weight uses, with the layers and parameters they had then."""

PROBE_SEED = 0
"""Seed of the probe vector's private generator."""

Calls = Mapping[str, Sequence[tuple[Tensor, Tensor | GradientEdge]]]


class Rebuilt(NamedTuple):
    """One call's rebuilt gradient of one parameter, the bound on its norm to which its
    round-off is relative, and the dtypes it was computed from."""

    gradient: Tensor
    bound: Tensor
    dtypes: tuple[torch.dtype, ...]


def foreign_weight_uses(
    model: nn.Module, layers: Sequence[KroneckerLayer], calls: Calls, outputs: Tensor
) -> list[str]:
    """The names of the ``layers`` whose weight or bias has a use outside the layer's calls.

    ``[]`` at once for a model found clean before with the same layers and parameters.

    Parameters
    ----------
    model : nn.Module
        The model that ran (remembered, weakly, when clean).
    layers : sequence of KroneckerLayer
    calls : mapping of str to list of (Tensor, Tensor)
        Layer name → ``(input, output)`` of each call
        (:attr:`~natgrad.curvature.kfac_capture.ForwardCapture.calls`), outputs attached to the
        graph of ``outputs`` (or their gradient edges, ``get_gradient_edge(output)``, taken
        before any in-place operation rewrote them).
    outputs : Tensor of shape (N, ...)
        The model's outputs (anything else, or outputs without a graph, give ``[]``).

    Returns
    -------
    list of str
        In the order of ``layers``: those whose autograd gradient differs from the one rebuilt
        from their calls by more than round-off (relative ``√ε`` of the least precise dtype).
    """
    if not isinstance(outputs, Tensor) or not outputs.requires_grad:
        return []  # the caller names what is wrong with such outputs
    signature = frozenset(
        (layer.name, *(id(param) for param in layer.parameters())) for layer in layers
    )
    if _CLEAN.get(model) == signature:
        return []
    recorded = [(layer, call) for layer in layers for call in calls.get(layer.name, ())]
    params = [param for layer in layers for param in layer.parameters()]
    grads = torch.autograd.grad(
        outputs,
        [layer_output for _, (_, layer_output) in recorded] + params,
        grad_outputs=_probe(outputs),
        retain_graph=True,
        allow_unused=True,
    )
    rebuilt: dict[str, list[list[Rebuilt]]] = {layer.name: [] for layer in layers}
    for (layer, (layer_input, _)), grad in zip(recorded, grads[: len(recorded)], strict=True):
        if grad is not None:
            rebuilt[layer.name].append(_call_gradients(layer, layer_input, grad.detach()))
    autograd = iter(grads[len(recorded) :])
    excess = [
        _relative_excess(layer, rebuilt[layer.name], [next(autograd) for _ in layer.parameters()])
        for layer in layers
    ]
    flags = (torch.stack(excess) > 1).tolist()
    foreign = [layer.name for layer, flag in zip(layers, flags, strict=True) if flag]
    if not foreign:
        _CLEAN[model] = signature
    return foreign


def check_local_weights(
    model: nn.Module, layers: Sequence[KroneckerLayer], calls: Calls, outputs: Tensor
) -> None:
    """Raise unless every layer's parameters are used only by its calls
    (:func:`foreign_weight_uses`).

    Raises
    ------
    ValueError
        Naming the first layer whose weight or bias is also used outside its calls.
    """
    names = foreign_weight_uses(model, layers, calls, outputs)
    if names:
        raise ValueError(
            f"the weight or bias of layer {names[0]!r} is also used outside the layer's calls "
            "(e.g. F.linear(x, layer.weight), or a decoder applying an encoder's weight "
            "transposed): the hooks on the layer do not see that use, so its Kronecker factors "
            "would describe another model; call the layer itself for every use (a layer called "
            "several times is supported), give the other use its own parameter, or use "
            "another structure"
        )


def _probe(outputs: Tensor) -> Tensor:
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randn(outputs.shape, generator=generator, device=generator.device).to(outputs)


def _call_gradients(
    layer: KroneckerLayer, layer_input: Tensor, output_grad: Tensor
) -> list[Rebuilt]:
    """One call's parameter gradients, rebuilt from its input and output gradient: the
    weight's ``Σ_n Σ_t g_nt a_ntᵀ`` with the bound ``‖g‖ √k ‖x‖`` on its norm (``k`` the
    kernel positions), the bias's ``Σ_n Σ_t g_nt`` with the bound ``‖g‖ √m`` (``m`` the rows
    of ``g``): their round-off is relative to these bounds."""
    module = layer.module
    if isinstance(module, nn.Embedding):
        return [_embedding_gradient(module, layer_input, output_grad)]
    if isinstance(module, CONV_TYPES):
        weight_grad, channel_axis = _conv_weight_gradient(layer, layer_input, output_grad), 1
        kernel = math.prod(module.kernel_size)
    else:
        rows = output_grad.reshape(-1, output_grad.shape[-1])
        weight_grad = rows.mT @ layer_input.reshape(-1, layer_input.shape[-1]).to(rows.dtype)
        channel_axis, kernel = -1, 1
    grad_norm = _norm(output_grad)
    dtypes = (output_grad.dtype, layer_input.dtype)
    weight = Rebuilt(weight_grad, grad_norm * kernel**0.5 * _norm(layer_input), dtypes)
    if not layer.has_bias:
        return [weight]
    channel_axis %= output_grad.ndim
    summed = [axis for axis in range(output_grad.ndim) if axis != channel_axis]
    rows_of_g = output_grad.numel() // output_grad.shape[channel_axis]
    return [weight, Rebuilt(output_grad.sum(summed), grad_norm * rows_of_g**0.5, dtypes)]


def _embedding_gradient(module: nn.Embedding, tokens: Tensor, output_grad: Tensor) -> Rebuilt:
    """An embedding call's weight gradient: each token's output gradient added to its row
    (none to ``padding_idx``'s), with the bound ``‖g‖ √m`` (``m`` tokens)."""
    rows = output_grad.reshape(-1, output_grad.shape[-1])
    weight_grad = rows.new_zeros(module.weight.shape).index_add_(0, tokens.reshape(-1), rows)
    if module.padding_idx is not None:
        weight_grad[module.padding_idx] = 0
    return Rebuilt(weight_grad, _norm(output_grad) * rows.shape[0] ** 0.5, (output_grad.dtype,))


def _conv_weight_gradient(
    layer: KroneckerLayer, layer_input: Tensor, output_grad: Tensor
) -> Tensor:
    """A convolution call's weight gradient, by the convolution's own backward of the input
    padded as the layer pads it (any padding mode), seen as a 2-D convolution; a transposed
    convolution's by its own backward (:func:`_transposed_weight_gradient`)."""
    module = layer.module
    if isinstance(module, CONV_TRANSPOSE_TYPES):
        return _transposed_weight_gradient(layer, layer_input, output_grad)
    geometry, planar = conv_as_2d(module, layer_input, layer.name)
    padded = padded_conv_input(geometry, planar).to(output_grad.dtype)
    planar_grad = output_grad.unsqueeze(2) if isinstance(module, nn.Conv1d) else output_grad
    weight_shape = (*module.weight.shape[:2], *geometry.kernel)
    weight_grad = torch.ops.aten.convolution_backward(
        planar_grad,
        padded,
        planar_grad.new_empty(1).expand(weight_shape),
        None,
        list(geometry.stride),
        [0, 0],
        list(geometry.dilation),
        False,
        [0, 0],
        module.groups,
        [False, True, False],
    )[1]
    return weight_grad.reshape(module.weight.shape)


def _transposed_weight_gradient(
    layer: KroneckerLayer, layer_input: Tensor, output_grad: Tensor
) -> Tensor:
    """A transposed convolution call's weight gradient, ``(C_in, C_out / g, *kernel)``, by the
    backward of ``conv_transpose`` itself (independent of the layer's convolution form in
    :func:`~natgrad.curvature.kfac_capture.conv_as_2d`)."""
    module = layer.module
    weight = module.weight
    return torch.ops.aten.convolution_backward(
        output_grad,
        layer_input.to(output_grad.dtype),
        output_grad.new_empty(1).expand(weight.shape),
        None,
        list(module.stride),
        list(module.padding),
        list(module.dilation),
        True,
        list(module.output_padding),
        module.groups,
        [False, True, False],
    )[1]


def _norm(tensor: Tensor) -> Tensor:
    return torch.linalg.vector_norm(tensor, dtype=_wide(tensor.dtype))


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _relative_excess(
    layer: KroneckerLayer, rebuilt: Sequence[list[Rebuilt]], autograd: list[Tensor | None]
) -> Tensor:
    """The largest over the layer's parameters of ``‖autograd − Σ_calls rebuilt‖ / (√ε
    Σ_calls bound)``: above 1 when the gradients differ by more than round-off (``ε`` of the
    least precise dtype involved); a 0-d float64 tensor."""
    ratios = []
    for position, (param, exact) in enumerate(zip(layer.parameters(), autograd, strict=True)):
        pieces = [call[position] for call in rebuilt]
        dtypes = [param.dtype, *(dtype for piece in pieces for dtype in piece.dtypes)]
        tolerance = max(torch.finfo(dtype).eps for dtype in dtypes) ** 0.5
        if exact is None:
            exact = torch.zeros_like(param)
        elif exact.is_sparse:  # an nn.Embedding(sparse=True)'s gradient
            exact = exact.to_dense()
        difference = exact.to(_wide(param.dtype))
        bound = torch.zeros((), dtype=torch.float64, device=param.device)
        for piece in pieces:
            difference = difference - piece.gradient.to(difference.dtype)
            bound = bound + piece.bound.double()
        floor = torch.finfo(torch.float64).tiny
        ratios.append(_norm(difference).double() / (tolerance * bound).clamp_min(floor))
    return torch.stack(ratios).max()
