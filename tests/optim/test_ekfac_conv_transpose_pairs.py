"""EKFAC's eigenvalues and steps on transposed convolutions, whose per-sample gradients are
formed without gathering the patches (``transposed_per_sample_gradients``).

Oracle, float64, independent of the basis: the per-sample Jacobians of the network's outputs
with respect to the layer's weight and bias from ``torch.func.vmap(torch.func.jacrev(...))`` on
one sample, laid out by hand as the weight matrix of the module docstring of
:mod:`natgrad.curvature.kfac_capture` (kernel transposed within each group and flipped, bias
last), projected with the preconditioner's own eigenbases ``Q_G``, ``Q_A`` (so that a repeated
eigenvalue of a factor, whose eigenbasis is not unique, does not matter): the eigenvalues are
``1/N Σ_n Σ_kl M_n,kl C_n,k ⊙ C_n,l`` of the coordinates ``C_n,k = Q_Gᵀ J_n,k Q_A`` of output
``k``'s Jacobian, with ``M_n`` the outer product of the backward vector (empirical: the
cross-entropy's gradient ``softmax − one-hot``; MC: the sampled one) or the cross-entropy's
Hessian ``diag(p) − p pᵀ`` (exact Fisher), and the step the dense eigenbasis solve of the mean
gradient.
"""

import copy

import pytest
import torch
import torch.nn.functional as functional
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, jacrev, vmap

from kfac_training import fisher_options, train_steps
from natgrad.curvature.kfac_capture import backward_vectors, transposed_per_sample_gradients
from natgrad.optim import EKFAC

DTYPE = torch.float64
DAMPING = 1e-3
CLASSES = 3


class Decoder(nn.Module):
    """The transposed convolution, called ``calls`` times on the same samples (the second call
    on the input flipped along its last axis), then a linear head on the pooled outputs."""

    def __init__(self, layer: nn.Module, calls: int) -> None:
        super().__init__()
        self.layer = layer
        self.calls = calls
        one_d = isinstance(layer, nn.ConvTranspose1d)
        self.pool = nn.AdaptiveAvgPool1d(2) if one_d else nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(layer.out_channels * (2 if one_d else 4), CLASSES)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.layer(inputs))
        if self.calls == 2:
            hidden = hidden + torch.tanh(self.layer(inputs.flip(-1)))
        return self.head(self.pool(hidden).flatten(1))


GEOMETRIES = [
    pytest.param(nn.ConvTranspose2d, {"padding": 1}, id="2d-stride1"),
    pytest.param(
        nn.ConvTranspose2d, {"stride": 2, "padding": 1, "output_padding": 1}, id="2d-stride2"
    ),
    pytest.param(
        nn.ConvTranspose2d,
        {"stride": (2, 3), "padding": (3, 0), "dilation": (1, 2), "groups": 2},
        id="2d-grouped-cropped",
    ),
    pytest.param(
        nn.ConvTranspose2d,
        {"stride": (1, 2), "padding": (2, 1), "output_padding": (1, 0), "dilation": (2, 1)},
        id="2d-output-padding-over-stride",
    ),
    pytest.param(
        nn.ConvTranspose1d,
        {"stride": 3, "padding": 2, "output_padding": 2, "dilation": 2, "bias": False},
        id="1d-dilated-nobias",
    ),
    pytest.param(nn.ConvTranspose1d, {"stride": 2, "groups": 2}, id="1d-grouped"),
    pytest.param(
        nn.ConvTranspose1d,
        {"output_padding": 1, "dilation": 2, "groups": 2},
        id="1d-output-padding-over-stride",
    ),
]


def spatial(cls: type) -> tuple[int, ...]:
    return (5,) if cls is nn.ConvTranspose1d else (3, 4)


def weight_matrices(module: nn.Module, weights: torch.Tensor) -> torch.Tensor:
    """Weights ``(..., C_in, C_out / g, *kernel)`` as ``(g, ..., C_out / g, d_in / g)``: entry
    ``(j, ..., o, (i, kernel offsets))`` is ``weights[..., j C_in/g + i, o, flipped
    offsets]``."""
    groups, spatial_dims = module.groups, len(module.kernel_size)
    lead = weights.shape[: weights.ndim - spatial_dims - 2]
    kernel_dims = tuple(range(weights.ndim + 1 - spatial_dims, weights.ndim + 1))
    by_group = weights.reshape(*lead, groups, -1, *weights.shape[len(lead) + 1 :])
    rows = by_group.flip(kernel_dims).transpose(-spatial_dims - 2, -spatial_dims - 1)
    matrices = rows.reshape(*lead, groups, rows.shape[-spatial_dims - 2], -1)
    return matrices.movedim(-3, 0)


