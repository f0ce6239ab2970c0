"""K-FAC/EKFAC on transposed convolutions (``nn.ConvTranspose1d``, ``nn.ConvTranspose2d``).

A transposed convolution is the convolution of its expanded input (zeros inserted between the
input's entries, padded or cropped) with its kernel transposed within each group and flipped.
The oracles, float64 and written here by hand:

- the *twin*: the same network with the layer replaced by that expansion and an ``nn.Conv2d``
  with the explicit kernel, which K-FAC already handles; trained side by side, both must take
  the same steps (factors equal, weights equal through the explicit kernel map) for every Fisher
  type, damping mode and approximation, in K-FAC and (on geometries whose factors have distinct
  eigenvalues, so that its eigenbasis is unique) EKFAC;
- factors averaged by hand over samples and positions (patches sliced from the expanded input,
  per-sample output gradients from autograd), and the preconditioned gradient as the dense
  solve with their Kronecker product;
- for one sample whose output has one position, the exact Fisher from ``torch.func``.
"""

import copy

import pytest
import torch
import torch.nn.functional as functional
from torch import nn
from torch.func import functional_call, jacrev

from kfac_training import fisher_options, train_steps
from natgrad.optim import EKFAC, KFAC

DTYPE = torch.float64


def planar(module: nn.Module, value: tuple[int, ...], fill: int) -> tuple[int, int]:
    """A geometry tuple as ``(h, w)``; a 1-D layer's has height ``fill``."""
    return (fill, *value) if isinstance(module, nn.ConvTranspose1d) else tuple(value)


