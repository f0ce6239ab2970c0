"""NaturalGradient steps against a float64 oracle built from torch.func per-sample Jacobians,
and its handling of parameters frozen, unfrozen or added after construction."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from natgrad.optim import NaturalGradient

pytestmark = pytest.mark.usefixtures("float64_default")

LossFn = Callable[[Tensor, Tensor], Tensor]


def _data(n: int = 7) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def _net(outputs: int = 3) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, outputs))


def _flat(model: nn.Module) -> Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def _jacobians(model: nn.Module, inputs: Tensor) -> Tensor:
    """Per-sample output Jacobians ``(N, C, P)`` over the trainable parameters."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def output(values: dict[str, Tensor], sample: Tensor) -> Tensor:
        return functional_call(model, values, (sample.unsqueeze(0),)).reshape(-1)

    jacobians = vmap(jacrev(output), in_dims=(None, 0))(params, inputs)
    return torch.cat([jacobians[name].flatten(2) for name in params], dim=-1)


def _categorical_fisher(model: nn.Module, inputs: Tensor, kind: str, labels: Tensor) -> Tensor:
    """``1/N Σₙ Jₙᵀ Bₙ Jₙ``: ``Bₙ = diag(p) − ppᵀ`` (exact) or ``gₙgₙᵀ`` (empirical)."""
    probs = model(inputs).detach().softmax(-1)
    if kind == "exact":
        middle = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
    else:
        residual = probs - nn.functional.one_hot(labels, probs.shape[-1])
        middle = residual.unsqueeze(-1) * residual.unsqueeze(-2)
    jacobians = _jacobians(model, inputs)
    return torch.einsum("ncp,ncd,ndq->pq", jacobians, middle, jacobians) / len(inputs)


def _structured(matrix: Tensor, structure: str, blocks: list[int]) -> Tensor:
    """``matrix`` reduced to its diagonal, or to its diagonal blocks of sizes ``blocks``."""
    if structure == "diag":
        return torch.diag(matrix.diagonal())
    if structure == "block":
        ends = list(itertools.accumulate(blocks))
        starts = [0, *ends[:-1]]
        return torch.block_diag(*(matrix[a:b, a:b] for a, b in zip(starts, ends, strict=True)))
    return matrix


def _numels(model: nn.Module) -> list[int]:
    return [p.numel() for p in model.parameters()]


def _gradient(model: nn.Module, loss: Tensor) -> Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _step(opt: NaturalGradient, model: nn.Module, loss_fn: LossFn, inputs, observed, **kwargs):
    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn(model(inputs), observed)
        loss.backward()
        return loss

    opt.step(closure, **kwargs)


