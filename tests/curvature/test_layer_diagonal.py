"""layer_fisher_diagonal against brute-force float64 Fishers and the generic diag builder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as functional
from brute_force import (
    DTYPE,
    LIKELIHOOD_NAMES,
    exact_fisher,
    gradient_fisher,
    mc_fisher,
    tiny_data,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from natgrad.curvature import fisher, layer_diagonal
from natgrad.curvature.layer_diagonal import layer_fisher_diagonal, supported_layers
from natgrad.curvature.likelihoods import get_likelihood

KINDS = ("exact", "mc", "empirical")
OUTPUTS = 3
SAMPLES = 5
MC_SAMPLES = 3
SEED = 7
RTOL = 1e-10
GENERIC = "dense"
"""The generic builder's structure compared with: assembled from per-sample rows (``"diag"``
itself may dispatch to :func:`layer_fisher_diagonal`)."""
ATOL = 1e-13


def mlp(bias: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 4, bias=bias), nn.Tanh(), nn.Linear(4, OUTPUTS, bias=bias)
    ).to(DTYPE)


class SpatialInputs(nn.Module):
    """Reshape flat ``(N, 3)`` inputs to images ``(N, 1, 3, 3)`` by an outer product."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return (inputs.unsqueeze(2) * inputs.unsqueeze(1)).unsqueeze(1)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        SpatialInputs(),
        nn.Conv2d(1, 2, 2, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(2, 2, 2, padding=1, dilation=2, bias=False, padding_mode="reflect"),
        nn.Flatten(),
        nn.Linear(8, OUTPUTS),
    ).to(DTYPE)


def cnn_1d() -> nn.Module:
    """Flat ``(N, 3)`` inputs as 1-channel sequences ``(N, 1, 3)`` through two ``Conv1d``."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 3)),
        nn.Conv1d(1, 2, 2, padding=1),
        nn.Tanh(),
        nn.Conv1d(2, 2, 2, stride=2, padding=1, bias=False, padding_mode="circular"),
        nn.Flatten(),
        nn.Linear(6, OUTPUTS),
    ).to(DTYPE)


class Locations(nn.Module):
    """A Linear applied along a location axis (``T = 2``), then flattened."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 2)
        self.head = nn.Linear(4, OUTPUTS)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([inputs, inputs.flip(1)], dim=1)
        return self.head(torch.tanh(self.inner(stacked)).flatten(1))


def in_place_activations() -> nn.Module:
    """In-place operations on the layer outputs must not change the captured pre-activations."""
    torch.manual_seed(0)
    return nn.Sequential(
        SpatialInputs(),
        nn.Conv2d(1, 2, 2),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(8, 4),
        nn.Hardtanh(-0.5, 0.5, inplace=True),
        nn.Linear(4, OUTPUTS),
    ).to(DTYPE)


MODELS = {"mlp": lambda: mlp(True), "mlp_no_bias": lambda: mlp(False), "cnn": cnn}
MODELS["cnn_1d"] = cnn_1d
MODELS["linear_locations"] = lambda: Locations().to(DTYPE)
MODELS["in_place_activations"] = in_place_activations


def grouped_cnn(groups: int) -> nn.Module:
    """A grouped (``groups=2``) or depthwise (``groups=4``) convolution between two others."""
    torch.manual_seed(0)
    return nn.Sequential(
        SpatialInputs(),
        nn.Conv2d(1, 4, 2),
        nn.Tanh(),
        nn.Conv2d(4, 4, 2, padding=1, groups=groups),
        nn.Flatten(),
        nn.Linear(4 * 9, OUTPUTS),
    ).to(DTYPE)


class SharedLayer(nn.Module):
    """One Linear layer called twice, the second time on the first call's output."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, OUTPUTS)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.tanh(self.layer(inputs)))


class TwiceConv(nn.Module):
    """One convolution called twice, on 3×3 then 4×4 images (16 and 25 locations)."""

    def __init__(self) -> None:
        super().__init__()
        self.spatial = SpatialInputs()
        self.conv = nn.Conv2d(1, 1, 2, padding=1)
        self.head = nn.Linear(25, OUTPUTS)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.conv(torch.tanh(self.conv(self.spatial(inputs)))))
        return self.head(hidden.flatten(1))


class DiscardedCall(nn.Module):
    """One Linear layer called twice, the first call's output discarded (no gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, OUTPUTS)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.layer(inputs.flip(1))
        return self.layer(inputs)


