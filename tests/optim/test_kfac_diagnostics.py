"""K-FAC tells the user when a layer cannot be, or was not, preconditioned, instead of silently
leaving gradients as they are."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torch.nn.utils.parametrizations import weight_norm

from natgrad.optim import EKFAC, KFAC, QuadraticModelOptimizer


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, generator=generator), torch.randint(0, 3, (8,), generator=generator)


def backward(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    model.zero_grad()
    nn.functional.cross_entropy(model(inputs), targets).backward()


def mc_step(model: nn.Module, precond: KFAC, inputs, targets, sample: bool = True) -> None:
    model.zero_grad()
    outputs = model(inputs)
    if sample:
        precond.sample_backward(outputs)
    nn.functional.cross_entropy(outputs, targets).backward()
    precond.step()


def test_a_monte_carlo_step_without_sampling_is_refused_and_leaves_no_trace() -> None:
    """Without ``sample_backward`` no output gradient is recorded: the step raises, and the
    inputs it recorded do not leak into the next step's factors."""
    inputs, targets = batch()
    model, twin = classifier(), classifier()
    options = {"fisher_type": "mc", "likelihood": "categorical", "damping": 0.1}
    precond = KFAC(model, generator=torch.Generator().manual_seed(5), **options)
    reference = KFAC(twin, generator=torch.Generator().manual_seed(5), **options)
    with pytest.raises(RuntimeError, match="sample_backward"):
        mc_step(model, precond, *batch(1), sample=False)
    assert precond.steps == 0
    mc_step(model, precond, inputs, targets)
    mc_step(twin, reference, inputs, targets)
    for ours, theirs in zip(precond.layers, reference.layers, strict=True):
        torch.testing.assert_close(ours.input_factor, theirs.input_factor, rtol=0, atol=0)
        torch.testing.assert_close(ours.output_factor, theirs.output_factor, rtol=0, atol=0)
    for ours, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0)


def test_layers_that_record_nothing_are_named_once() -> None:
    model = classifier()
    precond = KFAC(model, damping=0.1)
    model.eval()
    backward(model, *batch())
    with pytest.warns(RuntimeWarning, match=r"layers \['0', '2'\] recorded no statistics"):
        precond.step()
    expected = [p.grad.clone() for p in model.parameters()]
    backward(model, *batch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precond.step()  # warned already
    for param, grad in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=0, atol=0)  # passed through
    model.train()
    backward(model, *batch())
    precond.step()
    assert all(state.input_factor is not None for state in precond.layers)


class TiedHead(nn.Module):
    """A decoder that multiplies by its encoder's weight, never calling the encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 5, bias=False)
        self.hidden = nn.Linear(3, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.hidden(inputs)) @ self.encoder.weight.T


def test_a_weight_used_without_its_layer_is_named() -> None:
    torch.manual_seed(0)
    model = TiedHead()
    precond = KFAC(model, damping=0.1)
    targets = torch.randint(0, 5, (8,))
    model.zero_grad()
    nn.functional.cross_entropy(model(batch()[0]), targets).backward()
    with pytest.warns(RuntimeWarning, match=r"\['encoder'\].*without calling their forward"):
        precond.step()
    assert precond.layers[1].input_factor is not None


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.first = nn.Linear(4, 3)
        self.second = nn.Linear(4, 3)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.tanh(self.body(inputs))
        return self.first(features), self.second(features)


def test_inputs_without_output_gradients_do_not_carry_over() -> None:
    """A head that ran but did not enter the loss records inputs and no output gradient; its
    factor at the next step must hold that step's inputs only."""
    torch.manual_seed(0)
    model = TwoHeads()
    precond = KFAC(model, damping=0.1, factor_decay=0.0)
    (first_inputs, targets), (second_inputs, _) = batch(0), batch(1)
    model.zero_grad()
    nn.functional.cross_entropy(model(first_inputs)[0], targets).backward()
    precond.step()
    assert precond.layers[2].input_factor is None
    model.zero_grad()
    first, second = model(second_inputs)
    (
        nn.functional.cross_entropy(first, targets) + nn.functional.cross_entropy(second, targets)
    ).backward()
    precond.step()
    with torch.no_grad():
        features = torch.tanh(model.body(second_inputs))
    homogeneous = torch.cat([features, torch.ones(len(features), 1)], dim=1)
    expected = homogeneous.T @ homogeneous / len(features)
    torch.testing.assert_close(precond.layers[2].input_factor, expected)