def explicit_kernel(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The twin ``Conv2d``'s kernel ``(C_out, C_in / g, k_h, k_w)``, entry by entry:
    ``[j C_out/g + o, i, a, b] = weight[j C_in/g + i, o, k_h − 1 − a, k_w − 1 − b]``."""
    weight = weight.unsqueeze(2) if isinstance(module, nn.ConvTranspose1d) else weight
    c_in, c_out_g, k_h, k_w = weight.shape
    groups = module.groups
    c_in_g = c_in // groups
    kernel = weight.new_zeros(c_out_g * groups, c_in_g, k_h, k_w)
    for j in range(groups):
        for o in range(c_out_g):
            for i in range(c_in_g):
                for a in range(k_h):
                    for b in range(k_w):
                        entry = weight[j * c_in_g + i, o, k_h - 1 - a, k_w - 1 - b]
                        kernel[j * c_out_g + o, i, a, b] = entry
    return kernel


class Expand(nn.Module):
    """The expanded input of a transposed convolution, ``(N, C, H', W')``: ``s − 1`` zeros
    between neighbours, ``d (k − 1) − p`` zeros before (cropped where negative) and that plus
    ``output_padding`` after, along each axis."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.stride = planar(module, module.stride, 1)
        kernel, dilation = planar(module, module.kernel_size, 1), planar(module, module.dilation, 1)
        padding = planar(module, module.padding, 0)
        extra = planar(module, module.output_padding, 0)
        self.before = [dilation[axis] * (kernel[axis] - 1) - padding[axis] for axis in (0, 1)]
        self.after = [self.before[axis] + extra[axis] for axis in (0, 1)]
        self.one_d = isinstance(module, nn.ConvTranspose1d)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.unsqueeze(2) if self.one_d else inputs
        samples, channels, height, width = inputs.shape
        (s_h, s_w), before, after = self.stride, self.before, self.after
        size = (samples, channels, (height - 1) * s_h + 1, (width - 1) * s_w + 1)
        inserted = inputs.new_zeros(size)
        for row in range(height):
            for column in range(width):
                inserted[:, :, row * s_h, column * s_w] = inputs[:, :, row, column]
        grown = functional.pad(inserted, (max(before[1], 0), max(after[1], 0)))
        grown = functional.pad(grown, (0, 0, max(before[0], 0), max(after[0], 0)))
        rows = slice(max(-before[0], 0), grown.shape[2] - max(-after[0], 0))
        columns = slice(max(-before[1], 0), grown.shape[3] - max(-after[1], 0))
        return grown[:, :, rows, columns]


class TwinLayer(nn.Module):
    """A transposed convolution as :class:`Expand` and an ``nn.Conv2d`` with the explicit
    kernel (its output squeezed back to ``(N, C, L)`` for a 1-D layer)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.expand = Expand(module)
        self.conv = nn.Conv2d(
            module.in_channels,
            module.out_channels,
            planar(module, module.kernel_size, 1),
            dilation=planar(module, module.dilation, 1),
            groups=module.groups,
            bias=module.bias is not None,
        ).to(DTYPE)
        with torch.no_grad():
            self.conv.weight.copy_(explicit_kernel(module, module.weight))
            if module.bias is not None:
                self.conv.bias.copy_(module.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs = self.conv(self.expand(inputs))
        return outputs.squeeze(2) if self.expand.one_d else outputs


def twin_of(model: nn.Sequential) -> nn.Sequential:
    """``model`` with its first layer (a transposed convolution) as a :class:`TwinLayer`; the
    rest copied."""
    return nn.Sequential(TwinLayer(model[0]), *copy.deepcopy(list(model)[1:]))


def decoder(cls: type, seed: int = 0, **geometry) -> nn.Sequential:
    """A transposed convolution, tanh, average pooling to 2 positions per axis and a linear
    head with 3 outputs (few enough inputs that the head's ``A`` has no null space, in which
    EKFAC's eigenvalues would depend on an arbitrary eigenbasis)."""
    torch.manual_seed(seed)
    pool = nn.AdaptiveAvgPool1d(2) if cls is nn.ConvTranspose1d else nn.AdaptiveAvgPool2d(2)
    layer = cls(4, 6, 3, **geometry)
    model = nn.Sequential(layer, nn.Tanh(), pool, nn.Flatten(), nn.LazyLinear(3)).to(DTYPE)
    model(torch.zeros(1, 4, *spatial(cls), dtype=DTYPE))
    return model


def spatial(cls: type) -> tuple[int, ...]:
    return (4,) if cls is nn.ConvTranspose1d else (3, 4)


def batch(cls: type, samples: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 4, *spatial(cls), generator=generator, dtype=DTYPE)
    return inputs, torch.randint(0, 3, (samples,), generator=generator)


CASES = [
    pytest.param(nn.ConvTranspose2d, {"stride": 2, "padding": 1, "output_padding": 1}, id="2d"),
    pytest.param(
        nn.ConvTranspose2d,
        {"stride": (2, 3), "padding": (3, 0), "dilation": (1, 2), "groups": 2},
        id="2d-grouped-cropped",
    ),
    pytest.param(
        nn.ConvTranspose1d,
        {"stride": 3, "padding": 2, "output_padding": 2, "dilation": 2, "bias": False},
        id="1d",
    ),
]
VARIANTS = [(KFAC, "eigen", "expand"), (KFAC, "factored", "reduce")]
# EKFAC's eigenvalues are those of one eigenbasis, which is not unique where a factor has a
# repeated eigenvalue (the three CASES above have: ``A`` of the 1-D layer is block-diagonal with
# equal blocks, the others' reduce ``A`` has a null space), and there the twin, whose factors
# differ from ours by rounding, may take another; its twin test runs on geometries whose factors'
# eigenvalues are apart (checked), and tests/optim/test_ekfac_conv_transpose_pairs.py checks
# EKFAC in any basis against a brute force projected with its own.
EKFAC_CASES = [
    pytest.param(
        nn.ConvTranspose2d, {"stride": 2, "padding": 3, "output_padding": 1, "dilation": 2}, id="2d"
    ),
    pytest.param(
        nn.ConvTranspose2d,
        {"stride": (2, 3), "padding": (2, 1), "dilation": (1, 2), "groups": 2},
        id="2d-grouped-cropped",
    ),
    pytest.param(
        nn.ConvTranspose1d,
        {"stride": 2, "padding": 3, "output_padding": 1, "dilation": 2, "bias": False},
        id="1d",
    ),
]
RELATIVE_GAP = 1e-6


def train_side_by_side(model, twin, cls, fisher_type, options):
    preconds = []
    inputs, targets = batch(type(model[0]))
    for network in (model, twin):
        precond = cls(network, **fisher_options(fisher_type, 0), **options)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
        train_steps(network, precond, optimizer, inputs, targets, 3)
        preconds.append(precond)
    return preconds


def smallest_relative_gap(precond) -> float:
    """The smallest gap between neighbouring eigenvalues of any factor of ``precond``'s
    layers, relative to the factor's largest eigenvalue."""
    gaps = []
    for state in precond.layers:
        for factor in (state.input_factor, state.output_factor):
            values = torch.linalg.eigvalsh(factor)
            gaps.append((values.diff(dim=-1).min() / values.abs().max()).item())
    return min(gaps)


@pytest.mark.parametrize(("layer_type", "geometry"), CASES)
@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "exact"])
@pytest.mark.parametrize(("cls", "damping_mode", "kfac_approx"), VARIANTS)
def test_steps_equal_the_twin_conv_on_the_expanded_input(
    layer_type, geometry, fisher_type, cls, damping_mode, kfac_approx
) -> None:
    assert_steps_equal_the_twin(layer_type, geometry, fisher_type, cls, damping_mode, kfac_approx)


