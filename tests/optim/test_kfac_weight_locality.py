"""K-FAC refuses a layer whose weight is also used outside the layer's calls (a tied
decoder's ``F.linear(h, encoder.weight.t())``): the hooks never see that use, so the layer's
factors would describe another model. The check back-propagates one probe vector at the end of
the first forward pass that records (:func:`natgrad.curvature.weight_locality.
foreign_weight_uses`), records nothing itself, and runs once per model. Embeddings are
checked too (a tied output layer)."""

import pytest
import torch
from torch import nn
from torch.nn import functional

from kfac_training import fisher_options, train_steps
from natgrad.curvature import weight_locality
from natgrad.optim import EKFAC, KFAC


class TiedAutoencoder(nn.Module):
    """A decoder applying the encoder's weight transposed, then a classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 3)
        self.decoder_bias = nn.Parameter(torch.zeros(6))
        self.head = nn.Linear(6, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        code = torch.tanh(self.encoder(inputs))
        return self.head(functional.linear(code, self.encoder.weight.t(), self.decoder_bias))


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    return inputs, torch.randint(0, 3, (8,), generator=generator)


@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "exact"])
@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
def test_a_weight_used_outside_its_layer_is_refused_at_the_first_recording_pass(
    preconditioner, fisher_type: str
) -> None:
    torch.manual_seed(0)
    model = TiedAutoencoder().double()
    precond = preconditioner(model, damping=0.1, **fisher_options(fisher_type, seed=0))
    inputs, _ = batch()
    assert not precond._weights_checked
    with pytest.raises(ValueError, match="layer 'encoder' is also used outside the layer's calls"):
        model(inputs)


def test_leaving_the_layer_out_preconditions_the_others() -> None:
    """``layers=`` without the tied layer: its gradient passes through, the head is
    preconditioned."""
    torch.manual_seed(0)
    model = TiedAutoencoder().double()
    precond = KFAC(model, damping=0.1, layers=[model.head])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = batch()
    optimizer.zero_grad()
    functional.cross_entropy(model(inputs), targets).backward()
    plain = model.encoder.weight.grad.clone()
    precond.step()
    torch.testing.assert_close(model.encoder.weight.grad, plain, rtol=0, atol=0)
    assert precond.layers[0].input_factor is not None


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_the_check_records_nothing_and_runs_once_per_model(monkeypatch, fisher_type: str) -> None:
    """A legal model trains exactly as with the check skipped (the probe's backward pass adds
    nothing to the statistics), and the probe runs at the first recording pass only, also
    for a second preconditioner of the same model."""
    probes = []
    original = weight_locality._probe
    monkeypatch.setattr(
        weight_locality, "_probe", lambda outputs: probes.append(1) or original(outputs)
    )
    results = []
    for skip in (False, True):
        model = classifier()
        precond = KFAC(
            model, damping=0.1, factor_update_interval=2, **fisher_options(fisher_type, 3)
        )
        precond._weights_checked = skip
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
        for seed in range(5):
            train_steps(model, precond, optimizer, *batch(seed), steps=1)
        results.append(list(model.parameters()))
        if not skip:
            second = KFAC(model, damping=0.1)
            model(batch()[0])  # a second preconditioner's first recording pass
            assert second._weights_checked
    assert len(probes) == 1
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_a_pass_that_records_nothing_leaves_the_check_for_a_recording_pass() -> None:
    torch.manual_seed(0)
    model = TiedAutoencoder().double()
    precond = KFAC(model, damping=0.1)
    inputs, _ = batch()
    model.eval()
    model(inputs)
    with torch.no_grad():
        model.train()(inputs)
    assert not precond._weights_checked
    with pytest.raises(ValueError, match="'encoder'"):
        model(inputs)


class TiedLanguageModel(nn.Module):
    """Token embeddings, a linear layer, and output logits from the embedding's weight
    (``F.linear(h, embedding.weight)``: a language model's tied output layer)."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, 4, padding_idx=0)
        self.mix = nn.Linear(4, 4)
        self.out = None if tied else nn.Linear(4, 7, bias=False)
        self.tied = tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.mix(self.embedding(tokens))).mean(dim=1)
        weight = self.embedding.weight if self.tied else self.out.weight
        return functional.linear(hidden, weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_embedding_weight_used_as_output_layer_is_refused(dtype: torch.dtype) -> None:
    """A tied output layer applied functionally is refused; the untied twin (its own output
    weight, also applied functionally, and not preconditioned) passes, padding included."""
    tokens = torch.randint(0, 7, (16, 5), generator=torch.Generator().manual_seed(0))
    tokens[:, -1] = 0
    for tied in (False, True):
        torch.manual_seed(0)
        model = TiedLanguageModel(tied).to(dtype)
        precond = KFAC(model, damping=0.1)
        if not tied:
            model(tokens)
            assert precond._weights_checked
            continue
        with pytest.raises(ValueError, match="layer 'embedding' is also used outside"):
            model(tokens)
