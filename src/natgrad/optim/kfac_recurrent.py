"""K-FAC statistics of recurrent layers' weights (``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and
their cells).

A recurrent layer applies two linear maps per step: the input-to-hidden weight ``W_ih`` (with
``b_ih``) to the step's input and the hidden-to-hidden weight ``W_hh`` (with ``b_hh``) to the
previous hidden state, inside one fused kernel (``torch._VF.lstm``, ``lstm_cell``, ...) that no
layer hook sees. On the steps that record statistics the layer's forward runs under
:class:`RecurrentRecording`, a ``TorchFunctionMode`` that takes over the fused call and unrolls
it in Python with the same equations, every product with a weight a linear layer whose calls
the preconditioner records. The values and gradients are those of the fused forward (to
rounding).

Each weight is preconditioned as an ``nn.Linear`` (:class:`RecurrentProjection`, named
``"{layer}.ih_l0"``, ``"{layer}.hh_l0_reverse"``, ``"{layer}.hr_l0"`` for an LSTM's projection,
``"{layer}.ih"`` and ``"{layer}.hh"`` for a cell) applied at every step of the sequence: its
block ``G ⊗ A`` pools the steps as the locations of one call (K-FAC-expand over time, the
steps taken as independent: Martens, Ba & Johnson 2018's simplest approximation), exactly as
for a cell written with ``nn.Linear`` layers and called in a loop. ``W_ih`` is applied to the
whole input sequence in one call; ``W_hh`` once per step.

Packed sequences (``nn.utils.rnn.PackedSequence``) run fused and record nothing, with a
warning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional
from torch.nn.utils.parametrize import is_parametrized

from natgrad._warnings import warn_at_caller
from natgrad.optim.kfac_mode_hooks import RecordingMode, linear_view

if TYPE_CHECKING:
    from natgrad.optim.kfac_layers import LayerState

__all__ = [
    "RECURRENT_TYPES",
    "RecurrentLayers",
    "RecurrentProjection",
    "RecurrentRecording",
    "recurrent_projections",
]

RECURRENT_TYPES = (nn.RNNBase, nn.RNNCellBase)

_SEQUENCE_KINDS = {
    torch._VF.lstm: "lstm",
    torch._VF.gru: "gru",
    torch._VF.rnn_tanh: "rnn_tanh",
    torch._VF.rnn_relu: "rnn_relu",
}
_CELL_KINDS = {
    torch._VF.lstm_cell: "lstm",
    torch._VF.gru_cell: "gru",
    torch._VF.rnn_tanh_cell: "rnn_tanh",
    torch._VF.rnn_relu_cell: "rnn_relu",
}


class RecurrentProjection(nn.Linear):
    """One weight of a recurrent layer (``weight_ih_l0``, ...) and its bias (the same
    parameters, not copies) as a linear layer, never called."""


def _weight_names(module: nn.Module) -> list[str]:
    if isinstance(module, nn.RNNBase):
        return [name for name in module._flat_weights_names if name.startswith("weight_")]
    return ["weight_ih", "weight_hh"]


def recurrent_projections(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of the weights of a recurrent ``module`` that K-FAC can precondition,
    each with its bias: ``"{name}.ih_l0"`` for ``weight_ih_l0`` and ``bias_ih_l0``, and so on.
    Weights that are computed (parametrized, pruned) are left out."""
    prefix = f"{name}." if name else ""
    projections = []
    for weight_name in _weight_names(module):
        suffix = weight_name.removeprefix("weight_")
        weight = getattr(module, weight_name)
        if is_parametrized(module, weight_name) or not isinstance(weight, nn.Parameter):
            continue
        bias = getattr(module, f"bias_{suffix}", None)
        projections.append((f"{prefix}{suffix}", linear_view(RecurrentProjection, weight, bias)))
    return projections


class RecurrentLayers:
    """The preconditioned weights of one recurrent layer: their states by the weights' ids."""

    def __init__(self, module: nn.Module, states: Sequence[LayerState]) -> None:
        self.module = module
        self.states = {id(state.weight): state for state in states}
        self._warned_packed = False

    def warn_packed(self) -> None:
        """Say, once, that a packed sequence ran fused and recorded nothing."""
        if self._warned_packed:
            return
        self._warned_packed = True
        names = [state.name for state in self.states.values()]
        warn_at_caller(
            f"KFAC: {type(self.module).__name__} {names} ran on a PackedSequence, which K-FAC "
            "does not unroll: its weights record no statistics on such steps. Pad the "
            "sequences (nn.utils.rnn.pad_packed_sequence) to precondition them",
            RuntimeWarning,
        )


