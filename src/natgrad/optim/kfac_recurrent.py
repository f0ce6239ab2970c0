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
whole input sequence in one call; ``W_hh`` once per step. The steps' calls of ``W_hh`` in one
loop are recorded as one call on their stacked rows (:class:`StepRows`): one Gram product per
factor (and for EKFAC one pair of features and gradients) instead of one per step. In an LSTM
or RNN a step's gates are ``W_ih``'s output plus ``W_hh``'s, so ``W_hh``'s output gradients
are those of ``W_ih``'s output, taken by one hook on it, with no hook per step; a GRU's gates
are not (its reset gate scales ``W_hh``'s candidate part), and its ``W_hh``'s calls, like an
LSTM projection ``W_hr``'s, are hooked at each step and recorded together
(:class:`StepCalls`) once a backward vector's output gradients of all the steps have arrived.

A packed sequence (``nn.utils.rnn.PackedSequence``: ``torch._VF.lstm(data, batch_sizes, ...)``,
the sequences sorted by length) is unrolled in packed form: ``W_ih`` is applied once to the
``R = Σ_t b_t`` rows of ``data``, and at step ``t`` ``W_hh`` to the hidden states of the ``b_t``
sequences still running, each sequence taking exactly its own steps (the reverse direction
from its own last step back). These calls cover the batch's ``N`` samples unevenly: each is
recorded with its :class:`PackedRows`, so that ``G`` counts ``N`` samples, ``A`` the real rows
only, EKFAC's per-sample gradients sum each sample's own rows, and K-FAC-reduce averages
``W_ih``'s inputs over each sample's own steps (``W_hh``'s calls, one step each, expand as for
padded sequences).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional
from torch.nn.utils.parametrize import is_parametrized

from natgrad.optim.kfac_mode_hooks import RecordingMode, linear_view

if TYPE_CHECKING:
    from natgrad.optim.kfac_layers import LayerState

__all__ = [
    "RECURRENT_TYPES",
    "PackedRows",
    "RecurrentLayers",
    "RecurrentProjection",
    "RecurrentRecording",
    "StepCalls",
    "StepRows",
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
    """The preconditioned weights of one recurrent layer and their states."""

    def __init__(self, module: nn.Module, states: Sequence[LayerState]) -> None:
        self.module = module
        self.states = list(states)

    def state_of(self, weight: Tensor) -> LayerState | None:
        """The state of ``weight``'s projection, found by identity (not by ``id``, which a copy
        of the model and preconditioner, ``copy.deepcopy`` or ``pickle``, changes), or ``None``
        if ``weight`` is not preconditioned."""
        return next((state for state in self.states if state.weight is weight), None)


class PackedRows:
    """Where the rows of a call on a packed sequence sit in the batch: in the order of a
    ``PackedSequence``'s ``data``, the first ``batch_sizes[t]`` of the ``samples`` sequences
    (sorted by decreasing length) at location ``t``. A call on the rows of one step is
    ``PackedRows([b_t], samples)``.

    Parameters
    ----------
    batch_sizes : sequence of int
        ``(L,)``, non-increasing, ``batch_sizes[0] <= samples``; the rows number their sum ``R``.
    samples : int
        ``N``, the batch's number of samples (sequences).
    """

    def __init__(self, batch_sizes: Sequence[int], samples: int) -> None:
        self.batch_sizes = list(batch_sizes)
        self.samples = samples

    @cached_property
    def _positions(self) -> Tensor:
        """Each row's index in the sample-major ``(N, L)`` grid, ``(R,)``: the rows of location
        ``t`` are those of its first ``batch_sizes[t]`` samples."""
        locations = len(self.batch_sizes)
        sizes = torch.tensor(self.batch_sizes).unsqueeze(1)  # (L, 1)
        step, sample = (sizes > torch.arange(self.samples)).nonzero(as_tuple=True)
        return sample * locations + step

    @cached_property
    def _lengths(self) -> Tensor:
        """The number of rows of each of the first ``batch_sizes[0]`` samples, ``(b_0, 1)``."""
        sizes = torch.tensor(self.batch_sizes)
        return (sizes > torch.arange(self.batch_sizes[0]).unsqueeze(1)).sum(dim=1, keepdim=True)

    def padded(self, rows: Tensor) -> Tensor:
        """``rows`` ``(R, d)`` at their samples and locations, ``(N, L, d)``, zeros elsewhere."""
        grid = rows.new_zeros(self.samples * len(self.batch_sizes), rows.shape[-1])
        grid.index_copy_(0, self._positions.to(rows.device), rows)
        return grid.view(self.samples, len(self.batch_sizes), rows.shape[-1])

    def sums(self, rows: Tensor) -> Tensor:
        """Each sample's sum of its rows, ``(N, d)`` (zeros for a sample without rows)."""
        return self.padded(rows).sum(dim=1)

    def means(self, rows: Tensor) -> Tensor:
        """The mean of each sample's rows, for the ``batch_sizes[0]`` samples with rows,
        ``(b_0, d)``."""
        lengths = self._lengths.to(device=rows.device, dtype=rows.dtype)
        return self.sums(rows)[: self.batch_sizes[0]] / lengths


class StepRows(PackedRows):
    """The rows of a weight's calls at the ``L`` steps of one unrolled loop, stacked in step order
    and recorded as one call (:class:`StepCalls`): ``batch_sizes[t]`` rows of step ``t``, those of
    the first ``batch_sizes[t]`` of the ``samples`` samples. Each step's call has one location per
    sample, which K-FAC-reduce (a call's inputs averaged, its output gradients summed over the
    call's own locations) leaves as it is: :meth:`means` and :meth:`sums` return the rows ``(R,
    d)``, and the stacked call's factors are those of the steps' calls in expand and reduce."""

    def sums(self, rows: Tensor) -> Tensor:
        """``rows`` ``(R, d)``, each step's call reduced over its one location per sample."""
        return rows

    def means(self, rows: Tensor) -> Tensor:
        """``rows`` ``(R, d)``, each step's call reduced over its one location per sample."""
        return rows


class StepCalls:
    """The calls of one preconditioned weight at the steps of one unrolled loop (a layer and
    direction), recorded as one call of the weight on all the steps' rows (:class:`StepRows`):
    when the output gradients of all the steps from one backward vector have arrived, one Gram
    product per factor, and for EKFAC one pair, instead of one per step. The statistics are the
    steps' separate calls' (to rounding): their rows pooled in ``A`` and ``G``, the samples
    counted once per pass, each sample's EKFAC gradient summed over its steps. Each step's
    output feeds every later step and the stacked output, so a backward pass that reaches one
    step reaches them all; one that did not (gradients asked for intermediate tensors) is
    recorded by :meth:`record_pending` when the statistics are read, the missing steps with zero
    output gradients, as the locations of one call that the loss does not depend on.

    Parameters
    ----------
    state : LayerState
        The weight's state.
    samples : int
        ``N``, the batch's number of samples (sequences).
    """

    def __init__(self, state: LayerState, samples: int) -> None:
        self._state = state
        self._samples = samples
        self._call_pass = 0
        self._rows: dict[int, Tensor] = {}  # step -> the step's input rows (b_t, d_in)
        self._grads: dict[int, dict[int, Tensor]] = {}  # vector -> step -> (b_t, d_out)
        self._scales: dict[int, float] = {}
        self._features: Tensor | None = None
        self._inputs_recorded = False

    def add(self, step: int, rows: Tensor, call_pass: int) -> None:
        """The (detached) input rows ``(b_t, d_in)`` of the call at ``step``, of forward pass
        ``call_pass``."""
        self._rows[step] = rows
        self._call_pass = call_pass

    def receive(self, step: int, grad: Tensor, scale: float, vector: int) -> None:
        """The output gradient ``(b_t, d_out)`` of the call at ``step`` from the ``vector``-th
        backward vector, to be recorded scaled by ``scale``; records the vector's statistics
        once every step's has arrived."""
        grads = self._grads.setdefault(vector, {})
        grads[step] = grad.detach()
        self._scales[vector] = scale
        if len(grads) == len(self._rows):
            self._record(vector)

    def pending_vectors(self) -> list[int]:
        """The backward vectors some of whose steps' output gradients have not arrived."""
        return sorted(self._grads)

    def record_pending(self, vector: int) -> None:
        """Record the ``vector``-th backward vector's output gradients if some of its steps'
        have not arrived (those count as zeros)."""
        if vector in self._grads:
            self._record(vector)

    def _record(self, vector: int) -> None:
        grads = self._grads.pop(vector)
        steps = sorted(self._rows)
        packed = StepRows([len(self._rows[step]) for step in steps], self._samples)
        if not self._inputs_recorded:
            inputs = torch.cat([self._rows[step] for step in steps])
            self._features = self._state.record_input(inputs, packed)
            self._inputs_recorded = True
        template = next(iter(grads.values()))
        stacked = torch.cat(
            [
                grads[step]
                if step in grads
                else template.new_zeros(len(self._rows[step]), template.shape[-1])
                for step in steps
            ]
        )
        scale = self._scales.pop(vector)
        self._state.record_output_grad(
            stacked, scale, self._features, self._call_pass, vector, packed
        )


def _step(
    kind: str, from_input: Tensor, from_hidden: Tensor, hidden: Tensor, cell: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """One step of a ``kind`` cell from its two linear maps' outputs: the new hidden state
    (before an LSTM's projection) and LSTM cell state, as PyTorch's kernels compute them."""
    if kind == "gru":
        input_reset, input_update, input_new = from_input.chunk(3, dim=-1)
        hidden_reset, hidden_update, hidden_new = from_hidden.chunk(3, dim=-1)
        reset = torch.sigmoid(input_reset + hidden_reset)
        update = torch.sigmoid(input_update + hidden_update)
        new = torch.tanh(input_new + reset * hidden_new)
        return new + update * (hidden - new), None
    return _summed_step(kind, from_input + from_hidden, cell)


def _summed_step(kind: str, gates: Tensor, cell: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """One step of a ``kind`` cell other than a GRU from the sum of its two linear maps'
    outputs, ``gates`` ``(N, gates · H)``: the new hidden state and LSTM cell state."""
    if kind == "lstm":
        in_gate, forget_gate, candidate, out_gate = gates.chunk(4, dim=-1)
        cell = torch.addcmul(
            torch.sigmoid(forget_gate) * cell, torch.sigmoid(in_gate), torch.tanh(candidate)
        )
        return torch.sigmoid(out_gate) * torch.tanh(cell), cell
    activation = torch.tanh if kind == "rnn_tanh" else torch.relu
    return activation(gates), None


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
        return self._packed_sequence(_SEQUENCE_KINDS[func], *args, **kwargs)

    def _linear(
        self,
        rows: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        packed: PackedRows | None = None,
        steps: tuple[StepCalls | None, int] = (None, 0),
    ) -> Tensor:
        """``rows @ weightᵀ + bias`` for batch-first ``rows`` (packed rows placed by
        ``packed``), recorded as a call of ``weight``'s projection if it is preconditioned: on
        its own, or as step ``steps[1]`` of the loop whose calls ``steps[0]`` records."""
        output = functional.linear(rows, weight, bias)
        state = self._layers.state_of(weight)
        if state is not None:
            self._precond._record_call(state, self._layers.module, rows, output, packed, steps)
        return output

    def _step_calls(self, weight: Tensor | None, samples: int) -> StepCalls | None:
        """The recorder of ``weight``'s calls at the steps of one loop, if it is
        preconditioned."""
        state = None if weight is None else self._layers.state_of(weight)
        return None if state is None else StepCalls(state, samples)

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
        rows = inputs if batch_first else inputs.transpose(0, 1)  # (N, T, d_in)
        layers = _Stack(kind, weights, has_biases, num_layers, dropout, train, bidirectional)
        output, *finals = layers.run(rows, initial, self._run_direction)
        return (output if batch_first else output.transpose(0, 1), *finals)

    def _packed_sequence(
        self,
        kind: str,
        data: Tensor,
        batch_sizes: Tensor,
        initial: Tensor | tuple[Tensor, Tensor],
        weights: Sequence[Tensor],
        has_biases: bool,
        num_layers: int,
        dropout: float,
        train: bool,
        bidirectional: bool,
    ) -> tuple[Tensor, ...]:
        """:meth:`_sequence` on a packed sequence (``torch._VF.lstm``'s packed arguments):
        from ``data`` ``(R, d_in)``, the output's data ``(R, H_out · directions)`` and the
        final states, in the sequences' sorted order."""
        layers = _Stack(kind, weights, has_biases, num_layers, dropout, train, bidirectional)
        return layers.run(data, initial, partial(self._packed_direction, batch_sizes.tolist()))

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
        layer = _unpack(weights, has_biases)
        samples, steps = rows.shape[:2]
        from_input = self._linear(rows, layer.input, layer.input_bias)
        by_step = from_input.transpose(0, 1).reshape(samples * steps, -1)  # step-major rows
        sizes = [samples] * steps
        outputs, final = self._loop(kind, by_step, sizes, hidden, cell, layer, reverse)
        return torch.stack(outputs, dim=1), final

    def _packed_direction(
        self,
        sizes: list[int],
        kind: str,
        rows: Tensor,
        hidden: Tensor,
        cell: Tensor | None,
        weights: Sequence[Tensor],
        has_biases: bool,
        reverse: bool,
    ) -> tuple[Tensor, tuple[Tensor, Tensor | None]]:
        """One layer and direction over packed ``rows`` ``(R, d_in)``, ``sizes[t]`` sequences
        at step ``t``: the outputs ``(R, H_out)`` and the final hidden (and cell) state
        ``(N, ·)``, each sequence's after the last of its own steps (reverse: after step 0)."""
        layer = _unpack(weights, has_biases)
        packed = PackedRows(sizes, hidden.shape[0])
        from_input = self._linear(rows, layer.input, layer.input_bias, packed)
        outputs, final = self._loop(kind, from_input, sizes, hidden, cell, layer, reverse)
        return torch.cat(outputs), final

    def _loop(
        self,
        kind: str,
        from_input: Tensor,
        sizes: list[int],
        hidden: Tensor,
        cell: Tensor | None,
        layer: _LayerWeights,
        reverse: bool,
    ) -> tuple[list[Tensor], tuple[Tensor, Tensor | None]]:
        """The loop of one layer and direction over step-major rows ``from_input`` ``(R, gates
        · H)`` (``W_ih``'s output, ``sizes[t]`` rows at step ``t``, those of the first
        ``sizes[t]`` of the ``N`` sequences): each step's output ``(sizes[t], H_out)`` in step
        order and the final hidden (and cell) state ``(N, ·)``.

        Except in a GRU, a step's gates are ``W_ih``'s output plus ``W_hh``'s: ``W_hh``'s output
        gradients are those of ``from_input``, and its calls at all the steps are recorded as
        one call on the stacked hidden states (:class:`StepRows`), with no hook per step. A
        GRU's ``W_hh`` and any ``W_hr`` are recorded by :class:`StepCalls`, as is an LSTM's or
        RNN's ``W_hh`` if no gradient flows to its gates but through ``W_hh`` (``W_ih`` and the
        biases frozen or absent, inputs without gradient)."""
        samples = hidden.shape[0]
        summed = kind != "gru" and any(
            tensor is not None and tensor.requires_grad
            for tensor in (from_input, layer.hidden_bias)
        )
        if summed and layer.hidden_bias is not None:  # in W_ih's output dtype (autocast's)
            from_input = from_input + layer.hidden_bias.to(from_input.dtype)
        by_step = from_input.split(sizes)  # one split: its backward is one concatenation
        hidden_calls = None if summed else self._step_calls(layer.hidden, samples)
        projection_calls = self._step_calls(layer.projection, samples)
        outputs: list[Tensor] = [from_input] * len(sizes)
        previous: list[Tensor] = [from_input] * len(sizes)
        for step in range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes)):
            active = sizes[step]
            packed = PackedRows([active], samples)
            running = hidden if active == samples else hidden[:active]
            running_cell = cell if cell is None or active == samples else cell[:active]
            if summed:
                previous[step] = running.detach()
                gates = torch.addmm(by_step[step], running, layer.hidden.mT)
                new_hidden, new_cell = _summed_step(kind, gates, running_cell)
            else:
                from_hidden = self._linear(
                    running, layer.hidden, layer.hidden_bias, packed, (hidden_calls, step)
                )
                new_hidden, new_cell = _step(
                    kind, by_step[step], from_hidden, running, running_cell
                )
            if layer.projection is not None:
                new_hidden = self._linear(
                    new_hidden, layer.projection, None, packed, (projection_calls, step)
                )
            outputs[step] = new_hidden
            hidden = _with_first_rows(new_hidden, hidden)
            cell = None if cell is None else _with_first_rows(new_cell, cell)
        if summed:
            self._record_steps(layer.hidden, torch.cat(previous), from_input, sizes, samples)
        return outputs, (hidden, cell)

    def _record_steps(
        self, weight: Tensor, rows: Tensor, output: Tensor, sizes: list[int], samples: int
    ) -> None:
        """Record ``weight``'s calls at the steps of one loop, if it is preconditioned, as one
        call on their stacked input ``rows`` ``(R, d_in)`` whose output gradients are those of
        ``output`` ``(R, d_out)``."""
        state = self._layers.state_of(weight)
        if state is not None:
            module = self._layers.module
            self._precond._record_call(state, module, rows, output, StepRows(sizes, samples))


_DirectionRun = Callable[..., tuple[Tensor, tuple[Tensor, Tensor | None]]]


class _Stack:
    """The layers and directions of one fused call (``torch._VF.lstm``'s arguments), run one
    layer and direction at a time."""

    def __init__(
        self,
        kind: str,
        weights: Sequence[Tensor],
        has_biases: bool,
        num_layers: int,
        dropout: float,
        train: bool,
        bidirectional: bool,
    ) -> None:
        self.kind, self.weights, self.has_biases = kind, weights, has_biases
        self.num_layers, self.dropout, self.train = num_layers, dropout, train
        self.directions = 2 if bidirectional else 1

    def run(
        self, rows: Tensor, initial: Tensor | tuple[Tensor, Tensor], direction_run: _DirectionRun
    ) -> tuple[Tensor, ...]:
        """The last layer's output (the directions' outputs concatenated along the features) and
        the stacked final hidden (and cell) states, from the first layer's input ``rows`` and
        ``direction_run(kind, rows, hidden, cell, weights, has_biases, reverse)``."""
        hidden0, cell0 = initial if self.kind == "lstm" else (initial, None)
        per_direction = len(self.weights) // (self.num_layers * self.directions)
        finals: list[tuple[Tensor, Tensor | None]] = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.directions):
                index = layer * self.directions + direction
                start = index * per_direction
                layer_weights = self.weights[start : start + per_direction]
                cell = None if cell0 is None else cell0[index]
                output, final = direction_run(
                    self.kind,
                    rows,
                    hidden0[index],
                    cell,
                    layer_weights,
                    self.has_biases,
                    direction == 1,
                )
                outputs.append(output)
                finals.append(final)
            rows = torch.cat(outputs, dim=-1) if self.directions == 2 else outputs[0]
            if self.dropout > 0 and self.train and layer < self.num_layers - 1:
                rows = functional.dropout(rows, self.dropout, training=True)
        hidden_n = torch.stack([final[0] for final in finals])
        if self.kind != "lstm":
            return rows, hidden_n
        return rows, hidden_n, torch.stack([final[1] for final in finals])


class _LayerWeights(NamedTuple):
    """One layer and direction's weights: ``W_ih``, ``W_hh``, ``b_ih``, ``b_hh`` and an LSTM's
    projection ``W_hr`` (``None`` where absent)."""

    input: Tensor
    hidden: Tensor
    input_bias: Tensor | None
    hidden_bias: Tensor | None
    projection: Tensor | None


def _unpack(weights: Sequence[Tensor], has_biases: bool) -> _LayerWeights:
    """One layer and direction's weights from its slice of the fused call's ``weights``."""
    input_bias, hidden_bias = (weights[2], weights[3]) if has_biases else (None, None)
    projection = weights[4 if has_biases else 2] if len(weights) % 2 else None
    return _LayerWeights(weights[0], weights[1], input_bias, hidden_bias, projection)


def _with_first_rows(first: Tensor, rows: Tensor) -> Tensor:
    """``rows`` with its first ``len(first)`` rows replaced by ``first`` (out of place)."""
    if first.shape[0] == rows.shape[0]:
        return first
    return torch.cat([first, rows[first.shape[0] :]])
