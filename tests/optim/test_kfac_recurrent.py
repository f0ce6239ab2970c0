"""K-FAC on recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and their cells).

The oracle is the same network written with ``nn.Linear`` layers (whose K-FAC statistics are
tested against brute force elsewhere) and the cell equations of PyTorch's documentation:
preconditioning the recurrent layer must take the same steps."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import Tensor, nn

from natgrad.optim import EKFAC, KFAC

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
MODULES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}
CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn_tanh": nn.RNNCell, "rnn_relu": nn.RNNCell}


def documented_step(kind: str, from_input: Tensor, from_hidden: Tensor, hidden, cell):
    """One step as PyTorch's documentation writes the cells."""
    if kind == "lstm":
        i, f, g, o = (from_input + from_hidden).chunk(4, dim=-1)
        cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(cell), cell
    if kind == "gru":
        x_r, x_z, x_n = from_input.chunk(3, dim=-1)
        h_r, h_z, h_n = from_hidden.chunk(3, dim=-1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * hidden, None
    pre = from_input + from_hidden
    return (torch.tanh(pre) if kind == "rnn_tanh" else torch.relu(pre)), None


class LinearRecurrent(nn.Module):
    """A multi-layer, possibly bidirectional recurrent layer built from ``nn.Linear`` layers,
    batch first; ``ih`` applied to the whole sequence, ``hh`` (and ``hr``) once per step."""

    def __init__(self, reference: nn.RNNBase, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.layers = reference.num_layers
        self.directions = 2 if reference.bidirectional else 1
        self.hidden = reference.hidden_size
        self.maps = nn.ModuleDict()
        for name, param in reference.named_parameters():
            if name.startswith("weight_"):
                suffix = name.removeprefix("weight_")
                bias = getattr(reference, f"bias_{suffix}", None)
                layer = nn.Linear(param.shape[1], param.shape[0], bias=bias is not None)
                layer.weight.data.copy_(param.detach())
                if bias is not None:
                    layer.bias.data.copy_(bias.detach())
                self.maps[suffix] = layer

    def forward(self, rows: Tensor) -> Tensor:
        for layer in range(self.layers):
            outputs = []
            for direction in range(self.directions):
                suffix = f"l{layer}" + ("_reverse" if direction else "")
                outputs.append(self._direction(rows, suffix, reverse=direction == 1))
            rows = torch.cat(outputs, dim=-1)
        return rows

    def _direction(self, rows: Tensor, suffix: str, reverse: bool) -> Tensor:
        projection = self.maps[f"hr_{suffix}"] if f"hr_{suffix}" in self.maps else None
        width = self.hidden if projection is None else projection.out_features
        hidden = rows.new_zeros(rows.shape[0], width)
        cell = rows.new_zeros(rows.shape[0], self.hidden) if self.kind == "lstm" else None
        from_input = self.maps[f"ih_{suffix}"](rows)
        order = range(rows.shape[1] - 1, -1, -1) if reverse else range(rows.shape[1])
        outputs = {}
        for step in order:
            from_hidden = self.maps[f"hh_{suffix}"](hidden)
            hidden, cell = documented_step(
                self.kind, from_input[:, step], from_hidden, hidden, cell
            )
            if projection is not None:
                hidden = projection(hidden)
            outputs[step] = hidden
        return torch.stack([outputs[step] for step in range(rows.shape[1])], dim=1)


class SequenceClassifier(nn.Module):
    def __init__(self, recurrent: nn.Module, width: int, batch_first: bool = True) -> None:
        super().__init__()
        self.recurrent = recurrent
        self.batch_first = batch_first
        self.head = nn.Linear(width, 3)

    def forward(self, rows: Tensor) -> Tensor:
        inputs = rows if self.batch_first else rows.transpose(0, 1)
        output = self.recurrent(inputs)
        output = output[0] if isinstance(output, tuple) else output
        if not self.batch_first and not isinstance(self.recurrent, LinearRecurrent):
            output = output.transpose(0, 1)
        return self.head(output.mean(dim=1))  # every step's output: no degenerate factor


def twin_models(kind: str, **options) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    batch_first = options.pop("batch_first", True)
    recurrent = MODULES[kind](
        5,
        6,
        batch_first=batch_first,
        **({"nonlinearity": "relu"} if kind == "rnn_relu" else {}),
        **options,
    ).double()
    directions = 2 if recurrent.bidirectional else 1
    width = directions * (recurrent.proj_size or recurrent.hidden_size)
    model = SequenceClassifier(recurrent, width, batch_first).double()
    twin = SequenceClassifier(LinearRecurrent(recurrent, kind), width).double()
    twin.head.load_state_dict(model.head.state_dict())
    return model, twin


def batches(steps: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs = torch.randn(8, 4, 5, generator=generator, dtype=torch.float64)
        yield inputs, torch.randint(0, 3, (8,), generator=generator)


def train(model: nn.Module, preconditioner=KFAC, steps: int = 6, **options) -> KFAC:
    fisher_type = options.setdefault("fisher_type", "empirical")
    if fisher_type != "empirical":
        options["likelihood"] = "categorical"
    precond = preconditioner(
        model,
        damping=0.1,
        inv_update_interval=2,
        generator=torch.Generator().manual_seed(3),
        **options,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    for inputs, targets in batches(steps):
        optimizer.zero_grad()
        output = model(inputs)
        if fisher_type != "empirical":
            precond.sample_backward(output)
        nn.functional.cross_entropy(output, targets).backward()
        precond.step()
        optimizer.step()
    return precond


def assert_same_weights(model: nn.Module, twin: nn.Module, atol: float = 1e-10) -> None:
    for name, param in model.recurrent.named_parameters():
        kind, suffix = name.split("_", 1)
        twin_param = getattr(twin.recurrent.maps[suffix], kind)
        torch.testing.assert_close(param, twin_param, atol=atol, rtol=0)
    torch.testing.assert_close(model.head.weight, twin.head.weight, atol=atol, rtol=0)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_recurrent_layer_steps_as_its_linear_twin(kind, preconditioner, fisher_type):
    model, twin = twin_models(kind)
    precond = train(model, preconditioner, fisher_type=fisher_type, factor_update_interval=2)
    train(twin, preconditioner, fisher_type=fisher_type, factor_update_interval=2)
    assert [state.name for state in precond.layers] == [
        "recurrent.ih_l0",
        "recurrent.hh_l0",
        "head",
    ]
    assert_same_weights(model, twin)


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("lstm", {"num_layers": 2, "bidirectional": True, "proj_size": 3}),
        ("lstm", {"num_layers": 2, "bias": False, "batch_first": False}),
        ("gru", {"num_layers": 2, "bidirectional": True, "batch_first": False}),
        ("rnn_tanh", {"bidirectional": True}),
    ],
)
@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_deep_and_bidirectional_layers_step_as_their_linear_twins(kind, options, fisher_type):
    """K-FAC only: these layers' factors have (near-)null spaces (the three logits' gradients
    span two directions), in which EKFAC's re-estimated diagonal depends on the eigenbasis
    that rounding picks, as it would for the ``nn.Linear`` twin computed in another order."""
    model, twin = twin_models(kind, **options)
    train(model, fisher_type=fisher_type)
    train(twin, fisher_type=fisher_type)
    assert_same_weights(model, twin)


def test_reduce_steps_as_the_linear_twin():
    model, twin = twin_models("lstm")
    train(model, kfac_approx="reduce", damping_mode="factored")
    train(twin, kfac_approx="reduce", damping_mode="factored")
    assert_same_weights(model, twin)


def test_preconditioning_changes_the_recurrent_steps():
    """Against plain SGD: the recurrent weights' gradients are preconditioned, not passed."""
    model, _ = twin_models("lstm")
    plain = copy.deepcopy(model)
    train(model, layers=[model.head])
    preconditioned = copy.deepcopy(plain)
    train(preconditioned)
    sgd_steps = dict(model.recurrent.named_parameters())
    for name, param in preconditioned.recurrent.named_parameters():
        assert (param - sgd_steps[name]).abs().max() > 1e-3, name


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_cell_in_a_loop_steps_as_its_linear_twin(kind):
    torch.manual_seed(0)
    cell = CELLS[kind](5, 6).double()

    class CellLoop(nn.Module):
        def __init__(self, cell: nn.Module) -> None:
            super().__init__()
            self.cell, self.head = cell, nn.Linear(6, 3).double()

        def forward(self, rows: Tensor) -> Tensor:
            state, outputs = None, []
            for step in range(rows.shape[1]):
                state = self.cell(rows[:, step], state)
                outputs.append(state[0] if kind == "lstm" else state)
            return self.head(torch.stack(outputs, dim=1).mean(dim=1))

    model = CellLoop(cell)
    reference = MODULES[kind](5, 6, batch_first=True).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(reference, f"{name}_l0").copy_(getattr(cell, name))
    twin = SequenceClassifier(LinearRecurrent(reference, kind), 6).double()
    twin.head.load_state_dict(model.head.state_dict())
    precond = train(model, fisher_type="mc", factor_update_interval=2)
    train(twin, fisher_type="mc", factor_update_interval=2)
    assert [state.name for state in precond.layers] == ["cell.ih", "cell.hh", "head"]
    for name in ("ih", "hh"):
        twin_map = twin.recurrent.maps[f"{name}_l0"]
        torch.testing.assert_close(
            getattr(cell, f"weight_{name}"), twin_map.weight, atol=1e-10, rtol=0
        )
        torch.testing.assert_close(getattr(cell, f"bias_{name}"), twin_map.bias, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "module",
    [
        nn.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3),
        nn.GRU(5, 6, num_layers=2, batch_first=True, bias=False),
        nn.RNN(5, 6, nonlinearity="relu", bidirectional=True),
        nn.LSTMCell(5, 6),
        nn.GRUCell(5, 6),
        nn.RNNCell(5, 6, bias=False),
    ],
    ids=lambda module: type(module).__name__,
)
@pytest.mark.parametrize("batched", [True, False])
def test_recording_forward_equals_the_fused_forward(module, batched):
    """Outputs, final states and gradients of the unrolled recording forward against the
    fused kernel's, batched and unbatched."""
    module = copy.deepcopy(module).double()
    torch.manual_seed(1)
    cell = isinstance(module, nn.RNNCellBase)
    shape = {(True, True): (3, 5), (True, False): (5,), (False, True): (4, 3, 5)}.get(
        (cell, batched), (4, 5)
    )
    inputs = torch.randn(*shape, dtype=torch.float64)

    def run() -> list[Tensor]:
        module.zero_grad()
        output = module(inputs)
        flat = torch.cat([t.flatten() for t in _tensors(output)])
        (flat * torch.linspace(-1, 1, len(flat), dtype=flat.dtype)).sum().backward()
        return [flat.detach()] + [param.grad.clone() for param in module.parameters()]

    fused = run()
    precond = KFAC(module)
    recorded = run()
    assert precond.layers[0].input_count > 0  # the recording forward ran
    for ours, reference in zip(recorded, fused, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-13, rtol=1e-12)


def _tensors(output) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    return [tensor for item in output for tensor in _tensors(item)]


def test_layer_selection():
    model, _ = twin_models("lstm", num_layers=2)
    by_module = KFAC(model, layers=[model.recurrent])
    assert [state.name for state in by_module.layers] == [
        "recurrent.ih_l0",
        "recurrent.hh_l0",
        "recurrent.ih_l1",
        "recurrent.hh_l1",
    ]
    by_module.remove()
    assert [state.name for state in KFAC(model, layers=[nn.Conv2d, nn.Linear]).layers][-1] == "head"
    with pytest.raises(ValueError, match="no Conv2d layer"):
        KFAC(model, layers=[nn.Conv2d])
    model.recurrent.weight_hh_l1.requires_grad_(False)
    names = [state.name for state in KFAC(model).layers]
    assert "recurrent.hh_l1" not in names and "recurrent.ih_l1" in names
    model.recurrent.requires_grad_(False)
    with pytest.raises(ValueError, match="'recurrent' cannot be preconditioned"):
        KFAC(model, layers=[model.recurrent])


def test_parametrized_recurrent_weight_is_left_out():
    model, _ = twin_models("gru")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        nn.utils.parametrizations.weight_norm(model.recurrent, name="weight_hh_l0")
    names = [state.name for state in KFAC(model).layers]
    assert names == ["recurrent.ih_l0", "head"]


def test_state_round_trip_resumes_identically():
    model, _ = twin_models("gru", bidirectional=True)
    resumed = copy.deepcopy(model)
    steps = list(batches(6))
    precond = KFAC(model, damping=0.1, inv_update_interval=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)

    def train_steps(model, optimizer, precond, chunk):
        for inputs, targets in chunk:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            precond.step()
            optimizer.step()

    train_steps(model, optimizer, precond, steps[:3])
    buffer = io.BytesIO()
    torch.save({"precond": precond.state_dict(), "model": model.state_dict()}, buffer)
    train_steps(model, optimizer, precond, steps[3:])
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed.load_state_dict(saved["model"])
    other = KFAC(resumed, damping=0.1, inv_update_interval=2)
    other.load_state_dict(saved["precond"])
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.3)
    train_steps(resumed, resumed_optimizer, other, steps[3:])
    for ours, theirs in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_a_recurrent_weight_used_outside_the_layer_is_refused():
    """The weight-locality check covers the recurrent weights: a decoder reusing the
    hidden-to-hidden weight adds gradient that the recorded calls do not describe."""

    class Reused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.recurrent = nn.GRU(5, 6, batch_first=True).double()

        def forward(self, rows: Tensor) -> Tensor:
            output, _ = self.recurrent(rows)
            return nn.functional.linear(output, self.recurrent.weight_hh_l0[:6]).sum(dim=1)

    model = Reused()
    precond = KFAC(model)
    inputs, targets = next(batches(1))
    with pytest.raises(ValueError, match=r"layer 'recurrent\.hh_l0' is also used outside"):
        nn.functional.cross_entropy(model(inputs)[:, :3], targets).backward()
        precond.step()
