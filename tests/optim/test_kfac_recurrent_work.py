"""The work K-FAC adds to a recurrent layer's recording forward and backward passes.

The calls of ``W_hh`` of an LSTM or RNN (whose gates are ``W_ih``'s output plus ``W_hh``'s, so
that both have the same output gradients) are recorded as one call, with no hook per step. The
statistics themselves are tested against the layer's ``nn.Linear`` twin and by brute force in
the other ``test_kfac_recurrent*`` files; here the twin also checks the cases that the
one-call recording must cover (reverse directions, a second layer, no biases)."""

from __future__ import annotations

import pytest
import torch
from test_kfac_recurrent import twin_models
from test_kfac_recurrent_packed import PackedClassifier, batch, make_recurrent
from test_kfac_recurrent_steps import assert_same_statistics, build, by_weight, record

from natgrad.optim import EKFAC, KFAC


class HookCounter:
    """Counts the tensor hooks registered while active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        register = torch.Tensor.register_hook

        def counted(tensor, hook):
            self.count += 1
            return register(tensor, hook)

        monkeypatch.setattr(torch.Tensor, "register_hook", counted)


def recording_hooks(monkeypatch: pytest.MonkeyPatch, kind: str, steps: int, packed: bool) -> int:
    """The tensor hooks registered by one recording forward pass of a ``kind`` layer over
    ``steps`` steps (padded, or packed with unequal lengths), after the first pass."""
    torch.manual_seed(0)
    if packed:
        model = PackedClassifier(make_recurrent(kind))
        inputs, lengths, _ = batch([steps, steps - 1, 2, steps], seed=0)
        run = [inputs, lengths]
    else:
        model = twin_models(kind)[0]
        run = [torch.randn(8, steps, 5, dtype=torch.float64)]
    precond = KFAC(model)
    model(*run).sum().backward()  # the first recording pass also checks the weights' locality
    precond.discard_statistics()
    counter = HookCounter(monkeypatch)
    model(*run).sum().backward()
    precond.discard_statistics()
    return counter.count


@pytest.mark.parametrize("kind", ["lstm", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("packed", [False, True])
def test_summed_gates_hook_no_step(monkeypatch, kind, packed):
    """``W_ih``, ``W_hh`` and the head: one hook each, however many steps."""
    assert recording_hooks(monkeypatch, kind, 3, packed) == 3
    assert recording_hooks(monkeypatch, kind, 9, packed) == 3


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("lstm", {"num_layers": 2, "bidirectional": True, "bias": False}),
        ("rnn_relu", {"bidirectional": True, "batch_first": False}),
    ],
)
@pytest.mark.parametrize("fisher_type", ["empirical", "exact"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_one_call_records_the_linear_twins_calls(kind, options, fisher_type, kfac_approx):
    """Reverse directions, a second layer, no biases: ``W_hh``'s one call records the twin's
    calls at every step (sums, counts, EKFAC's per-sample gradients of every vector)."""
    model, twin = twin_models(kind, **options)
    precond = build(model, EKFAC, fisher_type, kfac_approx=kfac_approx)
    reference = build(twin, EKFAC, fisher_type, kfac_approx=kfac_approx)
    record(model, precond, 1)
    record(twin, reference, 1)
    states, expected = by_weight(precond), by_weight(reference)
    assert states.keys() == expected.keys()
    for name, state in states.items():
        assert_same_statistics(state, expected[name])


@pytest.mark.parametrize("kind", ["lstm", "rnn_tanh"])
def test_w_hh_alone_records_the_linear_twins_calls(kind):
    """``W_ih`` frozen and no biases: no gradient reaches the gates but through ``W_hh``, whose
    calls are then recorded step by step, as the twin's."""
    model, twin = twin_models(kind, bias=False)
    model.recurrent.weight_ih_l0.requires_grad_(False)
    twin.recurrent.maps["ih_l0"].weight.requires_grad_(False)
    precond = build(model, KFAC, "empirical")
    reference = build(twin, KFAC, "empirical")
    record(model, precond, 1)
    record(twin, reference, 1)
    states, expected = by_weight(precond), by_weight(reference)
    assert sorted(states) == sorted(expected) == ["head", "hh_l0"]
    for name, state in states.items():
        assert_same_statistics(state, expected[name])