def _step(
    kind: str, from_input: Tensor, from_hidden: Tensor, hidden: Tensor, cell: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """One step of a ``kind`` cell from its two linear maps' outputs: the new hidden state
    (before an LSTM's projection) and LSTM cell state, as PyTorch's kernels compute them."""
    if kind == "lstm":
        in_gate, forget_gate, candidate, out_gate = (from_input + from_hidden).chunk(4, dim=-1)
        cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(in_gate) * torch.tanh(candidate)
        return torch.sigmoid(out_gate) * torch.tanh(cell), cell
    if kind == "gru":
        input_reset, input_update, input_new = from_input.chunk(3, dim=-1)
        hidden_reset, hidden_update, hidden_new = from_hidden.chunk(3, dim=-1)
        reset = torch.sigmoid(input_reset + hidden_reset)
        update = torch.sigmoid(input_update + hidden_update)
        new = torch.tanh(input_new + reset * hidden_new)
        return new + update * (hidden - new), None
    activation = torch.tanh if kind == "rnn_tanh" else torch.relu
    return activation(from_input + from_hidden), None


class RecurrentRecording(RecordingMode):
    """Active during one forward pass of a recurrent layer on a recording step: runs its fused
    kernel unrolled, with every product with a preconditioned weight recorded as a call of
    that weight's :class:`RecurrentProjection`; every other torch function passes through."""

    _layers: RecurrentLayers

    def _takes_over(self, func: Callable[..., Any]) -> bool:
        return func in _CELL_KINDS or func in _SEQUENCE_KINDS

    def _run(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if func in _CELL_KINDS:
            return self._cell(_CELL_KINDS[func], *args, **kwargs)
        if isinstance(args[3], bool):  # packed sequences have the weights there
            return self._sequence(_SEQUENCE_KINDS[func], *args, **kwargs)
        self._layers.warn_packed()
        return func(*args, **kwargs)

    def _linear(self, rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``rows @ weightᵀ + bias`` for batch-first ``rows``, recorded as a call of
        ``weight``'s projection if it is preconditioned."""
        output = functional.linear(rows, weight, bias)
        state = self._layers.states.get(id(weight))
        if state is not None:
            self._precond._record_call(state, self._layers.module, rows, output)
        return output

    def _cell(
        self,
        kind: str,
        step_input: Tensor,
        hidden: Tensor | tuple[Tensor, Tensor],
        input_weight: Tensor,
        hidden_weight: Tensor,
        input_bias: Tensor | None = None,
        hidden_bias: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """A cell's step (``torch._VF.lstm_cell``'s arguments, ``(N, d_in)`` inputs)."""
        hidden, cell = hidden if kind == "lstm" else (hidden, None)
        new_hidden, new_cell = _step(
            kind,
            self._linear(step_input, input_weight, input_bias),
            self._linear(hidden, hidden_weight, hidden_bias),
            hidden,
            cell,
        )
        return (new_hidden, new_cell) if kind == "lstm" else new_hidden

    def _sequence(
        self,
        kind: str,
        inputs: Tensor,
        initial: Tensor | tuple[Tensor, Tensor],
        weights: Sequence[Tensor],
        has_biases: bool,
        num_layers: int,
        dropout: float,
        train: bool,
        bidirectional: bool,
        batch_first: bool,
    ) -> tuple[Tensor, ...]:
        """A multi-layer, possibly bidirectional recurrent layer's forward
        (``torch._VF.lstm``'s arguments), one layer and direction at a time."""
        hidden0, cell0 = initial if kind == "lstm" else (initial, None)
        directions = 2 if bidirectional else 1
        per_direction = len(weights) // (num_layers * directions)
        rows = inputs if batch_first else inputs.transpose(0, 1)  # (N, T, d_in)
        finals: list[tuple[Tensor, Tensor | None]] = []
        for layer in range(num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                start = index * per_direction
                layer_weights = weights[start : start + per_direction]
                cell = None if cell0 is None else cell0[index]
                output, final = self._run_direction(
                    kind, rows, hidden0[index], cell, layer_weights, has_biases, direction == 1
                )
                outputs.append(output)
                finals.append(final)
            rows = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
            if dropout > 0 and train and layer < num_layers - 1:
                rows = functional.dropout(rows, dropout, training=True)
        output = rows if batch_first else rows.transpose(0, 1)
        hidden_n = torch.stack([final[0] for final in finals])
        if kind != "lstm":
            return output, hidden_n
        return output, hidden_n, torch.stack([final[1] for final in finals])

    def _run_direction(
        self,
        kind: str,
        rows: Tensor,
        hidden: Tensor,
        cell: Tensor | None,
        weights: Sequence[Tensor],
        has_biases: bool,
        reverse: bool,
    ) -> tuple[Tensor, tuple[Tensor, Tensor | None]]:
        """One layer and direction over batch-first ``rows`` ``(N, T, d_in)``: the outputs
        ``(N, T, H_out)`` and the final hidden (and cell) state."""
        input_weight, hidden_weight = weights[0], weights[1]
        input_bias, hidden_bias = (weights[2], weights[3]) if has_biases else (None, None)
        projection = weights[4 if has_biases else 2] if len(weights) % 2 else None
        from_input = self._linear(rows, input_weight, input_bias)  # (N, T, gates · H)
        steps = range(rows.shape[1] - 1, -1, -1) if reverse else range(rows.shape[1])
        outputs: list[Tensor] = [rows] * rows.shape[1]
        for step in steps:
            from_hidden = self._linear(hidden, hidden_weight, hidden_bias)
            hidden, cell = _step(kind, from_input[:, step], from_hidden, hidden, cell)
            if projection is not None:
                hidden = self._linear(hidden, projection, None)
            outputs[step] = hidden
        return torch.stack(outputs, dim=1), (hidden, cell)