def layer_matrices(layer: nn.Module, grads: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """Gradients ``(..., *weight shape)`` and ``(..., C_out)`` of the layer's parameters as
    weight matrices with the bias last, ``(g, ..., C_out / g, d_in / g [+ 1])``."""
    matrices = weight_matrices(layer, grads[f"{prefix}weight"])
    if layer.bias is None:
        return matrices
    bias = grads[f"{prefix}bias"]
    bias = bias.reshape(*bias.shape[:-1], layer.groups, -1, 1).movedim(-3, 0)
    return torch.cat([matrices, bias], dim=-1)


def oracle_jacobians(model: Decoder, inputs: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians of the outputs for the layer, ``(g, N, C, d_out/g, d_in/g [+1])``,
    through a copy of ``model`` (whose copied hooks record nothing)."""
    model = copy.deepcopy(model)
    params = {name: param.detach() for name, param in model.named_parameters()}

    def outputs(params, sample):
        return functional_call(model, params, (sample.unsqueeze(0),))[0]

    jacobians = vmap(jacrev(outputs), in_dims=(None, 0))(params, inputs)
    return layer_matrices(model.layer, jacobians, "layer.")


def output_moments(precond, outputs, targets, sampler) -> torch.Tensor:
    """``M_n`` ``(N, C, C)`` of the module docstring."""
    probabilities = torch.softmax(outputs, dim=1)
    if precond.fisher_type == "exact":
        return torch.diag_embed(probabilities) - probabilities[:, :, None] * probabilities[:, None]
    if precond.fisher_type == "mc":
        vectors = backward_vectors(outputs, precond.likelihood, "mc", None, 1, sampler)[0]
    else:
        vectors = probabilities - functional.one_hot(targets, CLASSES).to(DTYPE)
    return vectors[:, :, None] * vectors[:, None]


def build(cls, geometry, calls):
    torch.manual_seed(0)
    layer = cls(4, 6, 3, **geometry)
    return Decoder(layer, calls).to(DTYPE)


def step_once(model, precond, inputs, targets):
    model.zero_grad()
    outputs = model(inputs)
    if precond.fisher_type != "empirical":
        precond.sample_backward(outputs)
    functional.cross_entropy(outputs, targets).backward()
    mean_grad = layer_gradient(model)
    precond.step()
    return outputs.detach(), mean_grad


def layer_gradient(model: Decoder) -> torch.Tensor:
    """The layer's ``.grad`` as weight matrices ``(g, d_out/g, d_in/g [+1])``."""
    layer = model.layer
    grads = {name: param.grad for name, param in layer.named_parameters()}
    return layer_matrices(layer, grads, "")


def as_grouped(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    return tensor if groups > 1 else tensor.unsqueeze(0)


@pytest.mark.parametrize(("cls", "geometry"), GEOMETRIES)
@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "exact"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("calls", [1, 2])
def test_eigenvalues_and_step_equal_the_per_sample_gradient_oracle(
    cls, geometry, fisher_type, kfac_approx, calls
) -> None:
    model = build(cls, geometry, calls)
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(12, 4, *spatial(cls), generator=generator, dtype=DTYPE)
    targets = torch.randint(0, CLASSES, (12,), generator=generator)
    options = {"fisher_type": fisher_type, "kfac_approx": kfac_approx, "damping": DAMPING}
    if fisher_type != "empirical":
        options["likelihood"] = "categorical"
    if fisher_type == "mc":
        options["generator"] = torch.Generator().manual_seed(5)
    precond = EKFAC(model, eigenvalue_restart="batch", inv_update_interval=1, **options)
    outputs, mean_grad = step_once(model, precond, inputs, targets)

    sampler = torch.Generator().manual_seed(5)
    moments = output_moments(precond, outputs, targets, sampler)
    jacobians = oracle_jacobians(model, inputs)  # (g, N, C, d_out/g, d_in/g [+1])
    state = precond.layers[0]
    groups = model.layer.groups
    output_vectors = as_grouped(state.output_eigen.vectors, groups)
    input_vectors = as_grouped(state.input_eigen.vectors, groups)
    coordinates = output_vectors[:, None, None].mT @ jacobians @ input_vectors[:, None, None]
    weighted = torch.einsum("nkl,gnkij,gnlij->gij", moments, coordinates, coordinates)
    expected = weighted / len(inputs)
    eigenvalues = as_grouped(state.eigenvalues, groups)
    torch.testing.assert_close(eigenvalues, expected, rtol=1e-10, atol=1e-14)

    mean_coordinates = output_vectors.mT @ mean_grad @ input_vectors
    solution = output_vectors @ (mean_coordinates / (expected + DAMPING)) @ input_vectors.mT
    torch.testing.assert_close(layer_gradient(model), solution, rtol=1e-10, atol=1e-14)


@settings(max_examples=30, deadline=None)
@given(
    one_d=st.booleans(),
    stride=st.integers(1, 3),
    padding=st.integers(0, 3),
    dilation=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
    bias=st.booleans(),
    extra=st.integers(0, 2),
    samples=st.integers(1, 4),
)
@example(False, 1, 0, 2, 1, False, 1, 1)  # output padding ≥ stride, the last position cropped
@example(True, 1, 2, 2, 2, True, 1, 3)  # output padding ≥ stride, under the padding
def test_per_sample_gradients_equal_vmap_of_the_layer(
    one_d, stride, padding, dilation, groups, bias, extra, samples
) -> None:
    output_padding = min(extra, max(stride, dilation) - 1)
    cls = nn.ConvTranspose1d if one_d else nn.ConvTranspose2d
    shortest = min(spatial(cls))
    assume((shortest - 1) * stride - 2 * padding + 2 * dilation + output_padding + 1 >= 1)
    layer = cls(4, 6, 3, stride, padding, output_padding, groups, bias, dilation).to(DTYPE)
    assert_per_sample_gradients_equal_vmap(layer, samples, seed=stride + 7 * padding)


@pytest.mark.parametrize(
    "geometry",
    [
        {"stride": (1, 2), "padding": (0, 1), "output_padding": (1, 0), "dilation": (2, 1)},
        {"stride": (2, 1), "padding": (1, 3), "output_padding": (1, 1), "dilation": (1, 2)},
    ],
)
def test_per_sample_gradients_with_output_padding_over_stride_on_one_axis(geometry) -> None:
    layer = nn.ConvTranspose2d(4, 6, 3, groups=2, **geometry).to(DTYPE)
    assert_per_sample_gradients_equal_vmap(layer, samples=3, seed=11)


def assert_per_sample_gradients_equal_vmap(layer: nn.Module, samples: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 4, *spatial(type(layer)), generator=generator, dtype=DTYPE)
    outputs = layer(inputs)
    output_grads = torch.randn(outputs.shape, generator=generator, dtype=DTYPE)
    params = {name: param.detach() for name, param in layer.named_parameters()}

    def product(params, sample, vector):
        return (functional_call(layer, params, (sample.unsqueeze(0),))[0] * vector).sum()

    grads = vmap(torch.func.grad(product), in_dims=(None, 0, 0))(params, inputs, output_grads)
    expected = layer_matrices(layer, grads, "")
    bias = layer.bias is not None
    found = transposed_per_sample_gradients(layer, inputs, output_grads, bias)
    torch.testing.assert_close(as_grouped(found, layer.groups), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_a_bias_frozen_after_building_gives_the_steps_of_a_bias_free_layer(fisher_type) -> None:
    """Frozen at zero right after building (the first step's pairs recorded with the bias), the
    layer takes the steps of its bias-free twin."""
    geometry = {"stride": 2, "padding": 1, "output_padding": 1, "groups": 2}
    with_bias, without_bias = (
        build(nn.ConvTranspose2d, geometry, 1),
        build(nn.ConvTranspose2d, geometry | {"bias": False}, 1),
    )
    with torch.no_grad():
        with_bias.layer.bias.zero_()
        without_bias.load_state_dict(with_bias.state_dict() | {"layer.bias": None}, strict=False)
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(12, 4, 3, 4, generator=generator, dtype=DTYPE)
    targets = torch.randint(0, CLASSES, (12,), generator=generator)
    results = []
    for model in (with_bias, without_bias):
        precond = EKFAC(model, damping=0.1, **fisher_options(fisher_type, 5))
        if model.layer.bias is not None:
            model.layer.bias.requires_grad_(False)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
        train_steps(model, precond, optimizer, inputs, targets, 3)
        results.append(model.layer.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-14)


def test_per_sample_gradients_refuse_a_layer_or_gradients_they_do_not_fit() -> None:
    layer = nn.ConvTranspose2d(4, 6, 3, stride=2)
    inputs = torch.randn(2, 4, 3, 4)
    output_grads = torch.randn(2, 6, 7, 9)
    with pytest.raises(TypeError, match=r"layer 'up': expected an nn\.ConvTranspose1d.*got Conv2d"):
        transposed_per_sample_gradients(nn.Conv2d(4, 6, 3), inputs, output_grads, True, "up")
    with pytest.raises(ValueError, match=r"layer 'up': expected a batched \(N, 4, H, W\) input"):
        transposed_per_sample_gradients(layer, inputs[0], output_grads, True, "up")
    with pytest.raises(
        ValueError, match=r"shape \(2, 6, \.\.\.\) like the input's, got shape \(2, 5"
    ):
        transposed_per_sample_gradients(layer, inputs, output_grads[:, :5], True, "up")
    with pytest.raises(ValueError, match=r"layer 'up': output of spatial size \(8, 9\)"):
        transposed_per_sample_gradients(layer, inputs, torch.randn(2, 6, 8, 9), True, "up")