class TiedLanguageModel(nn.Module):
    """Input embedding and output layer share one weight (tied embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 6)
        self.hidden = nn.Linear(6, 6)
        self.output = nn.Linear(6, 10, bias=False)
        self.output.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output(torch.tanh(self.hidden(self.embedding(tokens))))


def test_layers_with_a_shared_weight_are_left_out_or_refused() -> None:
    torch.manual_seed(0)
    model = TiedLanguageModel()
    tokens = torch.randint(0, 10, (8, 5), generator=torch.Generator().manual_seed(1))
    with pytest.warns(RuntimeWarning, match=r"leaves out the layers \['embedding', 'output'\]"):
        precond = KFAC(model, damping=0.1)
    assert [state.name for state in precond.layers] == ["hidden"]
    model.zero_grad()
    logits = model(tokens)
    nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    shared = model.embedding.weight.grad.clone()
    precond.step()
    torch.testing.assert_close(model.embedding.weight.grad, shared, rtol=0, atol=0)
    precond.remove()
    with pytest.raises(ValueError, match="share one parameter"):
        KFAC(model, layers=[model.embedding, model.output])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = KFAC(model, layers=[model.output, model.hidden])
    assert [state.name for state in one.layers] == ["output", "hidden"]


def test_layers_with_a_shared_bias_are_left_out() -> None:
    """Two layers holding one bias wrote their preconditioned bias gradients in turn, the
    second overwriting the first's; like a shared weight, they now pass through (named in a
    warning)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    model[2].bias = model[0].bias
    with pytest.warns(RuntimeWarning, match=r"leaves out the layers \['0', '2'\]"):
        precond = KFAC(model, damping=0.1)
    assert [state.name for state in precond.layers] == ["4"]
    model(torch.randn(6, 4)).square().sum().backward()
    plain = [param.grad.clone() for param in model[:3].parameters()]
    precond.step()
    for param, gradient in zip(model[:3].parameters(), plain, strict=True):
        torch.testing.assert_close(param.grad, gradient, rtol=0, atol=0)