@pytest.mark.parametrize(("layer_type", "geometry"), EKFAC_CASES)
@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "exact"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_ekfac_steps_equal_the_twin_where_the_eigenbases_are_unique(
    layer_type, geometry, fisher_type, kfac_approx
) -> None:
    ours = assert_steps_equal_the_twin(
        layer_type, geometry, fisher_type, EKFAC, "eigen", kfac_approx
    )
    assert smallest_relative_gap(ours) > RELATIVE_GAP


def assert_steps_equal_the_twin(layer_type, geometry, fisher_type, cls, damping_mode, kfac_approx):
    """Train the decoder and its twin side by side for 3 steps, assert that they stay equal, and
    return the decoder's preconditioner."""
    model = decoder(layer_type, **geometry)
    twin = twin_of(model)
    options = {"damping": 0.05, "damping_mode": damping_mode, "kfac_approx": kfac_approx}
    options |= {"inv_update_interval": 2}
    ours, theirs = train_side_by_side(model, twin, cls, fisher_type, options)
    assert [state.name for state in ours.layers] == ["0", "4"]
    for mine, other in zip(ours.layers, theirs.layers, strict=True):
        torch.testing.assert_close(mine.input_factor, other.input_factor)
        torch.testing.assert_close(mine.output_factor, other.output_factor)
    conv = twin[0].conv
    torch.testing.assert_close(explicit_kernel(model[0], model[0].weight), conv.weight)
    if model[0].bias is not None:
        torch.testing.assert_close(model[0].bias, conv.bias)
    torch.testing.assert_close(model[4].weight, twin[4].weight)
    return ours


def hand_factors(model: nn.Sequential, inputs: torch.Tensor, targets: torch.Tensor):
    """The empirical ``(A, G)`` of the first layer (groups = 1) by hand: every patch sliced
    from the expanded input, and per-sample output gradients of the cross-entropy."""
    module = model[0]
    expanded = Expand(module)(inputs)
    k_h, k_w = planar(module, module.kernel_size, 1)
    d_h, d_w = planar(module, module.dilation, 1)
    output = model[0](inputs)
    out_h, out_w = output.shape[2:] if output.ndim == 4 else (1, output.shape[2])
    span_h, span_w = d_h * (k_h - 1) + 1, d_w * (k_w - 1) + 1
    patches = [
        expanded[:, :, row : row + span_h : d_h, column : column + span_w : d_w]
        for row in range(out_h)
        for column in range(out_w)
    ]
    features = torch.stack([patch.reshape(len(inputs), -1) for patch in patches], dim=1)
    if module.bias is not None:
        features = torch.cat([features, torch.ones_like(features[..., :1])], dim=2)
    rows = features.reshape(-1, features.shape[-1])
    input_factor = rows.T @ rows / len(rows)
    layer_output = output.detach().requires_grad_(True)
    losses = functional.cross_entropy(
        nn.Sequential(*list(model)[1:])(layer_output), targets, reduction="sum"
    )
    (grads,) = torch.autograd.grad(losses, layer_output)  # per sample: each loss sees one output
    grad_rows = grads.flatten(2).transpose(1, 2).reshape(-1, module.out_channels)
    return input_factor, grad_rows.T @ grad_rows / len(inputs)


