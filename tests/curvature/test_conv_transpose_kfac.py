"""Kronecker factors of transposed convolutions (``nn.ConvTranspose1d``, ``nn.ConvTranspose2d``).

Oracles, all float64 and independent of :mod:`natgrad.curvature.kfac_capture`:

- the weight-matrix layout written out entry by entry (``explicit_matrix``);
- the expanded input built by hand (zeros inserted, padded or cropped), on which an
  ``nn.Conv2d`` with the explicit matrix as kernel reproduces the layer;
- per-sample, per-position input features read from a ``torch.func`` Jacobian of
  ``conv_transpose`` with respect to its weight, and output gradients from a Jacobian of the
  network's head, averaged by hand;
- the exact Fisher (``brute_force.exact_fisher``), which the K-FAC block equals for one sample
  with one output position.
"""

import pytest
import torch
import torch.nn.functional as functional
from brute_force import exact_fisher
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import jacrev, vmap

from natgrad import fisher
from natgrad.curvature.kfac import build_kfac
from natgrad.curvature.kfac_capture import (
    ForwardCapture,
    KroneckerLayer,
    conv_patch_means,
    conv_patches,
    kronecker_layers,
    matrix_as_weight,
    transposed_patch_gram,
    weight_as_matrix,
)
from natgrad.curvature.likelihoods import get_likelihood
from natgrad.curvature.weight_locality import foreign_weight_uses

DTYPE = torch.float64


def as_2d(value, one_d: bool, fill: int):
    """A 1-D layer's geometry tuple as a 2-D one, height ``fill``."""
    return (fill, *value) if one_d else tuple(value)


