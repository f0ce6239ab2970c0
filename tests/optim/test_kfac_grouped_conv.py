"""K-FAC/EKFAC on grouped convolutions (depthwise included): one Kronecker block per group.

The oracle is the same network with the grouped convolution replaced by ``g`` ordinary
convolutions, one per group, applied to the group's input channels and concatenated: the same
function, whose ungrouped layers K-FAC already handles (and other tests check against curvlinops
and brute force). Trained side by side, the grouped layer's factors for group ``j`` and its
preconditioned gradient rows must equal those of the ``j``-th ordinary convolution; the patches
are also checked against ``functional.unfold`` of each group's channels.
"""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from grouped_conv import split_twin
from kfac_training import fisher_options, train_steps
from natgrad.optim import EKFAC, KFAC

DTYPE = torch.float64


def grouped_net(
    conv_type: type, channels: int, groups: int, bias: bool, size: int, **geometry
) -> nn.Sequential:
    conv = conv_type(channels, 2 * channels, 3, groups=groups, bias=bias, **geometry)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).to(DTYPE)
    model(torch.zeros(1, channels, *(size,) * (1 if conv_type is nn.Conv1d else 2), dtype=DTYPE))
    return model


def train_side_by_side(
    model, twin, inputs, targets, cls=KFAC, fisher_type="empirical", steps=3, **options
):
    """Train both with SGD-momentum under ``cls`` (a Monte-Carlo Fisher sampled with the same
    seed for both); the two preconditioners."""
    preconds = []
    for network in (model, twin):
        precond = cls(network, **fisher_options(fisher_type, 0), **options)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
        train_steps(network, precond, optimizer, inputs, targets, steps)
        preconds.append(precond)
    return preconds


def assert_twins_agree(model, twin, grouped_state, part_states) -> None:
    """Factors per group, and the parameters after training, equal the twin's."""
    for group, state in enumerate(part_states):
        torch.testing.assert_close(grouped_state.input_factor[group], state.input_factor)
        torch.testing.assert_close(grouped_state.output_factor[group], state.output_factor)
    conv, parts = model[0], twin[0].parts
    torch.testing.assert_close(conv.weight, torch.cat([part.weight for part in parts]))
    if conv.bias is not None:
        torch.testing.assert_close(conv.bias, torch.cat([part.bias for part in parts]))
    torch.testing.assert_close(model[3].weight, twin[3].weight)


