"""K-FAC and EKFAC on recurrent layers fed a ``PackedSequence`` (variable-length sequences).

The oracle is a masked twin written from scratch: the same weights applied with
``F.linear`` in a loop over the padded batch, each sequence running exactly its own steps (a
``torch.where`` keeps the state of a finished sequence; the reverse direction starts from
``h0`` at the sequence's own last step). Autograd of its per-sample loss gives the output
gradient of every (sample, step) use of a weight, and the factors are formed by hand from
the valid uses only: ``A`` the mean of ``[a, 1][a, 1]ᵀ`` over the valid rows, ``G`` the sum
of ``g gᵀ`` over them divided by the number of sequences; the K-FAC step is then
``(G ⊗ A + λI)⁻¹ ∇W`` from their eigendecompositions, EKFAC's from the per-sample gradients
``Σ_t g_t [a_t, 1]ᵀ`` projected on the preconditioner's eigenbasis."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn import functional
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from natgrad.curvature.kfac_capture import backward_vectors
from natgrad.curvature.likelihoods import get_likelihood
from natgrad.optim import EKFAC, KFAC

MODULES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}
UNEQUAL = [5, 2, 1, 5, 3, 4]


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


def make_recurrent(kind: str, inputs: int = 3, hidden: int = 4, **options) -> nn.RNNBase:
    extra = {"nonlinearity": "relu"} if kind == "rnn_relu" else {}
    return MODULES[kind](inputs, hidden, **extra, **options).double()


class PackedClassifier(nn.Module):
    """Packs a padded batch-first batch by its lengths, runs the recurrent layer on it and
    classifies each sequence by the mean of its outputs over its own steps."""

    def __init__(self, recurrent: nn.RNNBase, batch_first: bool = True) -> None:
        super().__init__()
        self.recurrent = recurrent
        self.batch_first = batch_first
        directions = 2 if recurrent.bidirectional else 1
        width = directions * (recurrent.proj_size or recurrent.hidden_size)
        self.head = nn.Linear(width, 3).double()

    def forward(self, inputs: Tensor, lengths: Tensor) -> Tensor:
        rows = inputs if self.batch_first else inputs.transpose(0, 1)
        packed = pack_padded_sequence(
            rows, lengths, batch_first=self.batch_first, enforce_sorted=False
        )
        output, _ = self.recurrent(packed)
        padded, _ = pad_packed_sequence(output, batch_first=True, total_length=inputs.shape[1])
        return self.head(padded.sum(dim=1) / lengths.unsqueeze(1).to(padded.dtype))


class MaskedTwin:
    """The recurrent layer of a :class:`PackedClassifier` with its weights applied by
    ``F.linear`` at every step of the padded batch, each use kept as ``(input, output,
    valid)``: ``valid`` marks the samples whose sequence runs at that step."""

    def __init__(self, model: PackedClassifier, kind: str) -> None:
        self.model, self.kind = model, kind
        self.uses: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {}

    def logits(self, inputs: Tensor, lengths: Tensor) -> Tensor:
        recurrent = self.model.recurrent
        valid = torch.arange(inputs.shape[1]) < lengths.unsqueeze(1)  # (N, T)
        rows = inputs
        for layer in range(recurrent.num_layers):
            outputs = []
            for direction in range(2 if recurrent.bidirectional else 1):
                suffix = f"l{layer}" + ("_reverse" if direction else "")
                outputs.append(self._direction(rows, valid, suffix, reverse=direction == 1))
            rows = torch.cat(outputs, dim=-1)
        mean = rows.sum(dim=1) / lengths.unsqueeze(1).to(rows.dtype)
        return functional.linear(mean, self.model.head.weight, self.model.head.bias)

    def _linear(self, name: str, rows: Tensor, valid: Tensor) -> Tensor:
        recurrent = self.model.recurrent
        weight = getattr(recurrent, f"weight_{name}")
        output = functional.linear(rows, weight, getattr(recurrent, f"bias_{name}", None))
        self.uses.setdefault(name, []).append((rows, output, valid))
        return output

    def _direction(self, rows: Tensor, valid: Tensor, suffix: str, reverse: bool) -> Tensor:
        recurrent = self.model.recurrent
        samples, steps = valid.shape
        hidden = rows.new_zeros(samples, recurrent.proj_size or recurrent.hidden_size)
        cell = rows.new_zeros(samples, recurrent.hidden_size) if self.kind == "lstm" else None
        outputs = [rows[:, 0]] * steps
        for step in range(steps - 1, -1, -1) if reverse else range(steps):
            active = valid[:, step]
            new_hidden, new_cell = documented_step(
                self.kind,
                self._linear(f"ih_{suffix}", rows[:, step], active),
                self._linear(f"hh_{suffix}", hidden, active),
                hidden,
                cell,
            )
            if recurrent.proj_size:
                new_hidden = self._linear(f"hr_{suffix}", new_hidden, active)
            keep = active.unsqueeze(1)
            hidden = torch.where(keep, new_hidden, hidden)
            cell = None if cell is None else torch.where(keep, new_cell, cell)
            outputs[step] = torch.where(keep, new_hidden, torch.zeros_like(new_hidden))
        return torch.stack(outputs, dim=1)


class Brute:
    """Factors, per-sample gradients and mean-loss gradient of each recurrent weight, by brute
    force from a :class:`MaskedTwin`: ``vectors`` ``(N, 3)`` are back-propagated from the
    logits for ``G`` (the per-sample loss gradients for the empirical Fisher)."""

    def __init__(self, model: PackedClassifier, kind: str, inputs, lengths, targets, vectors):
        twin = MaskedTwin(model, kind)
        logits = twin.logits(inputs, lengths)
        if vectors is None:
            vectors = torch.autograd.grad(
                functional.cross_entropy(logits, targets, reduction="sum"),
                logits,
                retain_graph=True,
            )[0]
        self.logits = logits.detach()
        names = list(twin.uses)
        outputs = [output for name in names for _, output, _ in twin.uses[name]]
        output_grads = iter(torch.autograd.grad(logits, outputs, vectors, retain_graph=True))
        params = [self.param(model, name, part) for name in names for part in ("weight", "bias")]
        mean_grads = iter(
            torch.autograd.grad(
                functional.cross_entropy(logits, targets),
                [param for param in params if param is not None],
            )
        )
        self.samples = len(lengths)
        self.uses = {}
        self.grads = {}
        for name in names:
            self.uses[name] = [
                (self._features(model, name, rows), next(output_grads), valid)
                for rows, _, valid in twin.uses[name]
            ]
            weight_grad = next(mean_grads)
            if self.param(model, name, "bias") is not None:
                weight_grad = torch.cat([weight_grad, next(mean_grads).unsqueeze(1)], dim=1)
            self.grads[name] = weight_grad

    @staticmethod
    def param(model: PackedClassifier, name: str, part: str) -> Tensor | None:
        return getattr(model.recurrent, f"{part}_{name}", None)

    def _features(self, model: PackedClassifier, name: str, rows: Tensor) -> Tensor:
        rows = rows.detach()
        if self.param(model, name, "bias") is None:
            return rows
        return torch.cat([rows, torch.ones_like(rows[:, :1])], dim=1)

    def factors(self, name: str, reduce: bool = False) -> tuple[Tensor, Tensor]:
        """``(G, A)`` of weight ``name`` from its valid uses (``reduce`` and ``ih``: each
        sample's inputs averaged and output gradients summed over its own steps)."""
        uses = self.uses[name]
        if reduce and name.startswith("ih"):
            valid = torch.stack([use[2] for use in uses], dim=1).unsqueeze(2)  # (N, T, 1)
            inputs = (torch.stack([use[0] for use in uses], dim=1) * valid).sum(dim=1)
            grads = (torch.stack([use[1] for use in uses], dim=1) * valid).sum(dim=1)
            means = inputs / valid.sum(dim=1)
            return grads.T @ grads / self.samples, means.T @ means / self.samples
        inputs = torch.cat([features[valid] for features, _, valid in uses])
        grads = torch.cat([grad[valid] for _, grad, valid in uses])
        return grads.T @ grads / self.samples, inputs.T @ inputs / len(inputs)

    def per_sample_gradients(self, name: str) -> Tensor:
        """``Σ_t g_nt [a_nt, 1]ᵀ`` over the valid uses, ``(N, d_out, d_in + 1)``."""
        return sum(
            torch.einsum("no,ni->noi", grad * valid.unsqueeze(1), features)
            for features, grad, valid in self.uses[name]
        )


def kfac_step(output_factor: Tensor, input_factor: Tensor, grad: Tensor, damping: float):
    """``(G ⊗ A + λI)⁻¹ ∇W`` for ``∇W`` ``(d_out, d_in)``, from float64 eigendecompositions."""
    output_values, output_vectors = torch.linalg.eigh(output_factor)
    input_values, input_vectors = torch.linalg.eigh(input_factor)
    scale = torch.outer(output_values.clamp(min=0), input_values.clamp(min=0)) + damping
    projected = output_vectors.T @ grad @ input_vectors
    return output_vectors @ (projected / scale) @ input_vectors.T


def ekfac_step(state, brute: Brute, name: str, output_factor, input_factor, decay, damping):
    """EKFAC's step in the preconditioner's eigenbasis (refreshed this step): eigenvalues
    ``decay · (K-FAC's) + (1 − decay) · mean_n (U_Gᵀ ∇W_n U_A)²``."""
    output_vectors, input_vectors = state.output_eigen.vectors, state.input_eigen.vectors
    kfac_values = torch.outer(
        torch.diagonal(output_vectors.T @ output_factor @ output_vectors).clamp(min=0),
        torch.diagonal(input_vectors.T @ input_factor @ input_vectors).clamp(min=0),
    )
    projected = output_vectors.T @ brute.per_sample_gradients(name) @ input_vectors
    values = decay * kfac_values + (1 - decay) * projected.square().mean(dim=0)
    step = output_vectors.T @ brute.grads[name] @ input_vectors / (values + damping)
    return output_vectors @ step @ input_vectors.T


def preconditioned(model: PackedClassifier, name: str) -> Tensor:
    weight = getattr(model.recurrent, f"weight_{name}").grad
    bias = getattr(model.recurrent, f"bias_{name}", None)
    return weight if bias is None else torch.cat([weight, bias.grad.unsqueeze(1)], dim=1)


def batch(lengths: list[int], seed: int, width: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(len(lengths), max(lengths), width, generator=generator)
    targets = torch.randint(0, 3, (len(lengths),), generator=generator)
    return inputs.double(), torch.tensor(lengths), targets


def check_against_brute_force(
    model: PackedClassifier,
    kind: str,
    preconditioner=KFAC,
    fisher_type: str = "empirical",
    lengths: list[int] = UNEQUAL,
    steps: int = 3,
    kfac_approx: str = "expand",
) -> None:
    """Train ``steps`` steps, checking at each the factors (moving averages) and the
    preconditioned gradients of every recurrent weight against the masked twin's."""
    decay, damping = 0.5, 0.1
    generator = torch.Generator().manual_seed(7)
    options = {"likelihood": "categorical"} if fisher_type != "empirical" else {}
    precond = preconditioner(
        model,
        fisher_type=fisher_type,
        factor_decay=decay,
        damping=damping,
        inv_update_interval=1,
        kfac_approx=kfac_approx,
        generator=generator,
        **options,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    states = {state.name.removeprefix("recurrent."): state for state in precond.layers}
    expected_factors: dict[str, tuple[Tensor, Tensor]] = {}
    for step in range(steps):
        inputs, lengths_tensor, targets = batch(lengths, seed=step)
        optimizer.zero_grad()
        logits = model(inputs, lengths_tensor)
        vectors = None
        if fisher_type != "empirical":
            sampler = torch.Generator().set_state(generator.get_state())
            likelihood = get_likelihood("categorical")
            vectors = backward_vectors(logits.detach(), likelihood, "mc", None, 1, sampler)[0]
            precond.sample_backward(logits)
        functional.cross_entropy(logits, targets).backward()
        brute = Brute(model, kind, inputs, lengths_tensor, targets, vectors)
        torch.testing.assert_close(logits, brute.logits, atol=1e-12, rtol=0)
        precond.step()
        for name in brute.uses:
            fresh = brute.factors(name, reduce=kfac_approx == "reduce")
            previous = expected_factors.get(name, fresh)
            factors = tuple(
                decay * old + (1 - decay) * new for old, new in zip(previous, fresh, strict=True)
            )
            expected_factors[name] = factors
            state = states[name]
            torch.testing.assert_close(state.output_factor, factors[0], atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(state.input_factor, factors[1], atol=1e-12, rtol=1e-10)
            if preconditioner is EKFAC:
                expected = ekfac_step(state, brute, name, *factors, decay, damping)
            else:
                expected = kfac_step(*factors, brute.grads[name], damping)
            torch.testing.assert_close(preconditioned(model, name), expected, atol=1e-10, rtol=0)
        optimizer.step()


TWIN_CASES = [
    ("lstm", {}),
    ("lstm", {"proj_size": 2}),
    ("gru", {}),
    ("rnn_tanh", {}),
    ("rnn_relu", {}),
    ("lstm", {"num_layers": 2, "bidirectional": True}),
    ("gru", {"num_layers": 2, "bidirectional": True, "bias": False}),
]


@pytest.mark.parametrize(("kind", "options"), TWIN_CASES)
@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_packed_layer_steps_as_the_masked_twin(kind, options, preconditioner, fisher_type):
    torch.manual_seed(0)
    model = PackedClassifier(make_recurrent(kind, **options))
    check_against_brute_force(model, kind, preconditioner, fisher_type)


@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
def test_reduce_averages_each_sequence_over_its_own_steps(preconditioner):
    """K-FAC-reduce: ``W_ih``'s inputs averaged over each sequence's own steps and its output
    gradients summed over them; ``W_hh``, called once per step, expands."""
    torch.manual_seed(0)
    model = PackedClassifier(make_recurrent("lstm", bidirectional=True))
    check_against_brute_force(model, "lstm", preconditioner, kfac_approx="reduce")


@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=6),
    kind=st.sampled_from(["lstm", "gru", "rnn_tanh"]),
    bidirectional=st.booleans(),
)
def test_random_lengths_step_as_the_masked_twin(lengths, kind, bidirectional):
    torch.manual_seed(0)
    model = PackedClassifier(make_recurrent(kind, bidirectional=bidirectional))
    check_against_brute_force(model, kind, lengths=lengths, steps=2)


def test_packed_weights_record_their_rows_and_samples():
    """``A`` counts the sequences' real steps, ``G`` the sequences, and no warning is given
    (before, a packed sequence ran fused and recorded nothing)."""
    torch.manual_seed(0)
    model = PackedClassifier(make_recurrent("lstm", proj_size=2))
    precond = KFAC(model)
    inputs, lengths, targets = batch(UNEQUAL, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        functional.cross_entropy(model(inputs, lengths), targets).backward()
        counts = {state.name: (state.input_count, state.output_count) for state in precond.layers}
        precond.step()
    rows, samples = float(sum(UNEQUAL)), float(len(UNEQUAL))
    assert counts == {
        "recurrent.ih_l0": (rows, samples),
        "recurrent.hh_l0": (rows, samples),
        "recurrent.hr_l0": (rows, samples),
        "head": (samples, samples),
    }


FORWARD_CASES = [
    ("lstm", {}),
    ("lstm", {"proj_size": 2, "num_layers": 2, "bidirectional": True}),
    ("lstm", {"bias": False, "batch_first": True}),
    ("gru", {"num_layers": 2, "bidirectional": True, "batch_first": True}),
    ("rnn_tanh", {"bidirectional": True}),
    ("rnn_relu", {"num_layers": 3}),
]


@pytest.mark.parametrize(("kind", "options"), FORWARD_CASES)
@pytest.mark.parametrize("lengths", [[4, 4, 4], [1, 6, 2, 6, 3], [3, 2, 1], [5]])
@pytest.mark.parametrize("initial_state", [False, True])
def test_recording_forward_equals_the_fused_forward(kind, options, lengths, initial_state):
    """Output data, final states and all gradients (inputs, initial states, weights) of the
    unrolled packed forward against the fused kernel's; unsorted and sorted lengths."""
    torch.manual_seed(1)
    module = make_recurrent(kind, **options)
    batch_first = module.batch_first
    padded = torch.randn(len(lengths), max(lengths), 3, dtype=torch.float64)
    padded = padded if batch_first else padded.transpose(0, 1)
    directions = 2 if module.bidirectional else 1
    layers = directions * module.num_layers
    width = module.proj_size or module.hidden_size
    initial = None
    if initial_state:
        hidden0 = torch.randn(layers, len(lengths), width, dtype=torch.float64)
        cell0 = torch.randn(layers, len(lengths), module.hidden_size, dtype=torch.float64)
        initial = (hidden0, cell0) if kind == "lstm" else hidden0

    def run() -> list[Tensor]:
        module.zero_grad()
        leaves = [padded.clone().requires_grad_()]
        state = None
        if initial is not None:
            state = tuple(t.clone().requires_grad_() for t in _tensors(initial))
            leaves += state
            state = state if kind == "lstm" else state[0]
        packed = pack_padded_sequence(
            leaves[0], lengths, batch_first=batch_first, enforce_sorted=False
        )
        output, final = module(packed, state)
        flat = torch.cat([t.flatten() for t in [output.data, *_tensors(final)]])
        (flat * torch.linspace(-1, 1, len(flat), dtype=flat.dtype)).sum().backward()
        grads = [leaf.grad for leaf in leaves] + [param.grad for param in module.parameters()]
        return [flat.detach(), *grads]

    fused = run()
    precond = KFAC(module)
    recorded = run()
    assert all(state.input_count > 0 for state in precond.layers)  # the recording forward ran
    for ours, reference in zip(recorded, fused, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-12)


def _tensors(output) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    return [tensor for item in output for tensor in _tensors(item)]


class PaddedClassifier(nn.Module):
    """:class:`PackedClassifier` on equal lengths without packing."""

    def __init__(self, packed: PackedClassifier) -> None:
        super().__init__()
        self.recurrent, self.head = packed.recurrent, packed.head

    def forward(self, inputs: Tensor, lengths: Tensor) -> Tensor:
        output, _ = self.recurrent(inputs)
        return self.head(output.mean(dim=1))


@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "exact"])
def test_equal_lengths_packed_step_as_padded(preconditioner, kfac_approx, fisher_type):
    torch.manual_seed(0)
    packed = PackedClassifier(make_recurrent("lstm", bidirectional=True, batch_first=True))
    padded = PaddedClassifier(copy.deepcopy(packed))
    options = {"likelihood": "categorical"} if fisher_type != "empirical" else {}
    for model in (packed, padded):
        precond = preconditioner(
            model,
            fisher_type=fisher_type,
            damping=0.1,
            inv_update_interval=2,
            kfac_approx=kfac_approx,
            generator=torch.Generator().manual_seed(3),
            **options,
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
        for step in range(4):
            inputs, lengths, targets = batch([4] * 6, seed=step)
            optimizer.zero_grad()
            logits = model(inputs, lengths)
            if fisher_type != "empirical":
                precond.sample_backward(logits)
            functional.cross_entropy(logits, targets).backward()
            precond.step()
            optimizer.step()
    for ours, theirs in zip(packed.parameters(), padded.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
