"""K-FAC and EKFAC record the calls of a recurrent layer's ``W_hh`` (and ``W_hr``) at all the
steps of an unrolled loop together (:class:`~natgrad.optim.kfac_recurrent.StepCalls`): one
Gram product per factor and one EKFAC pair per backward vector, instead of one per step.

Oracles, in float64: the network written with ``nn.Linear`` layers called at every step, each
call recorded on its own (padded sequences), and the masked twin's uses of every weight by
brute force (packed sequences). The statistics of a recording step before they are folded
(sums, counts, EKFAC's per-sample gradients and sample counts) must be theirs to rounding, for
the empirical, Monte-Carlo (two samples) and exact Fisher, expand and reduce, with gradient
accumulation; a step dropped or counted twice changes them. The number of Gram products and of
zero-padded sequence gradients must not grow with the number of steps."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kfac_recurrent import twin_models
from test_kfac_recurrent_packed import UNEQUAL, Brute, PackedClassifier, batch, make_recurrent
from torch import nn
from torch.nn import functional
from torch.utils._python_dispatch import TorchDispatchMode

from natgrad.curvature.kfac_capture import backward_vectors, per_sample_gradients
from natgrad.curvature.likelihoods import get_likelihood
from natgrad.optim import EKFAC, KFAC
from natgrad.optim.kfac_layers import KroneckerLayerState, LayerState
from natgrad.optim.kfac_recurrent import StepCalls, StepRows


def build(model: nn.Module, preconditioner, fisher_type: str, **options) -> KFAC:
    if fisher_type != "empirical":
        options["likelihood"] = "categorical"
    return preconditioner(
        model, fisher_type=fisher_type, generator=torch.Generator().manual_seed(3), **options
    )


def record(model: nn.Module, precond: KFAC, micro_batches: int, seed: int = 1) -> None:
    """The forward and backward passes of one recording step, ``micro_batches`` of them."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(micro_batches):
        inputs = torch.randn(8, 4, 5, generator=generator, dtype=torch.float64)
        targets = torch.randint(0, 3, (8,), generator=generator)
        output = model(inputs)
        if precond.fisher_type != "empirical":
            precond.sample_backward(output)
        (functional.cross_entropy(output, targets) / micro_batches).backward()


def recorded(state: LayerState) -> dict[str, object]:
    """The statistics awaiting the fold: sums and counts, EKFAC's per-sample gradients of each
    pass and vector, and the samples each counts."""
    input_sum, output_sum, counts = state.statistics()
    pairs = [pair.joined() for pair in state.pairs]
    return {
        "input_sum": input_sum,
        "output_sum": output_sum,
        "counts": counts,
        "per_sample": [per_sample_gradients(*pair) for pair in pairs],
        "samples": [pair.samples for pair in state.pairs],
    }


def by_weight(precond: KFAC) -> dict[str, LayerState]:
    return {state.name.rsplit(".", 1)[-1]: state for state in precond.layers}


def assert_same_statistics(state: LayerState, expected: LayerState) -> None:
    ours, theirs = recorded(state), recorded(expected)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, atol=1e-12, rtol=1e-10, msg=key)


@pytest.mark.parametrize(
    ("kind", "options"),
    [("lstm", {"proj_size": 3, "bidirectional": True}), ("gru", {}), ("rnn_tanh", {})],
)
@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "exact"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_padded_steps_record_the_linear_twins_calls(
    kind, options, fisher_type, kfac_approx, micro_batches
):
    model, twin = twin_models(kind, **options)
    settings = {"kfac_approx": kfac_approx, "accumulation_steps": micro_batches}
    if fisher_type == "mc":
        settings["mc_samples"] = 2
    precond = build(model, EKFAC, fisher_type, **settings)
    reference = build(twin, EKFAC, fisher_type, **settings)
    record(model, precond, micro_batches)
    record(twin, reference, micro_batches)
    states, expected = by_weight(precond), by_weight(reference)
    assert states.keys() == expected.keys()
    for name, state in states.items():
        vectors = {"empirical": 1, "mc": 2, "exact": 3}[fisher_type]
        assert len(state.pairs) == micro_batches * vectors, name
        assert_same_statistics(state, expected[name])
    precond.step()
    reference.step()
    for name, state in states.items():
        torch.testing.assert_close(state.output_factor, expected[name].output_factor)
        torch.testing.assert_close(state.input_factor, expected[name].input_factor)


