"""K-FAC/EKFAC on a layer called several times in one forward pass (weight sharing across
calls): the calls' locations are pooled as one sample's.

Oracles:

- a siamese network, one Linear applied to each of a sample's two inputs, is the same function
  as that Linear applied once to the ``(N, 2, d)`` stack of them, which K-FAC treats as a layer
  with two locations per sample: trained side by side, factors, EKFAC eigenvalues and parameters
  agree;
- an unrolled cell, ``lin(tanh(lin(x)))``: its factors against brute force (autograd output
  gradients of each call) and its EKFAC eigenvalues against per-sample weight gradients from
  ``torch.func``;
- a depthwise convolution called twice against the same network with one ordinary
  convolution per group (:func:`grouped_conv.split_twin`), called twice too;
- gradient accumulation: two micro-batches of the siamese network equal one batch.
"""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from grouped_conv import SplitConv
from kfac_training import fisher_options, train_steps
from natgrad.optim import EKFAC, KFAC

DTYPE = torch.float64


class Siamese(nn.Module):
    """``head(tanh(lin(x₁)) + tanh(lin(x₂)))`` for inputs ``(N, 2, d)``: ``lin`` called twice
    (``stacked=False``), or once on the stack (``stacked=True``, the oracle)."""

    def __init__(self, features: int = 3, hidden: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(features, hidden)
        self.head = nn.Linear(hidden, classes)
        self.stacked = False

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.stacked:
            hidden = torch.tanh(self.lin(inputs)).sum(1)
        else:
            hidden = torch.tanh(self.lin(inputs[:, 0])) + torch.tanh(self.lin(inputs[:, 1]))
        return self.head(hidden)


def siamese_pair(seed: int = 0) -> tuple[Siamese, Siamese]:
    torch.manual_seed(seed)
    model = Siamese().to(DTYPE)
    twin = copy.deepcopy(model)
    twin.stacked = True
    return model, twin


def siamese_batch(samples: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 2, 3, generator=generator, dtype=DTYPE)
    return inputs, torch.randint(0, 3, (samples,), generator=generator)


def train_pair(model, twin, cls, fisher_type, steps=3, twin_options=None, **options):
    """Train both with SGD-momentum under ``cls``; the two preconditioners."""
    preconds = []
    for network, extra in ((model, {}), (twin, twin_options or {})):
        precond = cls(network, **fisher_options(fisher_type, 0), **(options | extra))
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
        train_steps(network, precond, optimizer, *siamese_batch(), steps)
        preconds.append(precond)
    return preconds


def assert_states_agree(state, twin_state) -> None:
    torch.testing.assert_close(state.input_factor, twin_state.input_factor)
    torch.testing.assert_close(state.output_factor, twin_state.output_factor)
    if state.eigenvalues is not None or twin_state.eigenvalues is not None:
        torch.testing.assert_close(state.eigenvalues, twin_state.eigenvalues)


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
@pytest.mark.parametrize(
    ("cls", "mode"),
    [
        pytest.param(KFAC, {"damping_mode": "eigen"}, id="kfac-eigen"),
        pytest.param(KFAC, {"damping_mode": "factored"}, id="kfac-factored"),
        pytest.param(EKFAC, {}, id="ekfac"),
    ],
)
def test_calls_pool_like_locations_of_one_call(cls, mode: dict, fisher_type: str) -> None:
    model, twin = siamese_pair()
    options = {"inv_update_interval": 1, "damping": 0.1, "factor_decay": 0.5} | mode
    precond, twin_precond = train_pair(model, twin, cls, fisher_type, **options)
    for state, twin_state in zip(precond.layers, twin_precond.layers, strict=True):
        assert_states_agree(state, twin_state)
    for param, twin_param in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(param, twin_param)


def test_reduce_reduces_within_each_call_and_pools_the_calls() -> None:
    """Each call of ``lin`` has one location, so reduce leaves it alone, and the two calls
    pool as expand pools the stack's two locations (reducing the stack would average them)."""
    model, twin = siamese_pair()
    options = {"inv_update_interval": 1, "damping": 0.1}
    precond, twin_precond = train_pair(
        model,
        twin,
        KFAC,
        "empirical",
        twin_options={"kfac_approx": "expand"},
        kfac_approx="reduce",
        **options,
    )
    assert_states_agree(precond.layers[0], twin_precond.layers[0])
    torch.testing.assert_close(model.lin.weight, twin.lin.weight)
    _, reduced_twin = siamese_pair()
    reduced = train_pair(model, reduced_twin, KFAC, "empirical", kfac_approx="reduce", **options)
    assert not torch.allclose(reduced[0].layers[0].input_factor, reduced[1].layers[0].input_factor)


def test_accumulated_micro_batches_of_repeated_calls_equal_one_batch() -> None:
    model, _ = siamese_pair()
    reference = copy.deepcopy(model)
    inputs, targets = siamese_batch(8)
    options = {"inv_update_interval": 1, "damping": 0.1}
    precond = KFAC(reference, **options)
    nn.functional.cross_entropy(reference(inputs), targets).backward()
    precond.step()

    accumulating = KFAC(model, **options, accumulation_steps=2)
    for half in (slice(0, 4), slice(4, 8)):
        (nn.functional.cross_entropy(model(inputs[half]), targets[half]) / 2).backward()
    accumulating.step()
    for state, reference_state in zip(accumulating.layers, precond.layers, strict=True):
        assert_states_agree(state, reference_state)
    for param, reference_param in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param.grad, reference_param.grad)


