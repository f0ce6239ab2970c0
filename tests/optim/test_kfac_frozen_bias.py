"""A bias frozen after the preconditioner is built (``layer.bias.requires_grad_(False)``, as a
fine-tuning recipe does for all biases) leaves the layer's weight preconditioned by its own
block: ``G ⊗ A`` with ``A`` of the inputs alone. The layer used to wait for a bias gradient
that never came and passed the weight's gradient through unpreconditioned."""

import copy

import pytest
import torch
from torch import nn

from kfac_training import fisher_options, train_steps
from natgrad.optim import EKFAC, KFAC

LAYERS = ["linear", "conv", "grouped conv"]


def _first_layer(kind: str, bias: bool) -> nn.Module:
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(2 * 5 * 5, 4, bias=bias))
    groups = 2 if kind == "grouped conv" else 1
    return nn.Sequential(nn.Conv2d(2, 4, 3, groups=groups, bias=bias), nn.Flatten())


def _twins(kind: str) -> tuple[nn.Module, nn.Module]:
    """The same network with and without the first layer's bias; the bias is zero."""
    models = []
    for bias in (True, False):
        torch.manual_seed(0)
        first = _first_layer(kind, bias)
        width = 4 if kind == "linear" else 4 * 3 * 3
        models.append(nn.Sequential(first, nn.Tanh(), nn.Linear(width, 3)).double())
    with torch.no_grad():
        models[0][0][-1 if kind == "linear" else 0].bias.zero_()
        for ours, theirs in zip(models[1].parameters(), _without_bias(models[0]), strict=True):
            ours.copy_(theirs)
    return models[0], models[1]


def _first(model: nn.Module) -> nn.Module:
    return next(module for module in model.modules() if isinstance(module, nn.Linear | nn.Conv2d))


def _without_bias(model: nn.Module) -> list[nn.Parameter]:
    bias = _first(model).bias
    return [param for param in model.parameters() if param is not bias]


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(6, 2, 5, 5, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (6,), generator=generator),
        )
        for _ in range(steps)
    ]


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
def test_a_bias_frozen_after_building_gives_the_steps_of_a_bias_free_layer(
    preconditioner, fisher_type: str, kind: str
) -> None:
    """Frozen (at zero) right after building, the layer takes the steps of its bias-free twin,
    statistics of the first step (recorded with the bias column) included."""
    results = []
    for model in _twins(kind):
        precond = preconditioner(model, damping=0.1, **fisher_options(fisher_type, seed=2))
        if _first(model).bias is not None:
            _first(model).bias.requires_grad_(False)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
        for inputs, targets in _batches(3):
            train_steps(model, precond, optimizer, inputs, targets, steps=1)
        results.append(torch.cat([p.detach().flatten() for p in _without_bias(model)]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize("kind", LAYERS)
def test_a_bias_frozen_mid_training_keeps_the_weights_history(kind: str) -> None:
    """Frozen after two steps: ``A`` is the running one without the bias row and column (the
    inputs' history kept), and the weight's gradient is solved with ``G ⊗ A + λI``, against a
    dense float64 solve per group."""
    damping, steps = 0.1, _batches(3)
    runs = []
    for freeze in (False, True):
        model, _ = _twins(kind)
        layer = _first(model)
        precond = KFAC(model, damping=damping, factor_decay=0.5, layers=[layer])
        for index, (inputs, targets) in enumerate(steps):
            if freeze and index == 2:
                layer.bias.requires_grad_(False)
            model.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            gradient = layer.weight.grad.clone()
            precond.step()
        runs.append((precond.layers[0], gradient, layer.weight.grad))
    (with_bias, _, _), (frozen, gradient, preconditioned) = runs
    torch.testing.assert_close(frozen.input_factor, with_bias.input_factor[..., :-1, :-1])
    groups = layer.groups if kind != "linear" else 1
    by_group = gradient.reshape(groups, gradient.shape[0] // groups, -1)
    output_factor = frozen.output_factor.reshape(groups, *by_group.shape[1:2] * 2)
    input_factor = frozen.input_factor.reshape(groups, *by_group.shape[2:] * 2)
    for group in range(groups):
        block = torch.kron(output_factor[group], input_factor[group])
        block += damping * torch.eye(len(block), dtype=torch.float64)
        expected = torch.linalg.solve(block, by_group[group].flatten())
        ours = preconditioned.reshape(by_group.shape)[group].flatten()
        torch.testing.assert_close(ours, expected)


def test_a_bias_unfrozen_after_building_is_named_and_passed_through() -> None:
    """A bias frozen when the preconditioner is built has no row in ``A``: once it has a
    gradient it is left as it is (with a warning), and the weight is preconditioned as a
    bias-free layer's."""
    with_bias, without_bias = _twins("linear")
    layer = _first(with_bias)
    layer.bias.requires_grad_(False)
    precond = KFAC(with_bias, damping=0.1)
    twin_precond = KFAC(without_bias, damping=0.1)
    layer.bias.requires_grad_(True)
    (inputs, targets), *_ = _batches(1)
    for model in (with_bias, without_bias):
        nn.functional.cross_entropy(model(inputs), targets).backward()
    bias_gradient = layer.bias.grad.clone()
    with pytest.warns(RuntimeWarning, match=r"biases of layers \['0.1'\] have gradients"):
        precond.step()
    twin_precond.step()
    torch.testing.assert_close(layer.bias.grad, bias_gradient, rtol=0, atol=0)
    for ours, theirs in zip(_without_bias(with_bias), without_bias.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0)


@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
def test_the_state_of_a_layer_without_its_bias_loads_only_where_it_fits(preconditioner) -> None:
    """Saved after the bias was frozen, the state loads into a preconditioner built with the
    bias frozen (and resumes identically), and is refused, naming the layer and leaving the
    preconditioner as it was, by one built with the bias trainable: it used to load silently
    and fail at the next step with a broadcasting error."""
    model, _ = _twins("linear")
    precond = preconditioner(model, damping=0.1)
    _first(model).bias.requires_grad_(False)
    batches = _batches(3)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    train_steps(model, precond, optimizer, *batches[0], steps=1)
    saved = precond.state_dict()

    trainable_bias, _ = _twins("linear")
    unfitting = preconditioner(trainable_bias, damping=0.1)
    before = unfitting.state_dict()
    with pytest.raises(ValueError, match=r"layer '0.1': the saved input_factor has shape"):
        unfitting.load_state_dict(saved)
    assert unfitting.state_dict()["steps"] == before["steps"]

    twin = copy.deepcopy(model)
    resumed = preconditioner(twin, damping=0.1)
    resumed.load_state_dict(saved)
    twin_optimizer = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.2)
    train_steps(model, precond, optimizer, *batches[1], steps=2)
    train_steps(twin, resumed, twin_optimizer, *batches[1], steps=2)
    for ours, theirs in zip(twin.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