def batch(channels: int, size: int, conv_type: type = nn.Conv2d, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    spatial = (size,) * (1 if conv_type is nn.Conv1d else 2)
    inputs = torch.randn(5, channels, *spatial, generator=generator, dtype=DTYPE)
    return inputs, torch.randint(0, 3, (5,), generator=generator)


CASES = [
    pytest.param(nn.Conv2d, 4, 2, True, {}, id="conv2d-groups2"),
    pytest.param(nn.Conv2d, 3, 3, False, {"stride": 2, "padding": 1}, id="depthwise-strided"),
    pytest.param(
        nn.Conv1d, 4, 4, True, {"padding": 2, "dilation": 2, "padding_mode": "reflect"}, id="1d"
    ),
]


@pytest.mark.parametrize(("conv_type", "channels", "groups", "bias", "geometry"), CASES)
@pytest.mark.parametrize(
    ("damping_mode", "kfac_approx"),
    [("eigen", "expand"), ("factored", "expand"), ("eigen", "reduce"), ("factored", "reduce")],
)
def test_a_grouped_conv_is_its_groups_as_separate_layers(
    conv_type, channels, groups, bias, geometry, damping_mode, kfac_approx
) -> None:
    torch.manual_seed(0)
    model = grouped_net(conv_type, channels, groups, bias, 6, **geometry)
    twin = split_twin(model)
    inputs, targets = batch(channels, 6, conv_type)
    grouped, split = train_side_by_side(
        model,
        twin,
        inputs,
        targets,
        damping=0.1,
        damping_mode=damping_mode,
        kfac_approx=kfac_approx,
        factor_decay=0.5,
        inv_update_interval=2,
        kl_clip=0.01,
        lr=0.1,
    )
    assert [type(state).__name__ for state in grouped.layers] == [
        "GroupedConvState",
        "KroneckerLayerState",
    ]
    assert_twins_agree(model, twin, grouped.layers[0], split.layers[:groups])


@pytest.mark.parametrize(
    ("fisher_type", "kfac_approx"), [("empirical", "expand"), ("mc", "expand"), ("mc", "reduce")]
)
def test_ekfac_on_a_grouped_conv_is_its_groups_as_separate_layers(
    fisher_type: str, kfac_approx: str
) -> None:
    torch.manual_seed(1)
    model = grouped_net(nn.Conv2d, 4, 2, True, 5, padding=1)
    twin = split_twin(model)
    inputs, targets = batch(4, 5)
    grouped, split = train_side_by_side(
        model,
        twin,
        inputs,
        targets,
        cls=EKFAC,
        damping=0.1,
        factor_decay=0.5,
        inv_update_interval=2,
        factor_update_interval=1,
        fisher_type=fisher_type,
        kfac_approx=kfac_approx,
    )
    assert_twins_agree(model, twin, grouped.layers[0], split.layers[:2])
    for group, state in enumerate(split.layers[:2]):
        torch.testing.assert_close(grouped.layers[0].eigenvalues[group], state.eigenvalues)


@settings(max_examples=12, deadline=None)
@given(
    groups=st.integers(1, 3),
    per_group=st.integers(1, 2),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    bias=st.booleans(),
)
def test_grouped_conv_factors_equal_unfold_of_each_group(
    groups: int, per_group: int, kernel: int, stride: int, padding: int, bias: bool
) -> None:
    """``A_j`` from ``functional.unfold`` of group ``j``'s input channels (ones appended for a
    bias), ``G_j`` from group ``j``'s output gradients; one recorded batch."""
    channels = groups * per_group
    conv = nn.Conv2d(channels, 2 * groups, kernel, stride, padding, groups=groups, bias=bias)
    model = nn.Sequential(conv.to(DTYPE), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3).to(DTYPE))
    inputs, targets = batch(channels, 4)
    model(inputs)
    precond = KFAC(model, factor_decay=0.0, damping=0.1)
    outputs = model[0](inputs)
    outputs.retain_grad()
    nn.functional.cross_entropy(model[1:](outputs), targets).backward()
    precond.step()
    precond.remove()
    state = precond.layers[0]  # groups = 1: an ordinary convolution's factors, (d, d)
    input_factors = state.input_factor.reshape(groups, *state.input_factor.shape[-2:])
    output_factors = state.output_factor.reshape(groups, 2, 2)
    for group in range(groups):
        channel_slice = inputs[:, group * per_group : (group + 1) * per_group]
        patches = nn.functional.unfold(channel_slice, kernel, padding=padding, stride=stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        if bias:
            rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=DTYPE)], dim=1)
        torch.testing.assert_close(input_factors[group], rows.T @ rows / len(rows))
        grads = outputs.grad[:, 2 * group : 2 * group + 2] * len(inputs)
        grads = grads.flatten(2).transpose(1, 2).reshape(-1, 2)
        torch.testing.assert_close(output_factors[group], grads.T @ grads / len(inputs))


@pytest.mark.parametrize("damping_mode", ["eigen", "factored"])
def test_grouped_conv_state_round_trip_resumes_identically(damping_mode: str) -> None:
    torch.manual_seed(2)
    model = grouped_net(nn.Conv2d, 4, 4, True, 5)
    inputs, targets = batch(4, 5)
    options = {"damping": 0.05, "damping_mode": damping_mode, "inv_update_interval": 2}
    precond = KFAC(model, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, precond, optimizer, inputs, targets, 3)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), precond.state_dict()))
    train_steps(model, precond, optimizer, inputs, targets, 3)

    resumed = grouped_net(nn.Conv2d, 4, 4, True, 5)
    resumed.load_state_dict(saved[0])
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    resumed_optimizer.load_state_dict(saved[1])
    resumed_precond = KFAC(resumed, **options)
    resumed_precond.load_state_dict(saved[2])
    train_steps(resumed, resumed_precond, resumed_optimizer, inputs, targets, 3)
    for expected, actual in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_adaptive_damping_on_a_grouped_conv_matches_the_split_twin() -> None:
    """The Levenberg–Marquardt rule's predicted change (linear and quadratic terms over all
    groups) equals the twin's, so the adapted damping does too."""
    torch.manual_seed(3)
    model = grouped_net(nn.Conv2d, 4, 2, True, 5)
    twin = split_twin(model)
    inputs, targets = batch(4, 5)
    dampings = []
    for network in (model, twin):
        precond = KFAC(network, damping=0.1, adaptive_damping=True, damping_adaptation_interval=1)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.5)
        for _ in range(3):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(network(inputs), targets)
            loss.backward()
            precond.step()
            optimizer.step()
            with torch.no_grad():
                precond.update_damping(loss, nn.functional.cross_entropy(network(inputs), targets))
        dampings.append(precond.damping)
    assert dampings[0] == pytest.approx(dampings[1], rel=1e-10)
    assert dampings[0] != 0.1