class Unrolled(nn.Module):
    """``head(tanh(cell(tanh(cell(x)))))``: the cell called twice, the second call on the
    first's output."""

    def __init__(self, width: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.cell = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.cell(torch.tanh(self.cell(inputs)))))


def unrolled_calls(model: Unrolled, inputs: torch.Tensor, targets: torch.Tensor):
    """The cell's input features ``[a, 1]`` of each call, ``(N, 2, d + 1)``, and the per-sample
    output gradients of the mean loss, ``N ∂L/∂o`` of each call, ``(N, 2, d)``."""
    cell = model.cell
    first = cell(inputs)
    hidden = torch.tanh(first)
    second = cell(hidden)
    loss = nn.functional.cross_entropy(model.head(torch.tanh(second)), targets)
    grads = torch.autograd.grad(loss, [first, second])
    ones = torch.ones(len(inputs), 1, dtype=DTYPE)
    features = torch.stack([torch.cat([inputs, ones], 1), torch.cat([hidden, ones], 1)], 1)
    return features.detach(), torch.stack(grads, 1) * len(inputs)


def test_unrolled_cell_factors_against_brute_force() -> None:
    torch.manual_seed(1)
    model = Unrolled().to(DTYPE)
    inputs = torch.randn(7, 3, dtype=DTYPE)
    targets = torch.randint(0, 3, (7,))
    features, grads = unrolled_calls(model, inputs, targets)
    precond = KFAC(model, inv_update_interval=1, damping=0.1)
    nn.functional.cross_entropy(model(inputs), targets).backward()
    precond.step()
    state = precond.layers[0]
    rows, grad_rows = features.reshape(-1, 4), grads.reshape(-1, 3)
    torch.testing.assert_close(state.input_factor, rows.T @ rows / 14)
    torch.testing.assert_close(state.output_factor, grad_rows.T @ grad_rows / 7)


def test_unrolled_cell_ekfac_eigenvalues_from_per_sample_gradients() -> None:
    """EKFAC's eigenvalues are the mean over samples of the squared eigenbasis coordinates of
    each sample's gradient, which sums both calls' contributions (from ``torch.func``)."""
    torch.manual_seed(2)
    model = Unrolled().to(DTYPE)
    inputs = torch.randn(7, 3, dtype=DTYPE)
    targets = torch.randint(0, 3, (7,))
    params = {name: param.detach() for name, param in model.named_parameters()}

    def sample_loss(values, sample, target):
        logits = functional_call(model, values, (sample.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, target.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    gradients = torch.cat([per_sample["cell.weight"], per_sample["cell.bias"].unsqueeze(-1)], -1)
    precond = EKFAC(model, inv_update_interval=1, damping=0.1, eigenvalue_restart="batch")
    nn.functional.cross_entropy(model(inputs), targets).backward()
    precond.step()
    state = precond.layers[0]
    coordinates = state.output_eigen.vectors.T @ gradients @ state.input_eigen.vectors
    torch.testing.assert_close(state.eigenvalues, coordinates.square().mean(0))


class TwiceConv(nn.Module):
    """``conv(tanh(conv(x)))`` (channels in = channels out), then a linear head."""

    def __init__(self, conv: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.head = head

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.conv(torch.tanh(self.conv(inputs))))
        return self.head(hidden.flatten(1))


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_grouped_conv_called_twice_matches_one_conv_per_group(cls, kfac_approx: str) -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=2).to(DTYPE)
    model = TwiceConv(conv, nn.Linear(4 * 16, 3).to(DTYPE))
    twin = TwiceConv(SplitConv(conv), copy.deepcopy(model.head))
    generator = torch.Generator().manual_seed(3)
    # more samples than a group's 19 input features: a singular reduce A would leave EKFAC's
    # eigenvalues in its null space to the eigensolver
    inputs = torch.randn(24, 4, 4, 4, generator=generator, dtype=DTYPE)
    targets = torch.randint(0, 3, (24,), generator=generator)
    options = {"inv_update_interval": 1, "damping": 0.1, "kfac_approx": kfac_approx}
    preconds = []
    for network in (model, twin):
        precond = cls(network, **options)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
        train_steps(network, precond, optimizer, inputs, targets, 3)
        preconds.append(precond)
    grouped = preconds[0].layers[0]
    for group, state in enumerate(preconds[1].layers[:-1]):
        torch.testing.assert_close(grouped.input_factor[group], state.input_factor)
        torch.testing.assert_close(grouped.output_factor[group], state.output_factor)
        if cls is EKFAC:
            torch.testing.assert_close(grouped.eigenvalues[group], state.eigenvalues)
    split_weight = torch.cat([part.weight for part in twin.conv.parts])
    torch.testing.assert_close(model.conv.weight, split_weight)