MODELS["repeated_linear"] = lambda: SharedLayer().to(DTYPE)
MODELS["repeated_linear_discarded_call"] = lambda: DiscardedCall().to(DTYPE)
MODELS["repeated_conv"] = lambda: TwiceConv().to(DTYPE)
MODELS["grouped_cnn"] = lambda: grouped_cnn(2)
MODELS["depthwise_cnn"] = lambda: grouped_cnn(4)


def mc_draws(model: nn.Module, inputs: torch.Tensor, likelihood: str) -> list[torch.Tensor]:
    """The targets the MC Fisher samples: ``MC_SAMPLES`` draws on the whole batch, in order."""
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        outputs = model(inputs)
    resolved = get_likelihood(likelihood)
    return [resolved.sample(outputs, generator) for _ in range(MC_SAMPLES)]


def brute_force_diagonal(model, inputs, likelihood, kind, targets) -> torch.Tensor:
    if kind == "exact":
        return exact_fisher(model, inputs, likelihood).diagonal()
    if kind == "empirical":
        return gradient_fisher(model, inputs, likelihood, targets).diagonal()
    return mc_fisher(model, inputs, likelihood, mc_draws(model, inputs, likelihood)).diagonal()


def fast_and_generic(model, inputs, likelihood, kind, targets):
    arguments = {"likelihood": likelihood, "kind": kind, "targets": targets}
    arguments["mc_samples"] = MC_SAMPLES
    fast = layer_fisher_diagonal(
        model, inputs, generator=torch.Generator().manual_seed(SEED), **arguments
    )
    generic = fisher(
        model, inputs, structure=GENERIC, generator=torch.Generator().manual_seed(SEED), **arguments
    ).diag()
    return fast, generic


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("likelihood", LIKELIHOOD_NAMES)
def test_equals_brute_force_and_generic_diagonal(model_name, kind, likelihood) -> None:
    model = MODELS[model_name]()
    inputs, targets = tiny_data(likelihood, samples=SAMPLES, outputs=OUTPUTS)
    fast, generic = fast_and_generic(model, inputs, likelihood, kind, targets)
    expected = brute_force_diagonal(model, inputs, likelihood, kind, targets)
    assert fast.dtype == DTYPE
    assert fast.shape == (sum(p.numel() for p in model.parameters()),)
    assert fast.abs().max() > 1e-3
    torch.testing.assert_close(fast, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(fast, generic, rtol=RTOL, atol=ATOL)


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 4),
    d_in=st.integers(1, 4),
    d_out=st.integers(2, 3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_single_linear_layer_exact_equals_brute_force(batch, d_in, d_out, bias, seed) -> None:
    torch.manual_seed(seed)
    model = nn.Linear(d_in, d_out, bias=bias).to(DTYPE)
    inputs = torch.randn(batch, d_in, dtype=DTYPE)
    fast = layer_fisher_diagonal(model, inputs, likelihood="categorical")
    expected = exact_fisher(model, inputs, "categorical").diagonal()
    torch.testing.assert_close(fast, expected, rtol=RTOL, atol=ATOL)


def test_mc_draws_the_same_targets_and_advances_the_generator_as_the_generic_path() -> None:
    model = mlp(True)
    inputs, _ = tiny_data("categorical", samples=SAMPLES, outputs=OUTPUTS)
    fast_generator = torch.Generator().manual_seed(SEED)
    generic_generator = torch.Generator().manual_seed(SEED)
    arguments = {"likelihood": "categorical", "kind": "mc", "mc_samples": MC_SAMPLES}
    fast = layer_fisher_diagonal(model, inputs, generator=fast_generator, **arguments)
    generic = fisher(model, inputs, structure=GENERIC, generator=generic_generator, **arguments)
    torch.testing.assert_close(fast, generic.diag(), rtol=RTOL, atol=ATOL)
    assert torch.equal(fast_generator.get_state(), generic_generator.get_state())
    again = layer_fisher_diagonal(
        model, inputs, generator=torch.Generator().manual_seed(SEED), **arguments
    )
    assert torch.equal(fast, again)
    other = layer_fisher_diagonal(
        model, inputs, generator=torch.Generator().manual_seed(SEED + 1), **arguments
    )
    assert not torch.equal(fast, other)


def test_frozen_parameters_are_left_out() -> None:
    model = cnn()
    model[1].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    model[5].bias.requires_grad_(False)
    inputs, targets = tiny_data("gaussian", samples=SAMPLES, outputs=OUTPUTS)
    fast, generic = fast_and_generic(model, inputs, "gaussian", "exact", targets)
    expected = exact_fisher(model, inputs, "gaussian").diagonal()
    assert fast.shape == (model[3].weight.numel() + model[5].weight.numel(),)
    torch.testing.assert_close(fast, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(fast, generic, rtol=RTOL, atol=ATOL)


def test_frozen_unsupported_module_is_allowed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, OUTPUTS)).to(DTYPE)
    model[1].requires_grad_(False)
    inputs, targets = tiny_data("bernoulli", samples=SAMPLES, outputs=OUTPUTS)
    fast, _ = fast_and_generic(model, inputs, "bernoulli", "empirical", targets)
    expected = gradient_fisher(model, inputs, "bernoulli", targets).diagonal()
    torch.testing.assert_close(fast, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("budget", ["PER_SAMPLE_GRADIENT_BUDGET", "OUTPUT_GRADIENT_BUDGET"])
def test_chunking_gives_the_same_diagonal(monkeypatch, budget) -> None:
    model = cnn()
    inputs, _ = tiny_data("poisson", samples=SAMPLES, outputs=OUTPUTS)
    whole = layer_fisher_diagonal(model, inputs, likelihood="poisson")
    monkeypatch.setattr(layer_diagonal, budget, 1)
    chunked = layer_fisher_diagonal(model, inputs, likelihood="poisson")
    torch.testing.assert_close(chunked, whole, rtol=RTOL, atol=ATOL)


class SkippedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(3, OUTPUTS)
        self.unused = nn.Linear(3, OUTPUTS)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.used(inputs)


class ScaledOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, OUTPUTS)
        self.scale = nn.Parameter(torch.ones(OUTPUTS))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.layer(inputs) * self.scale


