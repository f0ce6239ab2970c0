"""Operations that rewrite a layer's output in place (``ReLU(inplace=True)``, ``x += skip``,
``clamp_``), as torchvision's models do, must not change what K-FAC records: the gradients
with respect to each layer's output as the layer produced it."""

import pytest
import torch
from torch import nn

from natgrad import fisher, ggn
from natgrad.optim import EKFAC, KFAC


class ResidualNet(nn.Module):
    """``c(clamp(b(relu(a(x))) + relu(a(x))))``, out of place or in place."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 7), nn.Linear(7, 7), nn.Linear(7, 3)
        self.inplace = inplace

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.inplace:
            hidden = torch.relu(self.a(inputs))
            return self.c((self.b(hidden) + hidden).clamp(-1, 1))
        hidden = torch.relu_(self.a(inputs))
        mixed = self.b(hidden)
        mixed += hidden
        return self.c(mixed.clamp_(-1, 1))


def twins() -> tuple[nn.Module, nn.Module]:
    models = []
    for inplace in (False, True):
        torch.manual_seed(0)
        models.append(ResidualNet(inplace).double())
    return models[0], models[1]


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(16, 5, generator=generator, dtype=torch.float64)
    return inputs, torch.randint(0, 3, (16,), generator=generator)


@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "exact"])
@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
def test_preconditioners_record_the_outputs_as_the_layers_produced_them(
    preconditioner, fisher_type
) -> None:
    """The Monte-Carlo backward asked autograd for the gradients of the output tensors, which
    after an in-place op are other values: the layers before one recorded nothing, with a
    warning, and kept their plain gradients."""
    inputs, targets = data()
    results = []
    for model in twins():
        precond = preconditioner(
            model,
            damping=0.1,
            fisher_type=fisher_type,
            likelihood="categorical",
            generator=torch.Generator().manual_seed(2),
        )
        for _ in range(2):
            model.zero_grad()
            outputs = model(inputs)
            if fisher_type != "empirical":
                precond.sample_backward(outputs)
            nn.functional.cross_entropy(outputs, targets).backward()
            precond.step()
        results.append(
            [param.grad for param in model.parameters()]
            + [state.output_factor for state in precond.layers]
        )
    for plain, rewritten in zip(*results, strict=True):
        torch.testing.assert_close(rewritten, plain, rtol=0, atol=0)


@pytest.mark.parametrize("structure", ["kfac", "ekfac", "diag"])
def test_operators_see_the_outputs_as_the_layers_produced_them(structure) -> None:
    inputs, targets = data()
    built = [
        (
            fisher(model, inputs, likelihood="categorical", structure=structure).to_dense(),
            ggn(
                model,
                inputs,
                nn.functional.cross_entropy,
                targets,
                structure=structure,
                separable="mean",
            ).to_dense(),
        )
        for model in twins()
    ]
    for plain, rewritten in zip(*built, strict=True):
        torch.testing.assert_close(rewritten, plain, rtol=0, atol=0)