def test_sparse_embeddings_pass_through_and_cannot_be_chosen() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 3))
    precond = KFAC(model, damping=0.1)
    assert [state.name for state in precond.layers] == ["2"]
    tokens = torch.randint(0, 10, (8, 3), generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    nn.functional.cross_entropy(model(tokens), torch.arange(8) % 3).backward()
    sparse = model[0].weight.grad.clone()
    precond.step()
    assert model[0].weight.grad.is_sparse
    torch.testing.assert_close(model[0].weight.grad.to_dense(), sparse.to_dense(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"'0' \(Embedding\).*dense gradients"):
        KFAC(model, layers=[model[0]])


def computed_weight_model(computed: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    if computed == "weight_norm":
        model[0] = weight_norm(model[0])
    else:
        prune.l1_unstructured(model[0], "weight", amount=0.5)
    return model


@pytest.mark.parametrize("computed", ["weight_norm", "pruned"])
def test_computed_weights_pass_through_and_cannot_be_chosen(computed: str) -> None:
    """``weight_norm`` computes ``weight`` from other parameters, ``torch.nn.utils.prune`` as
    ``weight_orig · mask`` in a forward pre-hook: it has no ``.grad`` to precondition. A pruned
    layer was selected, its step read the ``.grad`` of that non-leaf tensor (a warning at every
    step) and preconditioned nothing."""
    model = computed_weight_model(computed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precond = KFAC(model, damping=0.1, inv_update_interval=1)
        assert [state.name for state in precond.layers] == ["2"]
        backward(model, *batch())
        original = [p.grad.clone() for p in model[0].parameters()]
        precond.step()
    for param, grad in zip(model[0].parameters(), original, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not one computed, by a parametrization or pruning"):
        KFAC(model, layers=[model[0]])


def test_lazy_layers_must_be_initialized_first() -> None:
    model = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"'0' \(LazyLinear\) is not initialized yet"):
        KFAC(model)
    model(torch.zeros(1, 3))
    assert [state.name for state in KFAC(model).layers] == ["0", "2"]


def test_layers_may_be_any_iterable() -> None:
    model = classifier()
    chosen = (module for module in model if isinstance(module, nn.Linear))
    assert [state.name for state in KFAC(model, layers=chosen).layers] == ["0", "2"]


def test_a_second_step_on_the_same_gradients_is_refused() -> None:
    """Gradients already preconditioned must not be preconditioned again; a new backward pass
    (new gradient tensors, or in-place accumulation after ``zero_grad(set_to_none=False)``)
    makes the next step legal."""
    model = classifier()
    precond = KFAC(model, damping=0.1, inv_update_interval=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = batch()
    for set_to_none in (True, False, False):
        optimizer.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(model(inputs), targets).backward()
        precond.step()
        optimizer.step()
    preconditioned = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="called again without a backward pass"):
        precond.step()
    for param, grad in zip(model.parameters(), preconditioned, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=0, atol=0)
    assert precond.steps == 3


def test_warnings_name_the_line_of_the_user() -> None:
    """However deep the warning is raised (a subclass constructor, a step called by another
    optimizer, torch.no_grad's wrapper), it is attributed to this file."""
    with pytest.warns(RuntimeWarning, match="share") as record:
        KFAC(TiedLanguageModel(), damping=0.1)
    with pytest.warns(RuntimeWarning, match="share") as subclass_record:
        EKFAC(TiedLanguageModel(), damping=0.1)
    model = classifier()
    precond = KFAC(model, damping=0.1)
    model.eval()
    backward(model, *batch())
    with pytest.warns(RuntimeWarning, match="recorded no statistics") as step_record:
        precond.step()
    model = classifier()
    precond = KFAC(model, damping=0.1)
    optimizer = QuadraticModelOptimizer(model, "categorical", preconditioner=precond)
    model.eval()
    inputs, targets = batch()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="recorded no statistics") as nested_record:
        optimizer.step(closure)
    for warnings_raised in (record, subclass_record, step_record, nested_record):
        ours = [item for item in warnings_raised if item.category is RuntimeWarning]
        assert [item.filename for item in ours] == [__file__]


class SequenceModel(nn.Module):
    """A token layer on ``(T, N, d)`` (``batch_first=False``) or ``(N, T, d)`` inputs, mean
    over the tokens, then a head on ``(N, d)``."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tokens = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)
        self.batch_first = batch_first

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` of shape (N, T, 3)."""
        if self.batch_first:
            return self.head(torch.tanh(self.tokens(inputs)).mean(1))
        return self.head(torch.tanh(self.tokens(inputs.transpose(0, 1))).mean(0))


def test_layers_that_count_different_samples_are_named_once() -> None:
    """A layer that sees the batch in dim 1 counts the tokens as samples."""
    inputs, targets = torch.randn(8, 5, 3), torch.randint(0, 3, (8,))
    model = SequenceModel(batch_first=False)
    precond = KFAC(model)
    with pytest.warns(RuntimeWarning, match=r"\{5: \['tokens'\], 8: \['head'\]\}.*batch_first"):
        backward(model, inputs, targets)
        precond.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backward(model, inputs, targets)
        precond.step()
        model = SequenceModel(batch_first=True)
        precond = KFAC(model)
        backward(model, inputs, targets)
        precond.step()


def frequency_scaled_model() -> nn.Module:
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 4, scale_grad_by_freq=True)
    return nn.Sequential(embedding, nn.Flatten(), nn.Linear(12, 3))


@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
def test_frequency_scaled_embeddings_pass_through_and_cannot_be_chosen(preconditioner) -> None:
    """Autograd divides the gradient of a ``scale_grad_by_freq`` embedding by the tokens'
    counts, which ``A`` (their frequencies) would divide again: such an embedding is left out
    with a warning, its gradient kept as autograd gave it."""
    model = frequency_scaled_model()
    with pytest.warns(RuntimeWarning, match=r"leaves out the embeddings \['0'\]"):
        precond = preconditioner(model, damping=0.1)
    assert [state.name for state in precond.layers] == ["2"]
    tokens = torch.randint(0, 10, (8, 3), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
    backward(model, tokens, targets)
    plain = [param.grad.clone() for param in model.parameters()]
    precond.step()
    torch.testing.assert_close(model[0].weight.grad, plain[0], rtol=0, atol=0)
    assert not torch.equal(model[2].weight.grad, plain[1])
    precond.remove()
    with pytest.raises(ValueError, match=r"embeddings \['0'\] cannot be preconditioned"):
        preconditioner(model, layers=[model[0], model[2]])
    with pytest.warns(RuntimeWarning, match="leaves out"), pytest.raises(ValueError, match="no "):
        preconditioner(model, layers=[nn.Embedding])
    model[0].scale_grad_by_freq = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(preconditioner(model, damping=0.1).layers) == 2


def test_the_quadratic_model_refuses_frequency_scaled_embeddings() -> None:
    """The quadratic model's linear term needs the derivative, which autograd does not give
    for a ``scale_grad_by_freq`` embedding: refused when the optimizer is built."""
    model = frequency_scaled_model()
    with pytest.raises(ValueError, match=r"embeddings \['0'\] have scale_grad_by_freq=True"):
        QuadraticModelOptimizer(model, "categorical")
    model[0].weight.requires_grad_(False)
    QuadraticModelOptimizer(model, "categorical")


@pytest.mark.parametrize("frozen", [0, 2])
@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
def test_a_layer_frozen_after_building_records_nothing_until_unfrozen(
    preconditioner, frozen
) -> None:
    """Frozen for a while (staged fine-tuning), a layer records no statistics (the head's
    output gradients would reach it) and its inverses are not refreshed; unfrozen, it is
    preconditioned as by a preconditioner built then (factors of the current batch only: no
    decay, inverses every step)."""
    model = classifier()
    options = {"damping": 0.1, "factor_decay": 0.0, "inv_update_interval": 1}
    precond = preconditioner(model, **options)
    backward(model, *batch(0))
    precond.step()
    state = precond.layers[frozen // 2]
    factors = state.input_factor.clone(), state.output_factor.clone()
    model[frozen].requires_grad_(False)
    weight = model[frozen].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in (1, 2):
            backward(model, *batch(seed))
            precond.step()
    assert model[frozen].weight.grad is None
    torch.testing.assert_close(state.input_factor, factors[0], rtol=0, atol=0)
    torch.testing.assert_close(state.output_factor, factors[1], rtol=0, atol=0)
    assert [stale.name for stale in precond._stale_layers(factored=False)] == [str(2 - frozen)]
    torch.testing.assert_close(model[frozen].weight, weight, rtol=0, atol=0)

    model[frozen].requires_grad_(True)
    twin = copy.deepcopy(model)
    fresh = preconditioner(twin, **options)
    for network, conditioner in ((model, precond), (twin, fresh)):
        backward(network, *batch(3))
        conditioner.step()
    for param, reference in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(param.grad, reference.grad)


def test_layers_frozen_when_built_are_left_out_with_a_warning_once_unfrozen() -> None:
    model = classifier()
    model[0].requires_grad_(False)
    precond = KFAC(model, damping=0.1)
    assert [state.name for state in precond.layers] == ["2"]
    model[0].requires_grad_(True)
    backward(model, *batch())
    plain = model[0].weight.grad.clone()
    with pytest.warns(RuntimeWarning, match=r"layers \['0'\] have gradients but were frozen"):
        precond.step()
    torch.testing.assert_close(model[0].weight.grad, plain, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backward(model, *batch(1))
        precond.step()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"those of \['0', '2'\] are frozen"):
        KFAC(model)


class PositionalLM(nn.Module):
    """Token plus positional embeddings, a per-position head; the positions either shared by
    the batch (``torch.arange(T)``, broadcast) or expanded to it."""

    def __init__(self, expand: bool) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(11, 8), nn.Embedding(6, 8)
        self.head = nn.Linear(8, 11)
        self.expand = expand

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1])
        if self.expand:
            positions = positions.expand_as(tokens)
        return self.head(torch.tanh(self.tokens(tokens) + self.positions(positions)))


@pytest.mark.parametrize("expand", [False, True])
def test_positional_embeddings_see_the_batch_once_their_positions_are_expanded(expand) -> None:
    """Shared positions make the positional embedding count ``T`` samples, which the warning
    names with the remedy; expanded, its ``G`` equals the token embedding's (their outputs are
    added, so they get the same output gradients) and ``A`` the positions' frequencies."""
    torch.manual_seed(0)
    model = PositionalLM(expand)
    tokens = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(1))
    precond = KFAC(model, damping=0.1)
    model.zero_grad()
    logits = model(tokens)
    nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="sum").div(
        4
    ).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precond.step()
    messages = [str(warning.message) for warning in caught]
    token_state, position_state, _ = precond.layers
    if not expand:
        assert len(messages) == 1
        assert "{4: ['tokens', 'head'], 6: ['positions']}" in messages[0]
        assert "torch.arange(T).expand(N, T)" in messages[0]
        return
    assert messages == []
    torch.testing.assert_close(position_state.output_factor, token_state.output_factor)
    torch.testing.assert_close(position_state.input_factor, torch.full((6,), 1 / 6))