class SequenceFirst(nn.Module):
    """A Linear whose input has the sequence, not the batch, along dim 0."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, OUTPUTS)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.stack([inputs, inputs.flip(1)])).mean(0)


class TiedWithScale(nn.Module):
    """Two Linear layers sharing one weight, and an output scale outside any layer: the
    shared weight counted twice once made the layer count match the parameter count."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(3, 3), nn.Linear(3, OUTPUTS)
        self.second.weight = self.first.weight
        self.scale = nn.Parameter(torch.ones(OUTPUTS))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(inputs))) * self.scale


def frozen_weight_trainable_bias() -> nn.Module:
    model = mlp(True)
    model[0].weight.requires_grad_(False)
    return model


def training_batch_norm() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, OUTPUTS))
    model[1].requires_grad_(False)
    return model.train()


class ReusedOutsideItsCall(nn.Module):
    """A Linear whose weight is also applied by ``F.linear``, outside the layer's call."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)
        self.head = nn.Linear(3, OUTPUTS)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(
            torch.tanh(self.layer(inputs) + functional.linear(inputs, self.layer.weight))
        )


UNSUPPORTED = {
    "other_parameter": ScaledOutputs,
    "embedding": lambda: nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, OUTPUTS)),
    "frozen_weight_trainable_bias": frozen_weight_trainable_bias,
    "skipped_layer": SkippedLayer,
    "tied_with_scale": TiedWithScale,
    "sequence_first": SequenceFirst,
    "reused_outside_its_call": ReusedOutsideItsCall,
}
REFUSED = {
    "training_batch_norm": (training_batch_norm, "BatchNorm"),
    "training_dropout": (
        lambda: nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, OUTPUTS)).train(),
        "dropout",
    ),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_models_give_none_without_drawing(name) -> None:
    torch.manual_seed(0)
    model = UNSUPPORTED[name]().to(DTYPE)
    inputs = torch.randint(0, 4, (SAMPLES,)) if name == "embedding" else tiny_data("gaussian")[0]
    generator = torch.Generator().manual_seed(SEED)
    state = generator.get_state()
    result = layer_fisher_diagonal(
        model, inputs, likelihood="gaussian", kind="mc", generator=generator
    )
    assert result is None
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("name", list(REFUSED))
def test_models_that_are_no_function_of_independent_samples_are_refused(name: str) -> None:
    """As by every builder (``check_curvature_model``), not answered with ``None``."""
    build, cause = REFUSED[name]
    generator = torch.Generator().manual_seed(SEED)
    state = generator.get_state()
    with pytest.raises(ValueError, match=cause):
        layer_fisher_diagonal(
            build().to(DTYPE), tiny_data("gaussian")[0], likelihood="gaussian", generator=generator
        )
    assert torch.equal(generator.get_state(), state)


def test_a_weight_reused_outside_its_call_takes_the_general_path() -> None:
    """``fisher(structure="diag")`` of such a model equals the brute-force diagonal (the
    per-layer path would miss the ``F.linear`` use: 37–50 % off before it was detected)."""
    model = ReusedOutsideItsCall().to(DTYPE)
    inputs, _ = tiny_data("categorical")
    expected = exact_fisher(model, inputs, "categorical").diagonal()
    diagonal = fisher(model, inputs, likelihood="categorical", structure="diag").diag()
    torch.testing.assert_close(diagonal, expected, rtol=RTOL, atol=ATOL)


def test_supported_layers_names_the_covering_layers() -> None:
    model = mlp(True)
    assert [layer.name for layer in supported_layers(model)] == ["0", "2"]
    assert supported_layers(ScaledOutputs()) is None
    assert supported_layers(mlp(True).requires_grad_(False)) is None


def test_invalid_arguments_raise() -> None:
    model = mlp(True)
    inputs, _ = tiny_data("categorical")
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        layer_fisher_diagonal(lambda x: x, inputs, likelihood="categorical")
    with pytest.raises(ValueError, match="kind"):
        layer_fisher_diagonal(model, inputs, likelihood="categorical", kind="fast")
    with pytest.raises(ValueError, match="targets"):
        layer_fisher_diagonal(model, inputs, likelihood="categorical", kind="empirical")
    with pytest.raises(ValueError, match="mc_samples"):
        layer_fisher_diagonal(model, inputs, likelihood="categorical", kind="mc", mc_samples=0)
    with pytest.raises(ValueError, match="unknown likelihood 'cauchy'"):
        layer_fisher_diagonal(model, inputs, likelihood="cauchy")
    with pytest.raises(ValueError, match="NaN"):
        layer_fisher_diagonal(model, inputs * torch.nan, likelihood="categorical")


@settings(max_examples=20, deadline=None)
@given(
    groups=st.integers(1, 3),
    vectors=st.integers(1, 2),
    samples=st.integers(1, 4),
    locations=st.integers(1, 3),
    seed=st.integers(0, 99),
)
def test_squared_gradient_sum_batches_leading_dimensions(
    groups: int, vectors: int, samples: int, locations: int, seed: int
) -> None:
    """Leading dimensions (a grouped convolution's groups) against each slice's sum, itself
    against the per-sample gradients written out as loops."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(groups, samples, locations, 3, generator=generator, dtype=DTYPE)
    grads = torch.randn(groups, vectors, samples, locations, 2, generator=generator, dtype=DTYPE)
    total = layer_diagonal.squared_gradient_sum(features, grads)
    for group in range(groups):
        expected = torch.zeros(2, 3, dtype=DTYPE)
        for vector in range(vectors):
            for sample in range(samples):
                gradient = sum(
                    torch.outer(grads[group, vector, sample, t], features[group, sample, t])
                    for t in range(locations)
                )
                expected += gradient.square()
        torch.testing.assert_close(total[group], expected)
        single = layer_diagonal.squared_gradient_sum(features[group], grads[group])
        torch.testing.assert_close(single, expected)


def test_squared_gradient_sum_in_chunks_of_samples(monkeypatch) -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 3, 4, generator=generator, dtype=DTYPE)
    grads = torch.randn(2, 3, 5, 3, 2, generator=generator, dtype=DTYPE)
    whole = layer_diagonal.squared_gradient_sum(features, grads)
    monkeypatch.setattr(layer_diagonal, "PER_SAMPLE_GRADIENT_BUDGET", 2 * 3 * 2 * 4 * 2)
    torch.testing.assert_close(layer_diagonal.squared_gradient_sum(features, grads), whole)


