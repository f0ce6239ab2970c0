"""K-FAC on an ``nn.MultiheadAttention`` with ``kdim`` / ``vdim``: separate query, key and value
weights of different widths sharing one packed bias.

Oracle: the same attention written with three bias-free ``nn.Linear`` layers, a separate bias
parameter (its gradient kept, as K-FAC keeps the packed bias's) and an ``nn.Linear`` output
projection; preconditioning the attention must take the same steps."""

import pytest
import torch
from torch import Tensor, nn

from natgrad.optim import EKFAC, KFAC

EMBED, KEY_DIM, VALUE_DIM, HEADS = 8, 5, 3, 2


class Attending(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.attention = nn.MultiheadAttention(
            EMBED, HEADS, kdim=KEY_DIM, vdim=VALUE_DIM, batch_first=batch_first
        )
        self.head = nn.Linear(EMBED, 3)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        if not self.batch_first:
            query, key, value = (rows.transpose(0, 1) for rows in (query, key, value))
        attended = self.attention(query, key, value, need_weights=False)[0]
        return self.head(attended.mean(dim=1 if self.batch_first else 0))


class LinearTwin(nn.Module):
    """The attention by hand: ``softmax(Q Kᵀ / √d) V`` per head, batch first."""

    def __init__(self, reference: Attending) -> None:
        super().__init__()
        attention = reference.attention
        self.maps = nn.ModuleDict(
            {
                kind: nn.Linear(width, EMBED, bias=False)
                for kind, width in (("q", EMBED), ("k", KEY_DIM), ("v", VALUE_DIM))
            }
        )
        for kind, layer in self.maps.items():
            layer.weight.data.copy_(getattr(attention, f"{kind}_proj_weight"))
        self.bias = nn.Parameter(attention.in_proj_bias.detach().clone())
        self.out = nn.Linear(EMBED, EMBED)
        self.out.load_state_dict(attention.out_proj.state_dict())
        self.head = nn.Linear(EMBED, 3)
        self.head.load_state_dict(reference.head.state_dict())

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        shares = self.bias.chunk(3)
        rows = [
            self.maps[kind](inputs) + share
            for kind, inputs, share in zip("qkv", (query, key, value), shares, strict=True)
        ]
        samples, positions = query.shape[:2]
        heads = [row.unflatten(-1, (HEADS, EMBED // HEADS)).transpose(1, 2) for row in rows]
        scores = heads[0] @ heads[1].transpose(-1, -2) / (EMBED // HEADS) ** 0.5
        attended = (scores.softmax(dim=-1) @ heads[2]).transpose(1, 2)
        return self.head(self.out(attended.reshape(samples, positions, EMBED)).mean(dim=1))


def train(model: nn.Module, preconditioner, fisher_type: str) -> KFAC:
    precond = preconditioner(
        model,
        fisher_type=fisher_type,
        likelihood=None if fisher_type == "empirical" else "categorical",
        damping=0.1,
        factor_update_interval=2,
        inv_update_interval=2,
        generator=torch.Generator().manual_seed(3),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        inputs = [
            torch.randn(6, length, width, generator=generator, dtype=torch.float64)
            for length, width in ((4, EMBED), (7, KEY_DIM), (7, VALUE_DIM))
        ]
        targets = torch.randint(0, 3, (6,), generator=generator)
        optimizer.zero_grad()
        output = model(*inputs)
        if fisher_type != "empirical":
            precond.sample_backward(output)
        nn.functional.cross_entropy(output, targets).backward()
        precond.step()
        optimizer.step()
    return precond


@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_separate_projections_step_as_their_linear_twin(preconditioner, fisher_type, batch_first):
    torch.manual_seed(0)
    model = Attending(batch_first).double()
    twin = LinearTwin(model).double()
    precond = train(model, preconditioner, fisher_type)
    train(twin, preconditioner, fisher_type)
    names = [state.name for state in precond.layers]
    expected = [f"attention.{kind}_proj" for kind in ("q", "k", "v", "out")]
    assert names == [*expected, "head"]
    attention = model.attention
    for kind, layer in twin.maps.items():
        torch.testing.assert_close(
            getattr(attention, f"{kind}_proj_weight"), layer.weight, atol=1e-10, rtol=0
        )
    torch.testing.assert_close(attention.in_proj_bias, twin.bias, atol=1e-10, rtol=0)
    torch.testing.assert_close(attention.out_proj.weight, twin.out.weight, atol=1e-10, rtol=0)


def test_a_frozen_separate_weight_is_left_out_and_the_others_still_step_as_the_twin():
    torch.manual_seed(0)
    model = Attending(batch_first=True).double()
    twin = LinearTwin(model).double()
    model.attention.k_proj_weight.requires_grad_(False)
    twin.maps["k"].weight.requires_grad_(False)
    precond = train(model, KFAC, "mc")
    train(twin, KFAC, "mc")
    assert "attention.k_proj" not in [state.name for state in precond.layers]
    torch.testing.assert_close(
        model.attention.q_proj_weight, twin.maps["q"].weight, atol=1e-10, rtol=0
    )
    torch.testing.assert_close(
        model.attention.v_proj_weight, twin.maps["v"].weight, atol=1e-10, rtol=0
    )
