"""A Kronecker layer's weight used outside the layer's calls is detected
(:mod:`natgrad.curvature.weight_locality`), and every Kronecker builder checks its model.

Twin models: legal ones (repeated calls, one module registered twice, convolutions of every
padding mode, grouped and 1-D, a frozen embedding, float32 at a large batch) must build
without a false alarm; the same layers with one extra functional use of a weight or bias must
be refused, naming the layer. The oracle that the refusal is needed: at one sample (where
K-FAC is exact for a legal model, checked here against the brute-force Fisher) the reused
model's K-FAC, built with the check switched off, misses the brute-force Fisher.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as functional
from brute_force import exact_fisher
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from natgrad.curvature import fisher, ggn, kfac
from natgrad.curvature.ekfac import build_ekfac
from natgrad.curvature.kfac import build_kfac, statistics_for_vectors
from natgrad.curvature.kfac_capture import ForwardCapture, kronecker_layers
from natgrad.curvature.layer_diagonal import layer_fisher_diagonal
from natgrad.curvature.weight_locality import foreign_weight_uses

DTYPE = torch.float64
BUILDERS = [pytest.param(build_kfac, id="kfac"), pytest.param(build_ekfac, id="ekfac")]


class AddedReuse(nn.Module):
    """``lin(x) + scale · F.linear(x, lin.weight)`` (``scale = 0``: the legal twin), then
    ``activation`` and a head."""

    def __init__(
        self, width: int = 4, scale: float = 1.0, activation: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)
        self.scale = scale
        self.activation = nn.Tanh() if activation is None else activation

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.lin(inputs)
        if self.scale:
            hidden = hidden + self.scale * functional.linear(inputs, self.lin.weight)
        return self.head(self.activation(hidden))


class TiedAutoencoder(nn.Module):
    """Decoder ``F.linear(h, enc.weight.t())`` (``tied=False``: its own decoder layer)."""

    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        self.encoder = nn.Linear(5, 3)
        self.decoder = None if tied else nn.Linear(3, 5, bias=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.encoder(inputs))
        if self.decoder is None:
            return functional.linear(hidden, self.encoder.weight.t())
        return self.decoder(hidden)


class BiasReuse(nn.Module):
    """``lin(x) + lin.bias``: the bias used a second time, outside the call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.lin(inputs) + self.lin.bias


class ConvReuse(nn.Module):
    """``conv(x) + F.conv2d(x, conv.weight, padding=1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.conv(inputs) + functional.conv2d(inputs, self.conv.weight, padding=1)
        return self.head(torch.tanh(features).flatten(1))


class DoubledLinear(nn.Linear):
    """A Linear whose forward applies ``2 W``: the hooks see ``x`` and ``g``, the weight's
    gradient is ``2 g xᵀ``."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return functional.linear(inputs, 2 * self.weight, self.bias)


class TwoNames(nn.Module):
    """One Linear registered under two names, called through both (sharing through the same
    module: its calls, not a foreign use)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = self.first
        self.head = nn.Linear(4, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.second(torch.tanh(self.first(inputs)))))


class FrozenEmbedding(nn.Module):
    """Tokens ``(N, T)`` through a frozen embedding, a Linear on ``(N, T, d)``, a mean."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, 4).requires_grad_(False)
        self.lin = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lin(self.embedding(tokens)).mean(1)


