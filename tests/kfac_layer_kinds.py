"""Small classifiers around the layer kinds K-FAC covers through recording modes or expanded
inputs (recurrent layers and cells, attentions, transposed convolutions), each taking one input
tensor ``(N, ...)`` and giving logits ``(N, 3)``, and the training loop that several test
modules run on them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from natgrad.optim import KFAC

CLASSES = 3


class Recurrent(nn.Module):
    """A recurrent layer (batch first) over ``(N, T, 5)`` and a head on its mean output."""

    def __init__(self, recurrent: nn.RNNBase) -> None:
        super().__init__()
        self.recurrent = recurrent
        width = recurrent.proj_size or recurrent.hidden_size
        self.head = nn.Linear(width * (2 if recurrent.bidirectional else 1), CLASSES)

    def forward(self, rows: Tensor) -> Tensor:
        return self.head(self.recurrent(rows)[0].mean(dim=1))


class CellLoop(nn.Module):
    """An ``nn.LSTMCell`` called in a Python loop over ``(N, T, 5)``."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(5, 6)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, rows: Tensor) -> Tensor:
        state, outputs = None, []
        for step in range(rows.shape[1]):
            state = self.cell(rows[:, step], state)
            outputs.append(state[0])
        return self.head(torch.stack(outputs, dim=1).mean(dim=1))


class Encoder(nn.Module):
    """An ``nn.TransformerEncoderLayer`` over ``(N, 4, 6)``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, rows: Tensor) -> Tensor:
        return self.head(self.layer(rows).mean(dim=1))


class Decoder(nn.Module):
    """An ``nn.TransformerDecoderLayer``: its target the first 4 of ``(N, 9, 6)`` positions,
    its memory (cross-attention's keys and values, of another length) the other 5."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(6, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, rows: Tensor) -> Tensor:
        return self.head(self.layer(rows[:, :4], rows[:, 4:]).mean(dim=1))


class SeparateProjections(nn.Module):
    """An ``nn.MultiheadAttention`` with ``kdim=5``, ``vdim=6``: from ``(N, 7, 15)`` the query
    is ``[:, :4, :4]``, the keys ``[..., 4:9]`` and the values ``[..., 9:]``."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, kdim=5, vdim=6, batch_first=True)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, rows: Tensor) -> Tensor:
        query, key, value = rows[:, :4, :4], rows[..., 4:9], rows[..., 9:]
        attended = self.attention(query, key, value, need_weights=False)[0]
        return self.head(torch.tanh(attended).mean(dim=1))


class TransposedDecoder(nn.Module):
    """An ``nn.ConvTranspose2d`` (stride 2, ``output_padding``) from ``(N, 3, 3, 3)`` to
    ``(N, 2, 6, 6)``, then a linear head on its means over the rows."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Linear(2 * 6, CLASSES)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(torch.tanh(self.up(images)).mean(dim=2).flatten(1))


BUILDERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "lstm_proj": (lambda: Recurrent(nn.LSTM(5, 6, batch_first=True, proj_size=3)), (4, 5)),
    "gru_bidirectional": (
        lambda: Recurrent(nn.GRU(5, 6, batch_first=True, bidirectional=True)),
        (4, 5),
    ),
    "lstm_cell": (CellLoop, (4, 5)),
    "encoder": (Encoder, (4, 6)),
    "decoder": (Decoder, (9, 6)),
    "separate_projections": (SeparateProjections, (7, 15)),
    "conv_transpose": (TransposedDecoder, (3, 3, 3)),
}
KINDS = list(BUILDERS)
RECURRENT_AND_ATTENTION = [kind for kind in KINDS if kind != "conv_transpose"]

# The preconditioned layers of each kind: the recording modes must have found them all.
LAYER_NAMES = {
    "lstm_proj": ["recurrent.ih_l0", "recurrent.hh_l0", "recurrent.hr_l0", "head"],
    "gru_bidirectional": [
        "recurrent.ih_l0",
        "recurrent.hh_l0",
        "recurrent.ih_l0_reverse",
        "recurrent.hh_l0_reverse",
        "head",
    ],
    "lstm_cell": ["cell.ih", "cell.hh", "head"],
    "encoder": [
        "layer.self_attn.in_proj",
        "layer.self_attn.out_proj",
        "layer.linear1",
        "layer.linear2",
        "head",
    ],
    "decoder": [
        "layer.self_attn.in_proj",
        "layer.self_attn.out_proj",
        "layer.multihead_attn.in_proj",
        "layer.multihead_attn.out_proj",
        "layer.linear1",
        "layer.linear2",
        "head",
    ],
    "separate_projections": [
        "attention.q_proj",
        "attention.k_proj",
        "attention.v_proj",
        "attention.out_proj",
        "head",
    ],
    "conv_transpose": ["up", "head"],
}


def make_model(kind: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The classifier of ``kind`` with the parameters of seed 0 (and random biases where
    PyTorch initialises them to zero, so that they matter)."""
    torch.manual_seed(0)
    model = BUILDERS[kind][0]()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("in_proj_bias") or name.endswith("out_proj.bias"):
                param.normal_(std=0.3)
    return model.to(dtype)


def batches(
    kind: str, steps: int, size: int, dtype: torch.dtype = torch.float64, seed: int = 1
) -> list[tuple[Tensor, Tensor]]:
    """``steps`` batches of ``size`` inputs of ``kind``'s shape and class labels."""
    generator = torch.Generator().manual_seed(seed)
    shape = BUILDERS[kind][1]
    return [
        (
            torch.randn(size, *shape, generator=generator, dtype=dtype),
            torch.randint(0, CLASSES, (size,), generator=generator),
        )
        for _ in range(steps)
    ]


def precondition_options(fisher_type: str, seed: int = 3) -> dict:
    """The preconditioner options of the tests: EMA factors recorded every other step,
    eigenbases refreshed every third (so that they are stale between refreshes)."""
    options = {
        "fisher_type": fisher_type,
        "factor_decay": 0.8,
        "factor_update_interval": 2,
        "inv_update_interval": 3,
        "damping": 0.1,
    }
    if fisher_type != "empirical":
        options["likelihood"] = "categorical"
        options["generator"] = torch.Generator().manual_seed(seed)
    return options


def train_step(
    forward: Callable[[Tensor], Tensor],
    precond: KFAC,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[Tensor, Tensor]],
    before_sampling: Callable[[int], None] | None = None,
) -> None:
    """One preconditioned step: each micro-batch's forward, the Monte-Carlo (or exact)
    backward where the preconditioner samples (after ``before_sampling(index)``), and the
    backward of its mean loss divided by the number of micro-batches."""
    optimizer.zero_grad()
    for index, (inputs, targets) in enumerate(micro_batches):
        outputs = forward(inputs)
        if precond.fisher_type != "empirical":
            if before_sampling is not None:
                before_sampling(index)
            precond.sample_backward(outputs)
        loss = nn.functional.cross_entropy(outputs, targets) / len(micro_batches)
        loss.backward()
    precond.step()
    optimizer.step()


def parameters(model: nn.Module) -> list[Tensor]:
    return [param.detach().clone() for param in model.parameters()]