class TiedEmbedding(nn.Module):
    """A language model whose output layer's weight is its embedding's (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(OUTPUTS, 4)
        self.hidden = nn.Linear(4, 4)
        self.output = nn.Linear(4, OUTPUTS, bias=False)
        self.output.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output(torch.tanh(self.hidden(self.embedding(tokens))))


class TiedBias(nn.Module):
    """Two Linear layers sharing one bias."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(3, OUTPUTS), nn.Linear(OUTPUTS, OUTPUTS)
        self.second.bias = self.first.bias

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(inputs)))


@pytest.mark.parametrize("name", ["tied_embedding", "tied_bias"])
def test_diagonal_of_a_tied_parameter_sums_every_use(name) -> None:
    """A parameter held by a supported layer and another module has curvature from both uses;
    the layer-wise diagonal saw the layer's use only (about 0.2 off)."""
    torch.manual_seed(0)
    model = (TiedEmbedding if name == "tied_embedding" else TiedBias)().to(DTYPE)
    if name == "tied_embedding":
        inputs = torch.randint(0, OUTPUTS, (SAMPLES,))
    else:
        inputs = tiny_data("categorical")[0]
    expected = exact_fisher(model, inputs, "categorical").diagonal()
    actual = fisher(model, inputs, likelihood="categorical", structure="diag").diag()
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