def conv_net(dtype: torch.dtype = DTYPE) -> nn.Module:
    """Conv2d of every padding mode, 'same' with an even kernel (asymmetric pads), grouped,
    dilated, strided; then a Conv1d."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"),
        nn.Tanh(),
        nn.Conv2d(4, 4, 2, padding="same", groups=2, bias=False, padding_mode="circular"),
        nn.Tanh(),
        nn.Conv2d(4, 2, 3, stride=2, dilation=2, padding=2, padding_mode="replicate"),
        nn.Flatten(2),
        nn.Conv1d(2, 3, 3, padding=1),
        nn.Flatten(),
        nn.Linear(3 * 16, 3),
    ).to(dtype)


def legal_cases() -> dict:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 2, 8, 8, generator=generator, dtype=DTYPE)
    vectors = torch.randn(4, 4, generator=generator, dtype=DTYPE)
    return {
        "scale_zero": (AddedReuse(scale=0.0), vectors),
        "untied_autoencoder": (TiedAutoencoder(tied=False), torch.randn(4, 5, dtype=DTYPE)),
        "two_names": (TwoNames(), vectors),
        "convolutions": (conv_net(), images),
        "frozen_embedding": (FrozenEmbedding(), torch.randint(0, 7, (4, 5), generator=generator)),
    }


def reuse_cases() -> dict:
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(4, 4, generator=generator, dtype=DTYPE)
    return {
        "added_reuse": (AddedReuse(), vectors, "lin"),
        "tied_autoencoder": (TiedAutoencoder(), torch.randn(4, 5, dtype=DTYPE), "encoder"),
        "bias_reuse": (BiasReuse(), vectors, "lin"),
        "conv_reuse": (ConvReuse(), torch.randn(4, 2, 4, 4, dtype=DTYPE), "conv"),
        "doubled_linear": (nn.Sequential(DoubledLinear(4, 3)), vectors, "0"),
    }


@pytest.mark.parametrize("build", BUILDERS)
@pytest.mark.parametrize("name", list(legal_cases()))
def test_legal_models_build_without_a_false_alarm(build, name: str) -> None:
    torch.manual_seed(0)
    model, inputs = legal_cases()[name]
    operator = build(model.to(DTYPE), inputs, likelihood="categorical")
    assert torch.isfinite(operator.to_dense()).all()


@pytest.mark.parametrize("name", list(reuse_cases()))
def test_a_parameter_used_outside_its_layer_is_refused_by_every_kronecker_builder(
    name: str,
) -> None:
    torch.manual_seed(0)
    model, inputs, layer = reuse_cases()[name]
    model = model.to(DTYPE)
    message = f"layer {layer!r} is also used outside the layer's calls"
    for build in (build_kfac, build_ekfac):
        with pytest.raises(ValueError, match=message):
            build(model, inputs, likelihood="categorical")
    for structure in ("kfac", "ekfac"):
        with pytest.raises(ValueError, match=message):
            fisher(model, inputs, likelihood="categorical", structure=structure)
        with pytest.raises(ValueError, match=message):
            ggn(model, inputs, nn.MSELoss(), torch.zeros_like(model(inputs)), structure=structure)


def test_the_reuse_is_mis_measured_without_the_check(monkeypatch) -> None:
    """The oracle for the refusal: at one sample K-FAC's blocks (one per layer: the layer's
    weight and bias, 20 and 15 entries) are exact for the legal twin (brute force), but miss
    the reused model's Fisher when the check is switched off."""
    inputs = torch.randn(1, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    blocks = torch.block_diag(torch.ones(20, 20), torch.ones(15, 15)).to(DTYPE)
    for scale, exact in ((0.0, True), (1.0, False)):
        torch.manual_seed(0)
        model = AddedReuse(scale=scale).to(DTYPE)
        reference = exact_fisher(model, inputs, "categorical") * blocks
        monkeypatch.setattr(kfac, "check_local_weights", lambda *args: None)
        unchecked = build_kfac(model, inputs, likelihood="categorical").to_dense()
        monkeypatch.undo()
        error = float((unchecked - reference).norm() / reference.norm())
        layer_block = slice(0, 20)  # lin's weight and bias
        block_error = (unchecked - reference)[layer_block, layer_block].norm()
        block_error = float(block_error / reference[layer_block, layer_block].norm())
        assert (error < 1e-12) if exact else (block_error > 0.5)


def test_the_per_layer_diagonal_leaves_a_reused_weight_to_the_general_path() -> None:
    """``layer_fisher_diagonal`` answers ``None`` (its "use a general method"), so
    ``fisher(structure="diag")`` is the brute-force diagonal."""
    torch.manual_seed(0)
    model, inputs, _ = reuse_cases()["tied_autoencoder"]
    model = model.to(DTYPE)
    assert layer_fisher_diagonal(model, inputs, likelihood="gaussian") is None
    diagonal = fisher(model, inputs, likelihood="gaussian", structure="diag").diag()
    expected = exact_fisher(model, inputs, "gaussian").diagonal()
    torch.testing.assert_close(diagonal, expected, rtol=1e-10, atol=1e-13)


def locality_verdict(model: nn.Module, inputs: torch.Tensor) -> list[str]:
    layers = kronecker_layers(model)
    with torch.enable_grad(), ForwardCapture(layers) as capture:
        outputs = model(inputs)
    return foreign_weight_uses(model, layers, capture.calls, outputs)


@settings(max_examples=15, deadline=None)
@given(
    samples=st.integers(1, 64),
    width=st.integers(1, 6),
    scale=st.floats(0.05, 2.0),
    magnitude=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_float32_round_off_is_no_alarm_and_a_small_reuse_is_one(
    samples: int, width: int, scale: float, magnitude: float, seed: int
) -> None:
    """Float32 twins of any size and input scale: the legal one passes, one with the weight
    reused at ``scale`` (5 % and up) is caught. Linear between the layers: a saturated tanh
    passes no gradient, so no use of the weight could be seen."""
    torch.manual_seed(seed)
    inputs = magnitude * torch.randn(samples, width)
    legal = AddedReuse(width, scale=0.0, activation=nn.Identity())
    assert locality_verdict(legal, inputs) == []
    reused = AddedReuse(width, scale=scale, activation=nn.Identity())
    reused.load_state_dict(legal.state_dict())
    assert locality_verdict(reused, inputs) == ["lin"]


def test_float32_convolutions_at_a_large_batch_are_no_alarm() -> None:
    """Round-off of 256 samples × 64 locations per layer stays below the tolerance."""
    torch.manual_seed(0)
    inputs = torch.randn(256, 2, 8, 8)
    assert locality_verdict(conv_net(torch.float32), inputs) == []


@pytest.mark.parametrize("build", BUILDERS)
@pytest.mark.parametrize(
    ("module", "cause"),
    [
        (nn.Dropout(0.5), "dropout layers in training mode"),
        (nn.BatchNorm1d(4).requires_grad_(False), "BatchNorm layer in training mode"),
    ],
)
def test_builders_called_directly_refuse_a_model_in_training_mode(
    build, module: nn.Module, cause: str
) -> None:
    """``build_kfac``/``build_ekfac``/``statistics_for_vectors`` check the model as
    ``fisher`` does, before it runs."""
    model = nn.Sequential(nn.Linear(3, 4), module, nn.Linear(4, 2)).to(DTYPE).train()
    inputs = torch.randn(5, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match=cause):
        build(model, inputs, likelihood="categorical")
    with pytest.raises(ValueError, match=cause):
        statistics_for_vectors(model, inputs, lambda outputs: outputs[None])


def test_kronecker_layers_refuses_a_tied_parameter_unless_not_strict() -> None:
    """Two layers' biases tied: every caller of ``kronecker_layers`` gets the tie check."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].bias = model[0].bias
    with pytest.raises(ValueError, match=r"\['0.bias', '1.bias'\] are one tied parameter"):
        kronecker_layers(model)
    assert [layer.name for layer in kronecker_layers(model, strict=False)] == ["0", "1"]


def test_a_clean_model_is_checked_once_until_its_parameters_change(monkeypatch) -> None:
    """The check runs at a model's first build; later builds of the same model (an optimizer
    rebuilding its curvature every step) skip it, until a parameter is replaced. A model that
    failed is checked again at every build."""
    from natgrad.curvature import weight_locality

    probes = []
    original = weight_locality._probe
    monkeypatch.setattr(
        weight_locality, "_probe", lambda outputs: probes.append(1) or original(outputs)
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    inputs = torch.randn(5, 3)
    for _ in range(3):
        assert locality_verdict(model, inputs) == []
    assert len(probes) == 1
    model[0].weight = nn.Parameter(model[0].weight.detach().clone())
    assert locality_verdict(model, inputs) == []
    assert len(probes) == 2
    reused, reused_inputs, _ = reuse_cases()["tied_autoencoder"]
    reused = reused.to(reused_inputs.dtype)
    for _ in range(2):
        assert locality_verdict(reused, reused_inputs) != []
    assert len(probes) == 4