def explicit_matrix(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The documented layout, entry by entry: row ``j C_out/g + o``, column ``(i, a, b)`` holds
    ``weight[j C_in/g + i, o, k_h − 1 − a, k_w − 1 − b]``."""
    one_d = isinstance(module, nn.ConvTranspose1d)
    planar = weight.unsqueeze(2) if one_d else weight
    c_in, c_out_g, k_h, k_w = planar.shape
    groups = module.groups
    c_in_g = c_in // groups
    matrix = weight.new_zeros(c_out_g * groups, c_in_g * k_h * k_w)
    for j in range(groups):
        for o in range(c_out_g):
            for i in range(c_in_g):
                for a in range(k_h):
                    for b in range(k_w):
                        column = (i * k_h + a) * k_w + b
                        entry = planar[j * c_in_g + i, o, k_h - 1 - a, k_w - 1 - b]
                        matrix[j * c_out_g + o, column] = entry
    return matrix


def expanded_input(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The input with ``s − 1`` zeros between neighbours, padded by ``d (k − 1) − p`` (cropped
    where negative) plus ``output_padding`` at the end, as ``(N, C, H, W)``."""
    one_d = isinstance(module, nn.ConvTranspose1d)
    planar = inputs.unsqueeze(2) if one_d else inputs
    stride = as_2d(module.stride, one_d, 1)
    kernel = as_2d(module.kernel_size, one_d, 1)
    dilation = as_2d(module.dilation, one_d, 1)
    padding = as_2d(module.padding, one_d, 0)
    extra = as_2d(module.output_padding, one_d, 0)
    samples, channels, height, width = planar.shape
    inserted = planar.new_zeros(
        samples, channels, (height - 1) * stride[0] + 1, (width - 1) * stride[1] + 1
    )
    for row in range(height):
        for column in range(width):
            inserted[:, :, row * stride[0], column * stride[1]] = planar[:, :, row, column]
    before = [dilation[axis] * (kernel[axis] - 1) - padding[axis] for axis in range(2)]
    after = [before[axis] + extra[axis] for axis in range(2)]
    grown = functional.pad(inserted, (max(before[1], 0), max(after[1], 0), 0, 0))
    grown = functional.pad(grown, (0, 0, max(before[0], 0), max(after[0], 0)))
    rows = slice(max(-before[0], 0), grown.shape[2] - max(-after[0], 0))
    columns = slice(max(-before[1], 0), grown.shape[3] - max(-after[1], 0))
    return grown[:, :, rows, columns]


def twin_conv(module: nn.Module) -> nn.Conv2d:
    """The ``nn.Conv2d`` that applied to :func:`expanded_input` gives the layer's output."""
    one_d = isinstance(module, nn.ConvTranspose1d)
    kernel = as_2d(module.kernel_size, one_d, 1)
    conv = nn.Conv2d(
        module.in_channels,
        module.out_channels,
        kernel,
        dilation=as_2d(module.dilation, one_d, 1),
        groups=module.groups,
        bias=module.bias is not None,
    ).to(module.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(explicit_matrix(module, module.weight).reshape(conv.weight.shape))
        if module.bias is not None:
            conv.bias.copy_(module.bias)
    return conv


def jacobian_features(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Per group, sample and position the input features ``∂y[o, t] / ∂W[o, :]`` of the
    layer's matrix (``o`` the group's first output channel), from a ``torch.func`` Jacobian of
    ``conv_transpose`` in its weight, flipped into the documented layout by hand: shape
    ``(g, N, T, C_in/g · k_h · k_w)``."""
    one_d = isinstance(module, nn.ConvTranspose1d)
    transpose = functional.conv_transpose1d if one_d else functional.conv_transpose2d
    geometry = {
        "stride": module.stride,
        "padding": module.padding,
        "output_padding": module.output_padding,
        "groups": module.groups,
        "dilation": module.dilation,
    }

    def layer(weight: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        return transpose(sample.unsqueeze(0), weight, None, **geometry).squeeze(0)

    weight = module.weight.detach()
    jacobians = vmap(jacrev(layer), in_dims=(None, 0))(weight, inputs)
    if one_d:  # (N, C_out, L_out, C_in, C_out/g, k) as 2-D, height 1
        jacobians = jacobians.unsqueeze(2).unsqueeze(-2)
    samples, c_out = jacobians.shape[:2]
    groups, c_in_g = module.groups, module.in_channels // module.groups
    per_group = []
    for j in range(groups):
        first = j * (c_out // groups)
        rows = jacobians[:, first, :, :, j * c_in_g : (j + 1) * c_in_g, 0]  # (N, H, W, c, kh, kw)
        flipped = rows.flip(-1).flip(-2)
        per_group.append(flipped.reshape(samples, -1, flipped[0, 0, 0].numel()))
    return torch.stack(per_group)


def with_ones(features: torch.Tensor) -> torch.Tensor:
    return torch.cat([features, torch.ones_like(features[..., :1])], dim=-1)


def mean_outer(features: torch.Tensor) -> torch.Tensor:
    """``1/(N T) Σ_n Σ_t a aᵀ`` of features ``(..., N, T, d)``."""
    rows = features.flatten(-3, -2)
    return rows.mT @ rows / rows.shape[-2]


GEOMETRY = st.fixed_dictionaries(
    {
        "stride": st.integers(1, 3),
        "padding": st.integers(0, 3),
        "dilation": st.integers(1, 2),
        "groups": st.sampled_from([1, 2]),
        "bias": st.booleans(),
        "one_d": st.booleans(),
        "kernel": st.integers(1, 3),
        "output_padding": st.integers(0, 2),
    }
)


def make_layer(geometry: dict, seed: int = 0) -> nn.Module:
    """A transposed convolution of ``geometry`` (the output padding kept below the stride or
    dilation, as torch requires)."""
    torch.manual_seed(seed)
    extra = geometry["output_padding"] % max(geometry["stride"], geometry["dilation"])
    cls = nn.ConvTranspose1d if geometry["one_d"] else nn.ConvTranspose2d
    return cls(
        4,
        2 * geometry["groups"],
        geometry["kernel"],
        stride=geometry["stride"],
        padding=geometry["padding"],
        output_padding=extra,
        dilation=geometry["dilation"],
        groups=geometry["groups"],
        bias=geometry["bias"],
    ).to(DTYPE)


def layer_inputs(module: nn.Module, samples: int = 3, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    spatial = (5,) if isinstance(module, nn.ConvTranspose1d) else (3, 4)
    return torch.randn(samples, module.in_channels, *spatial, generator=generator, dtype=DTYPE)


def has_output(module: nn.Module, inputs: torch.Tensor) -> bool:
    """Whether the layer's output on ``inputs`` has positions (``assume``'d in examples)."""
    sizes = [
        (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + extra + 1
        for size, stride, padding, dilation, kernel, extra in zip(
            inputs.shape[2:],
            module.stride,
            module.padding,
            module.dilation,
            module.kernel_size,
            module.output_padding,
            strict=True,
        )
    ]
    return min(sizes) > 0


@settings(max_examples=30, deadline=None)
@given(geometry=GEOMETRY, seed=st.integers(0, 2**16))
def test_weight_matrix_is_the_documented_transposed_flipped_layout(geometry, seed) -> None:
    module = make_layer(geometry, seed)
    weight = torch.randn_like(module.weight)
    matrix = weight_as_matrix(module, weight)
    torch.testing.assert_close(matrix, explicit_matrix(module, weight), rtol=0, atol=0)
    assert torch.equal(matrix_as_weight(module, matrix), weight)


@settings(max_examples=30, deadline=None)
@given(geometry=GEOMETRY)
def test_conv_on_the_expanded_input_reproduces_the_layer(geometry) -> None:
    """The test's own expanded input and explicit kernel are a correct oracle."""
    module = make_layer(geometry)
    inputs = layer_inputs(module)
    assume(has_output(module, inputs))
    output = twin_conv(module)(expanded_input(module, inputs))
    torch.testing.assert_close(output.reshape(module(inputs).shape), module(inputs))


@settings(max_examples=30, deadline=None)
@given(geometry=GEOMETRY)
def test_patches_are_those_of_the_expanded_input_and_of_the_jacobian(geometry) -> None:
    module = make_layer(geometry)
    inputs = layer_inputs(module)
    assume(has_output(module, inputs))
    patches = conv_patches(module, inputs)  # (C_in k_h k_w, N, T)
    twin = twin_conv(module)
    unfolded = functional.unfold(
        expanded_input(module, inputs), twin.kernel_size, dilation=twin.dilation
    )
    torch.testing.assert_close(patches, unfolded.permute(1, 0, 2))
    by_group = patches.reshape(module.groups, -1, *patches.shape[1:]).permute(0, 2, 3, 1)
    torch.testing.assert_close(by_group, jacobian_features(module, inputs))
    torch.testing.assert_close(conv_patch_means(module, inputs), unfolded.mean(2).T)


@settings(max_examples=30, deadline=None)
@given(geometry=GEOMETRY)
def test_phased_gram_equals_the_gram_of_every_jacobian_patch(geometry) -> None:
    """K-FAC-expand's ``Σ a aᵀ`` gathered by phases of the output positions (no zeros of the
    expanded input) equals that of the Jacobian's features at every position."""
    module = make_layer(geometry)
    inputs = layer_inputs(module)
    assume(has_output(module, inputs))
    features = jacobian_features(module, inputs)
    if module.bias is not None:
        features = with_ones(features)
    gram, count = transposed_patch_gram(module, inputs, module.bias is not None)
    expected = mean_outer(features)
    assert count == features.shape[1] * features.shape[2]
    torch.testing.assert_close(gram.reshape(expected.shape) / count, expected)


def decoder(geometry: dict, outputs: int = 3) -> tuple[nn.Sequential, torch.Tensor]:
    module = make_layer(geometry)
    inputs = layer_inputs(module)
    model = nn.Sequential(module, nn.Tanh(), nn.Flatten(), nn.LazyLinear(outputs)).to(DTYPE)
    model(inputs)
    return model, inputs


def brute_force_factors(model: nn.Sequential, inputs: torch.Tensor, likelihood: str):
    """``(A, G)`` of the first layer by hand, per group ``(g, d, d)``: features from the
    Jacobian of the layer in its weight, output gradients from the Jacobian of the head in the
    layer output and ``∇²A`` of the likelihood (the exact Fisher)."""
    module = model[0]
    features = jacobian_features(module, inputs)
    if module.bias is not None:
        features = with_ones(features)
    layer_output = module(inputs).detach()
    head = nn.Sequential(*list(model)[1:])
    jacobian = vmap(jacrev(lambda out: head(out.unsqueeze(0)).squeeze(0)))(layer_output)
    samples, classes = jacobian.shape[:2]
    jacobian = jacobian.reshape(samples, classes, module.out_channels, -1)  # (N, C, d_out, T)
    hessians = get_likelihood(likelihood).natural_hessian(model(inputs).detach())
    output = torch.einsum("ncot,ncd,ndpt->op", jacobian, hessians, jacobian) / samples
    size = module.out_channels // module.groups
    blocks = [
        output[j * size : (j + 1) * size, j * size : (j + 1) * size] for j in range(module.groups)
    ]
    return mean_outer(features), torch.stack(blocks)


@settings(max_examples=20, deadline=None)
@given(geometry=GEOMETRY)
def test_operator_factors_equal_brute_force_expectations(geometry) -> None:
    layer = make_layer(geometry)
    assume(has_output(layer, layer_inputs(layer)))
    model, inputs = decoder(geometry)
    kfac = build_kfac(model, inputs, likelihood="categorical")
    expected_a, expected_g = brute_force_factors(model, inputs, "categorical")
    groups = model[0].groups
    actual_a, actual_g = kfac.input_factors[0], kfac.output_factors[0]
    if groups == 1:
        actual_a, actual_g = actual_a.unsqueeze(0), actual_g.unsqueeze(0)
    torch.testing.assert_close(actual_a, expected_a)
    torch.testing.assert_close(actual_g, expected_g)


class Expand(nn.Module):
    """:func:`expanded_input` of a transposed convolution as a parameter-free module."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.reference = [module]  # not registered: the twin holds no transposed convolution

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return expanded_input(self.reference[0], inputs)


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
def test_operator_equals_the_twin_conv_on_the_expanded_input(kind: str, kfac_approx: str) -> None:
    """The K-FAC operator of a decoder equals that of its twin (the expanded input, then a
    ``Conv2d`` with the transposed, flipped kernel): factors, and the dense operator once both
    are in the twin's parameter layout."""
    geometry = {"stride": 2, "padding": 1, "dilation": 1, "groups": 2, "bias": True}
    geometry |= {"one_d": False, "kernel": 3, "output_padding": 1}
    model, inputs = decoder(geometry)
    twin = nn.Sequential(Expand(model[0]), twin_conv(model[0]), *list(model)[1:])
    targets = torch.randint(0, 3, (len(inputs),), generator=torch.Generator().manual_seed(2))
    operators = [
        build_kfac(
            network,
            inputs,
            likelihood="categorical",
            kind=kind,
            targets=targets,
            generator=torch.Generator().manual_seed(3),
            kfac_approx=kfac_approx,
        )
        for network in (model, twin)
    ]
    for ours, theirs in zip(operators[0].input_factors, operators[1].input_factors, strict=True):
        torch.testing.assert_close(ours, theirs)
    for ours, theirs in zip(operators[0].output_factors, operators[1].output_factors, strict=True):
        torch.testing.assert_close(ours, theirs)
    permutation = twin_positions(model)
    dense = operators[0].to_dense()
    torch.testing.assert_close(
        dense[permutation][:, permutation], operators[1].to_dense(), rtol=1e-10, atol=1e-12
    )


def twin_positions(model: nn.Sequential) -> torch.Tensor:
    """Positions in the model's flat parameters of the twin's flat parameters (the twin's
    kernel is the explicit matrix of the model's weight; the rest is shared in order)."""
    module = model[0]
    sizes = [param.numel() for param in model.parameters()]
    entries = torch.arange(module.weight.numel(), dtype=DTYPE).reshape(module.weight.shape)
    weight = explicit_matrix(module, entries).reshape(-1).long()
    rest = torch.arange(sizes[0], sum(sizes))
    return torch.cat([weight, rest])


@pytest.mark.parametrize("one_d", [False, True])
def test_one_sample_one_position_equals_the_exact_fisher(one_d: bool) -> None:
    """Two input pixels per axis, stride 2, padding 2, kernel 3: one output position, whose
    patch holds every input entry at its corners. For one sample the K-FAC (and EKFAC) block is
    then the exact Fisher of a Gaussian likelihood (whose ``∇²A = I`` leaves the groups'
    blocks uncoupled), bias included."""
    torch.manual_seed(0)
    cls = nn.ConvTranspose1d if one_d else nn.ConvTranspose2d
    model = nn.Sequential(cls(4, 6, 3, stride=2, padding=2, groups=2), nn.Flatten()).to(DTYPE)
    inputs = torch.randn(1, 4, *((2,) if one_d else (2, 2)), dtype=DTYPE)
    assert model(inputs).shape == (1, 6)
    reference = exact_fisher(model, inputs, "gaussian")
    for structure in ("kfac", "ekfac"):
        operator = fisher(model, inputs, likelihood="gaussian", structure=structure)
        torch.testing.assert_close(operator.to_dense(), reference)


def test_layer_diagonal_equals_the_exact_fisher_diagonal() -> None:
    """``structure="diag"`` of a model of transposed convolutions, built per layer from
    per-sample gradients in the weight-matrix layout, against the brute-force diagonal."""
    geometry = {"stride": 2, "padding": 1, "dilation": 2, "groups": 2, "bias": True}
    geometry |= {"one_d": False, "kernel": 3, "output_padding": 1}
    model, inputs = decoder(geometry)
    diagonal = fisher(model, inputs, likelihood="categorical", structure="diag").diag()
    torch.testing.assert_close(diagonal, exact_fisher(model, inputs, "categorical").diagonal())


def test_flat_indices_follow_the_layout() -> None:
    """The block of a layer's matrix entries, read from the operator at
    :meth:`KroneckerLayer.flat_indices`, is the Kronecker product of its factors."""
    geometry = {"stride": 3, "padding": 0, "dilation": 1, "groups": 1, "bias": True}
    geometry |= {"one_d": False, "kernel": 2, "output_padding": 2}
    model, inputs = decoder(geometry)
    kfac = build_kfac(model, inputs, likelihood="categorical")
    layer = kronecker_layers(model)[0]
    sizes = [param.numel() for param in model.parameters()]
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()[:-1]]
    positions = layer.flat_indices(offsets)
    block = kfac.to_dense()[positions][:, positions]
    torch.testing.assert_close(block, torch.kron(kfac.output_factors[0], kfac.input_factors[0]))
    entries = torch.arange(model[0].weight.numel(), dtype=DTYPE).reshape(model[0].weight.shape)
    expected = explicit_matrix(model[0], entries).long()
    assert torch.equal(positions.reshape(layer.output_dim, -1)[:, :-1], expected)