@pytest.mark.parametrize(("layer_type", "geometry"), [CASES[0], CASES[2]])
def test_factors_and_step_equal_the_dense_kronecker_solve(layer_type, geometry) -> None:
    """After one step: the factors are the averages by hand, and the preconditioned gradient is
    ``(G ⊗ A + λI)⁻¹ vec(∇W)`` solved densely, in the explicit matrix layout."""
    model = decoder(layer_type, **geometry)
    inputs, targets = batch(layer_type)
    damping = 0.03
    precond = KFAC(model, damping=damping, inv_update_interval=1)
    model.zero_grad()
    functional.cross_entropy(model(inputs), targets).backward()
    module = model[0]
    raw = explicit_kernel(module, module.weight.grad).reshape(module.out_channels, -1)
    if module.bias is not None:
        raw = torch.cat([raw, module.bias.grad.unsqueeze(1)], dim=1)
    precond.step()
    input_factor, output_factor = hand_factors(model, inputs, targets)
    state = precond.layers[0]
    torch.testing.assert_close(state.input_factor, input_factor)
    torch.testing.assert_close(state.output_factor, output_factor)
    block = torch.kron(output_factor, input_factor)
    damped = block + damping * torch.eye(len(block), dtype=DTYPE)
    expected = torch.linalg.solve(damped, raw.reshape(-1)).reshape(raw.shape)
    actual = explicit_kernel(module, module.weight.grad).reshape(module.out_channels, -1)
    if module.bias is not None:
        actual = torch.cat([actual, module.bias.grad.unsqueeze(1)], dim=1)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("layer_type", [nn.ConvTranspose1d, nn.ConvTranspose2d])
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_one_sample_one_position_step_is_the_exact_natural_gradient(layer_type, cls) -> None:
    """Two input entries per axis, stride 2, padding 2, kernel 3: one output position, whose
    patch holds every input entry at its corners. For one sample and a Gaussian likelihood the
    K-FAC block is the exact Fisher, so the step is ``(F + λI)⁻¹ g``."""
    torch.manual_seed(0)
    model = nn.Sequential(layer_type(4, 6, 3, stride=2, padding=2, groups=2), nn.Flatten())
    model = model.to(DTYPE)
    inputs = torch.randn(1, 4, *((2,) if layer_type is nn.ConvTranspose1d else (2, 2)), dtype=DTYPE)
    targets = torch.randn(1, 6, dtype=DTYPE)
    damping = 0.1
    precond = cls(model, fisher_type="exact", likelihood="gaussian", damping=damping)
    model.zero_grad()
    outputs = model(inputs)
    precond.sample_backward(outputs)
    (0.5 * (outputs - targets).square().sum()).backward()
    gradient = torch.cat([param.grad.reshape(-1) for param in model.parameters()])
    precond.step()
    names = [name for name, _ in model.named_parameters()]
    shapes = [param.shape for param in model.parameters()]
    sizes = [param.numel() for param in model.parameters()]

    def flat_model(theta: torch.Tensor) -> torch.Tensor:
        pieces = theta.split(sizes)
        params = {
            name: piece.reshape(shape)
            for name, piece, shape in zip(names, pieces, shapes, strict=True)
        }
        return functional_call(model, params, (inputs,)).reshape(-1)

    theta = torch.cat([param.detach().reshape(-1) for param in model.parameters()])
    jacobian = jacrev(flat_model)(theta)
    fisher = jacobian.T @ jacobian
    expected = torch.linalg.solve(fisher + damping * torch.eye(len(fisher), dtype=DTYPE), gradient)
    actual = torch.cat([param.grad.reshape(-1) for param in model.parameters()])
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize(
    ("cls", "damping_mode"), [(KFAC, "eigen"), (KFAC, "factored"), (EKFAC, "eigen")]
)
def test_state_round_trip_resumes_identically(cls, damping_mode: str) -> None:
    geometry = {"stride": 2, "padding": 1, "output_padding": 1, "groups": 2}
    model = decoder(nn.ConvTranspose2d, **geometry)
    inputs, targets = batch(nn.ConvTranspose2d)
    options = {"damping": 0.05, "damping_mode": damping_mode, "inv_update_interval": 2}
    precond = cls(model, **options)
    assert [state.name for state in precond.layers] == ["0", "4"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, precond, optimizer, inputs, targets, 3)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), precond.state_dict()))
    train_steps(model, precond, optimizer, inputs, targets, 3)

    resumed = decoder(nn.ConvTranspose2d, seed=5, **geometry)
    resumed.load_state_dict(saved[0])
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    resumed_optimizer.load_state_dict(saved[1])
    resumed_precond = cls(resumed, **options)
    resumed_precond.load_state_dict(saved[2])
    train_steps(resumed, resumed_precond, resumed_optimizer, inputs, targets, 3)
    for expected, actual in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