@pytest.mark.parametrize("structure", ["dense", "diag", "block", "implicit"])
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_step_equals_the_damped_solve_with_the_jacobian_fisher(kind: str, structure: str) -> None:
    inputs, labels = _data()
    model, reference = _net(), _net()
    before = _flat(model)
    opt = NaturalGradient(
        model, "categorical", lr=0.3, kind=kind, structure=structure, damping=0.05
    )
    targets = labels if kind == "empirical" else None
    _step(opt, model, nn.functional.cross_entropy, inputs, labels, targets=targets)
    gradient = _gradient(reference, nn.functional.cross_entropy(reference(inputs), labels))
    matrix = _structured(
        _categorical_fisher(reference, inputs, kind, labels), structure, _numels(reference)
    )
    direction = torch.linalg.solve(matrix + 0.05 * torch.eye(len(gradient)), gradient)
    torch.testing.assert_close(_flat(model), before - 0.3 * direction, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_kronecker_step_of_a_deep_linear_net_on_one_sample_is_the_block_step(
    structure: str,
) -> None:
    """With a unit-variance Gaussian likelihood and a batch of one, each layer's Fisher block
    (weight and bias together) of a deep linear network is exactly ``ã ãᵀ ⊗ Gᵀ G``: K-FAC is
    the layer-block-diagonal Fisher."""
    inputs = torch.randn(1, 3, generator=torch.Generator().manual_seed(2))
    targets = torch.randn(1, 2, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    reference = copy.deepcopy(model)
    before = _flat(model)

    def loss_fn(outputs: Tensor, observed: Tensor) -> Tensor:
        return 0.5 * (outputs - observed).pow(2).sum(-1).mean()

    opt = NaturalGradient(model, "gaussian", lr=0.5, structure=structure, damping=0.1)
    _step(opt, model, loss_fn, inputs, targets)
    jacobians = _jacobians(reference, inputs)
    layers = [sum(_numels(layer)) for layer in reference]
    fisher = _structured(jacobians[0].T @ jacobians[0], "block", layers)
    gradient = _gradient(reference, loss_fn(reference(inputs), targets))
    direction = torch.linalg.solve(fisher + 0.1 * torch.eye(len(gradient)), gradient)
    torch.testing.assert_close(_flat(model), before - 0.5 * direction, rtol=1e-7, atol=1e-9)


def test_monte_carlo_step_uses_the_generator_draws() -> None:
    """Gaussian likelihood: ``∇_f nll = f − y = −ε`` with ``ε`` the generator's normal draws (one
    ``(N, C)`` draw per Monte-Carlo sample, in turn), so ``F = 1/(NM) Σ Jᵀ ε εᵀ J``."""
    inputs, _ = _data()
    targets = torch.randn(7, 2, generator=torch.Generator().manual_seed(5))
    model, reference = _net(2), _net(2)
    before = _flat(model)

    def loss_fn(outputs: Tensor, observed: Tensor) -> Tensor:
        return 0.5 * (outputs - observed).pow(2).sum(-1).mean()

    generator = torch.Generator().manual_seed(6)
    opt = NaturalGradient(
        model, "gaussian", lr=0.4, kind="mc", mc_samples=2, damping=0.05, generator=generator
    )
    _step(opt, model, loss_fn, inputs, targets)
    draws = torch.Generator().manual_seed(6)
    noise = torch.stack([torch.randn(7, 2, generator=draws) for _ in range(2)], dim=-1)
    jacobians = _jacobians(reference, inputs)
    rows = torch.einsum("nck,ncp->nkp", noise, jacobians).flatten(0, 1)
    fisher = rows.T @ rows / (7 * 2)
    gradient = _gradient(reference, loss_fn(reference(inputs), targets))
    direction = torch.linalg.solve(fisher + 0.05 * torch.eye(len(gradient)), gradient)
    torch.testing.assert_close(_flat(model), before - 0.4 * direction, rtol=1e-7, atol=1e-9)


def test_max_kl_takes_the_natural_step_scaled_to_the_bound() -> None:
    inputs, labels = _data()
    model, reference = _net(), _net()
    before = _flat(model)
    opt = NaturalGradient(model, "categorical", structure="implicit", damping=0.05, max_kl=1e-4)
    _step(opt, model, nn.functional.cross_entropy, inputs, labels)
    fisher = _categorical_fisher(reference, inputs, "exact", labels)
    gradient = _gradient(reference, nn.functional.cross_entropy(reference(inputs), labels))
    natural = torch.linalg.solve(fisher + 0.05 * torch.eye(len(gradient)), gradient)
    scale = (1e-4 / (0.5 * natural @ fisher @ natural)).sqrt()
    assert scale < 1
    torch.testing.assert_close(_flat(model), before - scale * natural, rtol=1e-7, atol=1e-9)


def test_a_parameter_unfrozen_into_a_new_group_steps_in_the_fisher_order() -> None:
    """The group added last holds the model's first parameter: the update must still be laid
    out in ``model.parameters()`` order (the Fisher's), with that group's ``lr``."""
    inputs, labels = _data()
    model, reference = _net(), _net()
    model[0].weight.requires_grad_(False)
    opt = NaturalGradient(model, "categorical", lr=0.5, damping=0.1)
    model[0].weight.requires_grad_(True)
    opt.add_param_group({"params": model[0].weight, "lr": 0.2})
    before = _flat(model)
    _step(opt, model, nn.functional.cross_entropy, inputs, labels)
    fisher = _categorical_fisher(reference, inputs, "exact", labels)
    gradient = _gradient(reference, nn.functional.cross_entropy(reference(inputs), labels))
    direction = torch.linalg.solve(fisher + 0.1 * torch.eye(len(gradient)), gradient)
    lrs = torch.full_like(direction, 0.5)
    lrs[: model[0].weight.numel()] = 0.2
    torch.testing.assert_close(_flat(model), before - lrs * direction, rtol=1e-7, atol=1e-9)


def test_a_parameter_frozen_after_construction_is_left_alone() -> None:
    inputs, labels = _data()
    model, reference = _net(), _net()
    opt = NaturalGradient(model, "categorical", lr=0.5, damping=0.1)
    model[0].weight.requires_grad_(False)
    reference[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    _step(opt, model, nn.functional.cross_entropy, inputs, labels)
    fisher = _categorical_fisher(reference, inputs, "exact", labels)
    gradient = _gradient(reference, nn.functional.cross_entropy(reference(inputs), labels))
    direction = torch.linalg.solve(fisher + 0.1 * torch.eye(len(gradient)), gradient)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(after, before - 0.5 * direction, rtol=1e-7, atol=1e-9)
    assert torch.equal(model[0].weight, frozen)


def test_a_trainable_parameter_in_no_group_raises() -> None:
    inputs, labels = _data()
    model = _net()
    model[0].weight.requires_grad_(False)
    opt = NaturalGradient(model, "categorical")
    model[0].weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"\['0\.weight'\].*add_param_group"):
        _step(opt, model, nn.functional.cross_entropy, inputs, labels)


def test_add_param_group_refuses_foreign_parameters_and_bad_options() -> None:
    model = _net()
    model[0].weight.requires_grad_(False)
    opt = NaturalGradient(model, "categorical")
    with pytest.raises(ValueError, match=r"\(2, 5\).*not in model\.parameters\(\)"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 5))]})
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [model[0].weight], "lr": -1.0})
    with pytest.raises(TypeError, match=r"^max_kl must be"):
        opt.add_param_group({"params": [model[0].weight], "max_kl": "0.1"})
    assert len(opt.param_groups) == 1