@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_packed_steps_record_the_valid_uses_of_every_vector(preconditioner, kfac_approx):
    """Unequal lengths and the exact Fisher (three backward vectors): ``W_hh``'s sums are those
    of its valid uses under every vector, its per-sample gradients those of each vector."""
    torch.manual_seed(0)
    model = PackedClassifier(make_recurrent("lstm", proj_size=2))
    precond = build(model, preconditioner, "exact", kfac_approx=kfac_approx)
    inputs, lengths, targets = batch(UNEQUAL, seed=0)
    logits = model(inputs, lengths)
    precond.sample_backward(logits)
    functional.cross_entropy(logits, targets).backward()
    vectors = backward_vectors(logits.detach(), get_likelihood("categorical"), "exact")
    brutes = [Brute(model, "lstm", inputs, lengths, targets, vector) for vector in vectors]
    states = by_weight(precond)
    for name in ("hh_l0", "hr_l0"):
        uses = brutes[0].uses[name]
        features = torch.cat([features[valid] for features, _, valid in uses])
        grads = [
            torch.cat([grad[valid] for _, grad, valid in brute.uses[name]]) for brute in brutes
        ]
        stats = recorded(states[name])
        torch.testing.assert_close(stats["input_sum"], features.T @ features)
        torch.testing.assert_close(stats["output_sum"], sum(grad.T @ grad for grad in grads))
        assert stats["counts"].tolist() == [len(features), len(UNEQUAL)]
        if preconditioner is EKFAC:
            order = torch.sort(lengths, descending=True).indices  # the packed order
            expected = [brute.per_sample_gradients(name)[order] for brute in brutes]
            torch.testing.assert_close(stats["per_sample"], expected)
            assert stats["samples"] == [len(UNEQUAL), 0, 0]