class ForeignUse(nn.Module):
    """A decoder whose weight is also applied outside the layer's call."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 3, stride=2)
        self.head = nn.Linear(3 * 7 * 7, 2)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.up(inputs) + functional.conv_transpose2d(inputs, self.up.weight, stride=2)
        return self.head(hidden.flatten(1))


def test_weight_locality_refuses_a_foreign_use_and_passes_a_clean_model() -> None:
    torch.manual_seed(0)
    inputs = torch.randn(2, 2, 3, 3, dtype=DTYPE)
    foreign = ForeignUse().to(DTYPE)
    with pytest.raises(ValueError, match="'up'"):
        build_kfac(foreign, inputs, likelihood="categorical")
    layers = kronecker_layers(foreign)
    with ForwardCapture(layers) as capture:
        outputs = foreign(inputs)
    assert foreign_weight_uses(foreign, layers, capture.calls, outputs) == ["up"]
    geometry = {"stride": 2, "padding": 1, "dilation": 2, "groups": 2, "bias": True}
    model, inputs = decoder(geometry | {"one_d": False, "kernel": 3, "output_padding": 1})
    layers = kronecker_layers(model)
    with ForwardCapture(layers) as capture:
        outputs = model(inputs)
    assert foreign_weight_uses(model, layers, capture.calls, outputs) == []


def test_output_size_other_than_output_padding_is_refused() -> None:
    """``forward(x, output_size=...)`` picks another output padding than the module's, which
    the features would not describe: refused, naming the layer."""

    class Upsample(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.up(inputs, output_size=[6, 6]).flatten(1)

    inputs = torch.randn(2, 2, 3, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"layer 'up'.*output_padding"):
        build_kfac(Upsample().to(DTYPE), inputs, likelihood="categorical")


def test_kronecker_layer_dimensions_of_a_grouped_transposed_conv() -> None:
    module = nn.ConvTranspose2d(6, 4, (2, 3), groups=2)
    layer = KroneckerLayer("up", module, 0, 1)
    assert (layer.output_dim, layer.input_dim, layer.groups) == (4, 3 * 2 * 3 + 1, 2)
    matrix = layer.to_matrix([module.weight.detach(), module.bias.detach()])
    assert matrix.shape == (2, 2, 19)
    pieces = layer.from_matrix(matrix)
    assert torch.equal(pieces[0], module.weight.detach())
    assert torch.equal(pieces[1], module.bias.detach())
