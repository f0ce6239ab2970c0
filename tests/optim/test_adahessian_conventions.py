"""AdaHessian at its boundaries: complex gradients, Hutchinson arguments, reduction to AdamW."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import natgrad.optim.adahessian as adahessian_module
from natgrad.optim import AdaHessian
from natgrad.optim.adahessian import hutchinson_diagonal

pytestmark = [
    pytest.mark.usefixtures("float64_default"),
    pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning"),
]


def test_complex_gradients_are_refused_by_name() -> None:
    param = nn.Parameter(torch.tensor([1.0 + 1.0j, -0.5j], dtype=torch.complex128))
    optimizer = AdaHessian([param])
    (param.abs() ** 4).sum().backward(create_graph=True)
    with pytest.raises(TypeError, match=r"AdaHessian supports real .* torch\.complex128"):
        optimizer.step()
    assert torch.equal(param.detach(), torch.tensor([1.0 + 1.0j, -0.5j]))
    assert len(optimizer.state[param]) == 0


def _cubic_gradient() -> tuple[torch.Tensor, torch.Tensor]:
    param = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    (grad,) = torch.autograd.grad((param**3).sum(), [param], create_graph=True)
    return grad, param


@pytest.mark.parametrize(("n_samples", "error"), [(0, ValueError), (1.0, TypeError)])
def test_hutchinson_refuses_a_bad_sample_count(n_samples, error: type) -> None:
    """0 samples would be a 0/0 (NaN) estimate."""
    grad, param = _cubic_gradient()
    with pytest.raises(error, match="n_samples"):
        hutchinson_diagonal([grad], [param], n_samples=n_samples)


def test_hutchinson_refuses_mismatched_lengths() -> None:
    grad, param = _cubic_gradient()
    with pytest.raises(ValueError, match="1 gradients for 2 parameters"):
        hutchinson_diagonal([grad], [param, torch.zeros(2, requires_grad=True)])


def test_gradient_as_hessian_diagonal_is_adamw(monkeypatch: pytest.MonkeyPatch) -> None:
    """With D := g and power 1, m̂ / (√v̂ + eps) is Adam's step, and the decay is AdamW's."""
    monkeypatch.setattr(
        adahessian_module,
        "hutchinson_diagonal",
        lambda grads, params, n_samples, generator: [g.detach().clone() for g in grads],
    )
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(8, 3, generator=generator), torch.randn(8, 1, generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    twin = copy.deepcopy(model)
    options = {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.1}
    adahessian = AdaHessian(model.parameters(), **options)
    adamw = torch.optim.AdamW(twin.parameters(), **options)
    for _ in range(5):
        for net, optimizer in ((model, adahessian), (twin, adamw)):
            optimizer.zero_grad()
            nn.functional.mse_loss(net(inputs), targets).backward(create_graph=True)
            optimizer.step()
    for param, expected in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(param, expected, rtol=1e-12, atol=1e-14)


def _train(model: nn.Module, optimizer: AdaHessian, inputs, targets, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward(create_graph=True)
        optimizer.step()


def test_deepcopied_model_and_optimizer_continue_identically() -> None:
    """``copy.deepcopy((model, optimizer))`` keeps the generator (with its state), the sample
    count and ``update_each``: the copy continues exactly as the original."""
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(8, 3, generator=generator), torch.randn(8, 1, generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    optimizer = AdaHessian(
        model.parameters(), lr=0.05, n_samples=2, update_each=2, generator=torch.Generator()
    )
    optimizer.generator.manual_seed(7)
    _train(model, optimizer, inputs, targets, steps=1)
    optimizer.zero_grad()
    copied_model, copied_optimizer = copy.deepcopy((model, optimizer))
    assert (copied_optimizer.n_samples, copied_optimizer.update_each) == (2, 2)
    _train(model, optimizer, inputs, targets, steps=3)
    _train(copied_model, copied_optimizer, inputs, targets, steps=3)
    for param, copied in zip(model.parameters(), copied_model.parameters(), strict=True):
        assert torch.equal(param, copied)