class ForeignUse(nn.Module):
    """A decoder whose weight is also applied outside the layer's call."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 3, 3, stride=2)
        self.head = nn.Linear(3 * 7 * 9, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.up(inputs) + functional.conv_transpose2d(inputs, self.up.weight, stride=2)
        return self.head(hidden.flatten(1))


def test_a_foreign_use_of_the_weight_is_refused_and_a_clean_decoder_trains() -> None:
    torch.manual_seed(0)
    inputs, targets = batch(nn.ConvTranspose2d)
    foreign = ForeignUse().to(DTYPE)
    precond = KFAC(foreign)
    assert [state.name for state in precond.layers] == ["up", "head"]
    with pytest.raises(ValueError, match="layer 'up'"):
        foreign(inputs)
    model = decoder(nn.ConvTranspose2d, stride=2, groups=2)
    precond = KFAC(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_steps(model, precond, optimizer, inputs, targets, 2)
    assert precond._weights_checked


def test_a_tied_encoder_and_decoder_are_left_out_with_a_warning() -> None:
    """A conv autoencoder whose decoder applies the encoder's weight (the same
    ``(C_out, C_in, k, k)`` tensor): one parameter used by two layers, which no block of one
    layer describes."""
    torch.manual_seed(0)
    encoder = nn.Conv2d(4, 6, 3, stride=2)
    decoder_layer = nn.ConvTranspose2d(6, 4, 3, stride=2)
    decoder_layer.weight = encoder.weight
    model = nn.Sequential(encoder, nn.Tanh(), decoder_layer, nn.Flatten(), nn.LazyLinear(3))
    model = model.to(DTYPE)
    model(torch.zeros(1, 4, 5, 5, dtype=DTYPE))
    with pytest.warns(RuntimeWarning, match="share"):
        precond = KFAC(model)
    assert [state.name for state in precond.layers] == ["4"]


def test_a_call_with_another_output_size_is_refused() -> None:
    """``forward(x, output_size=...)`` pads the output by another amount than the layer's
    ``output_padding``, whose expanded input the factors describe."""
    layer = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)
    precond = KFAC(nn.Sequential(layer))
    inputs = torch.randn(4, 2, 5, 5)
    assert layer(inputs).shape[-1] == 9  # output_padding 0: recorded
    with pytest.raises(ValueError, match=r"layer '0': output of spatial size \(10, 10\)"):
        layer(inputs, output_size=(10, 10))
    precond.remove()