def test_monte_carlo_state_dict_round_trip_resumes_with_the_same_draws() -> None:
    """Small steps keep the class probabilities away from 0 and 1, so the draws matter."""
    inputs, labels = _data()
    model = _net()
    options = {"lr": 0.1, "damping": 0.1, "kind": "mc"}
    generator = torch.Generator().manual_seed(0)
    opt = NaturalGradient(model, "categorical", generator=generator, **options)
    _step(opt, model, nn.functional.cross_entropy, inputs, labels)
    twin = copy.deepcopy(model)
    other = torch.Generator().manual_seed(99)
    twin_opt = NaturalGradient(twin, "categorical", generator=other, **options)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(2):
        _step(opt, model, nn.functional.cross_entropy, inputs, labels)
        _step(twin_opt, twin, nn.functional.cross_entropy, inputs, labels)
    assert torch.equal(_flat(model), _flat(twin))


@pytest.mark.parametrize(
    ("model", "kwargs", "name"),
    [
        ([nn.Parameter(torch.ones(2))], {}, "model"),
        (nn.Linear(2, 1), {"adaptive_damping": "yes"}, "adaptive_damping"),
        (nn.Linear(2, 1), {"generator": 0}, "generator"),
    ],
)
def test_arguments_of_the_wrong_type_raise_at_construction(model, kwargs: dict, name: str) -> None:
    with pytest.raises(TypeError, match=rf"^{name} must be"):
        NaturalGradient(model, "gaussian", kind="mc", **kwargs)


@pytest.mark.parametrize(("adaptive_damping", "calls"), [(False, 1), (True, 2)])
def test_the_closure_runs_once_plus_once_for_adaptive_damping(
    adaptive_damping: bool, calls: int
) -> None:
    inputs, labels = _data()
    model = _net()
    opt = NaturalGradient(model, "categorical", adaptive_damping=adaptive_damping)
    count = []

    def closure() -> Tensor:
        count.append(1)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss

    opt.step(closure)
    assert len(count) == calls


def test_a_non_finite_loss_after_an_adaptive_step_undoes_it() -> None:
    inputs, labels = _data()
    model = _net()
    before = _flat(model)
    opt = NaturalGradient(model, "categorical", damping=0.1, adaptive_damping=True)
    calls = []

    def closure() -> Tensor:
        calls.append(1)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss = loss * float("nan") if len(calls) == 2 else loss
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="after the step is not finite"):
        opt.step(closure)
    assert torch.equal(_flat(model), before)
    assert opt.counters["refused_steps"] == 1
    assert opt.param_groups[0]["damping"] == pytest.approx(0.15)