class OpCounter(TorchDispatchMode):
    """Counts the Gram products (``addmm_``) and the gradients of a step's slice of a tensor of
    ``numel`` elements back-propagated as a zero-padded copy of the whole tensor."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel = numel
        self.grams = self.padded = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.grams += name == "addmm_"
        if name in ("select_backward", "slice_backward"):
            self.padded += output.numel() == self.numel
        return output


def recording_ops(steps: int, packed: bool) -> tuple[int, int]:
    """:class:`OpCounter`'s counts for one recording forward and backward pass of an LSTM over
    ``steps`` steps (padded, or packed with unequal lengths), the tensor of ``numel`` elements
    being the input projection ``W_ih x`` of all steps."""
    torch.manual_seed(0)
    if packed:
        model = PackedClassifier(make_recurrent("lstm", proj_size=2))
        inputs, lengths, targets = batch([steps, steps - 1, 2, steps], seed=0)
        run = [inputs, lengths]
        numel = int(lengths.sum()) * 16
    else:
        model = twin_models("lstm")[0]
        generator = torch.Generator().manual_seed(0)
        run = [torch.randn(8, steps, 5, generator=generator, dtype=torch.float64)]
        targets = torch.randint(0, 3, (8,), generator=generator)
        numel = 8 * steps * 24
    precond = KFAC(model)
    for _ in range(2):  # the first recording pass also checks the weights' locality
        with OpCounter(numel) as counter:
            functional.cross_entropy(model(*run), targets).backward()
        precond.discard_statistics()
    return counter.grams, counter.padded


@pytest.mark.parametrize("packed", [False, True])
def test_recording_work_does_not_grow_per_step(packed):
    """The unrolled loop adds no Gram product per step, and no step's slice of the input
    projection is back-propagated as a zero-padded copy of the whole projection (quadratic in
    the number of steps)."""
    grams, padded = recording_ops(3, packed)
    assert recording_ops(9, packed) == (grams, 0)
    assert padded == 0


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5).map(sorted).map(lambda s: s[::-1]),
    arrived=st.lists(st.booleans(), min_size=5, max_size=5),
    reduce=st.booleans(),
)
def test_steps_without_gradient_count_as_zero_gradients(sizes, arrived, reduce):
    """A backward pass that reaches only some steps is recorded when the statistics are read
    (``KFAC.step``), the others with zero output gradients: the statistics of one call of the
    layer on all the steps' rows whose loss ignores those steps."""
    generator = torch.Generator().manual_seed(len(sizes))
    layer = nn.Linear(3, 2).double()
    state = KroneckerLayerState("hh", layer, keep_pairs=True, reduce=reduce)
    samples = sizes[0] + 1
    calls = StepCalls(state, samples)
    rows = [torch.randn(size, 3, generator=generator, dtype=torch.float64) for size in sizes]
    grads = [torch.randn(size, 2, generator=generator, dtype=torch.float64) for size in sizes]
    reached = [step for step in range(len(sizes)) if arrived[step]] or [0]
    for step in reversed(range(len(sizes))):
        calls.add(step, rows[step], call_pass=0)
    for step in reached:
        calls.receive(step, grads[step], 2.0, vector=0)
    assert state.output_count == (samples if len(reached) == len(sizes) else 0)
    calls.record_pending(0)
    features = torch.cat([torch.cat(rows), torch.ones(sum(sizes), 1, dtype=torch.float64)], 1)
    zeroed = [grad if step in reached else 0 * grad for step, grad in enumerate(grads)]
    stats = recorded(state)
    torch.testing.assert_close(stats["input_sum"], features.T @ features)
    torch.testing.assert_close(stats["output_sum"], 4.0 * torch.cat(zeroed).T @ torch.cat(zeroed))
    assert stats["counts"].tolist() == [sum(sizes), samples]
    expected = torch.zeros(samples, 2, 4, dtype=torch.float64)
    start = 0
    for size, grad in zip(sizes, zeroed, strict=True):
        expected[:size] += 2.0 * torch.einsum("no,ni->noi", grad, features[start : start + size])
        start += size
    torch.testing.assert_close(stats["per_sample"], [expected])
    assert stats["samples"] == [samples]


def test_step_rows_are_not_reduced():
    """Each step's call has one location per sample: reduce leaves its rows as they are."""
    rows = torch.arange(12.0).reshape(6, 2)
    packed = StepRows([3, 2, 1], 3)
    assert torch.equal(packed.means(rows), rows) and torch.equal(packed.sums(rows), rows)
    grid = packed.padded(rows)
    assert torch.equal(grid[:, 0], rows[:3]) and torch.equal(grid[:2, 1], rows[3:5])
    assert torch.equal(grid[0, 2], rows[5]) and not grid[1:, 2].any() and not grid[2, 1].any()


def test_a_pass_never_back_propagated_leaves_nothing_held():
    """A recording forward pass whose output gets no gradient (a metric computed in training
    mode with gradients enabled) records nothing and, once its graph is freed, leaves no
    step's rows held by the preconditioner; the next pass records as usual."""
    model, twin = twin_models("lstm")
    precond, reference = build(model, KFAC, "empirical"), build(twin, KFAC, "empirical")
    inputs = torch.randn(8, 4, 5, dtype=torch.float64)
    for _ in range(3):
        model(inputs).sum()
    assert not precond._step_calls
    assert all(state.input_count == 0 for state in precond.layers)
    record(model, precond, 1)
    record(twin, reference, 1)
    for name, state in by_weight(precond).items():
        assert_same_statistics(state, by_weight(reference)[name])
