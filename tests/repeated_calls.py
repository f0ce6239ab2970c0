"""Networks that call one layer several times in a forward pass (weight sharing across calls):
the models of the K-FAC/EKFAC repeated-call tests, and the brute-force oracle of their factors."""

import copy

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

DTYPE = torch.float64


class Siamese(nn.Module):
    """``head(tanh(lin(x₁)) + tanh(lin(x₂)))`` for inputs ``(N, 2, d)``: ``lin`` called twice
    (``stacked=False``), or once on the stack (``stacked=True``: the same function, with two
    locations per sample)."""

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
    """A siamese network and its stacked twin, with the same weights."""
    torch.manual_seed(seed)
    model = Siamese().to(DTYPE)
    twin = copy.deepcopy(model)
    twin.stacked = True
    return model, twin


def siamese_batch(samples: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 2, 3, generator=generator, dtype=DTYPE)
    return inputs, torch.randint(0, 3, (samples,), generator=generator)


class Segments(nn.Module):
    """``head(Σ_t tanh(lin(x_t)))`` for token inputs ``(N, 5, d)``: ``lin`` called on the first
    2 tokens and on the last 3 (``joined=False``: calls with different numbers of locations), or
    once on all 5 (``joined=True``)."""

    def __init__(self, features: int = 3, hidden: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(features, hidden)
        self.head = nn.Linear(hidden, classes)
        self.joined = False

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        parts = [inputs] if self.joined else [inputs[:, :2], inputs[:, 2:]]
        return self.head(sum(torch.tanh(self.lin(part)).sum(1) for part in parts))


def segments_pair(seed: int = 0) -> tuple[Segments, Segments, torch.Tensor, torch.Tensor]:
    """A :class:`Segments` network, its joined twin (the same weights) and a batch."""
    torch.manual_seed(seed)
    model = Segments().to(DTYPE)
    twin = copy.deepcopy(model)
    twin.joined = True
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(6, 5, 3, generator=generator, dtype=DTYPE)
    return model, twin, inputs, torch.randint(0, 3, (6,), generator=generator)


class Unrolled(nn.Module):
    """``head(tanh(cell(tanh(cell(x)))))``: the cell called twice, the second call on the
    first's output."""

    def __init__(self, width: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.cell = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.cell(torch.tanh(self.cell(inputs)))))


def unrolled_calls(
    model: Unrolled, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cell's input features ``[a, 1]`` of each call, ``(N, 2, d + 1)``, and the per-sample
    output gradients of the mean cross-entropy, ``N ∂L/∂o`` of each call, ``(N, 2, d)``."""
    cell = model.cell
    first = cell(inputs)
    hidden = torch.tanh(first)
    second = cell(hidden)
    loss = nn.functional.cross_entropy(model.head(torch.tanh(second)), targets)
    grads = torch.autograd.grad(loss, [first, second])
    ones = torch.ones(len(inputs), 1, dtype=inputs.dtype)
    features = torch.stack([torch.cat([inputs, ones], 1), torch.cat([hidden, ones], 1)], 1)
    return features.detach(), torch.stack(grads, 1) * len(inputs)


def unrolled_batch(seed: int) -> tuple[Unrolled, torch.Tensor, torch.Tensor]:
    """An :class:`Unrolled` cell in float64 and a batch of 7 samples."""
    torch.manual_seed(seed)
    model = Unrolled().to(DTYPE)
    return model, torch.randn(7, 3, dtype=DTYPE), torch.randint(0, 3, (7,))


def unrolled_cell_gradients(
    model: Unrolled, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Per-sample gradients ``[∇W, ∇b]`` of the cell (summed over its two calls by autograd)
    from ``torch.func``, shape ``(N, d, d + 1)``."""
    params = {name: param.detach() for name, param in model.named_parameters()}

    def sample_loss(values, sample, target):
        logits = functional_call(model, values, (sample.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, target.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    return torch.cat([per_sample["cell.weight"], per_sample["cell.bias"].unsqueeze(-1)], -1)


class TwiceConv(nn.Module):
    """``head(tanh(conv(tanh(conv(x)))))`` (channels in = channels out)."""

    def __init__(self, conv: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.head = head

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.conv(torch.tanh(self.conv(inputs))))
        return self.head(hidden.flatten(1))
