"""K-FAC on ``nn.MultiheadAttention``: its packed input projection and ``out_proj`` are
preconditioned as the linear layers they are. The oracle is a twin attention written with
``nn.Linear`` projections (the same weights), which K-FAC covers through its layer hooks: both
must take the same steps."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from kfac_training import fisher_options, train_steps
from natgrad.optim import EKFAC, KFAC

EMBED, HEADS, TOKENS, CLASSES = 6, 2, 4, 3


class LinearAttention(nn.Module):
    """Multi-head self-attention from two ``nn.Linear`` layers, batch first."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(EMBED, 3 * EMBED)
        self.out = nn.Linear(EMBED, EMBED)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = inputs.shape
        heads = self.qkv(inputs).reshape(batch, tokens, 3, HEADS, EMBED // HEADS)
        query, key, value = heads.permute(2, 0, 3, 1, 4)
        scores = query @ key.transpose(-2, -1) / math.sqrt(EMBED // HEADS)
        mixed = (scores.softmax(dim=-1) @ value).transpose(1, 2).reshape(batch, tokens, EMBED)
        return self.out(mixed)


class Classifier(nn.Module):
    def __init__(self, attention: nn.Module, batch_first: bool = True) -> None:
        super().__init__()
        self.attention, self.batch_first = attention, batch_first
        self.head = nn.Linear(TOKENS * EMBED, CLASSES)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if isinstance(self.attention, nn.MultiheadAttention):
            tokens = inputs if self.batch_first else inputs.transpose(0, 1)
            mixed, _ = self.attention(tokens, tokens, tokens)
            mixed = mixed if self.batch_first else mixed.transpose(0, 1)
        else:
            mixed = self.attention(inputs)
        return self.head(torch.tanh(mixed).flatten(1))


def twins(batch_first: bool) -> tuple[Classifier, Classifier]:
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(EMBED, HEADS, batch_first=batch_first)
    with torch.no_grad():
        attention.in_proj_bias.normal_()
        attention.out_proj.bias.normal_()
    model = Classifier(attention, batch_first).double()
    twin = Classifier(LinearAttention()).double()
    with torch.no_grad():
        twin.attention.qkv.weight.copy_(attention.in_proj_weight)
        twin.attention.qkv.bias.copy_(attention.in_proj_bias)
        twin.attention.out.load_state_dict(attention.out_proj.state_dict())
        twin.head.load_state_dict(model.head.state_dict())
    return model, twin


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(5, TOKENS, EMBED, generator=generator, dtype=torch.float64)
    return inputs, torch.randint(0, CLASSES, (5,), generator=generator)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "exact"])
@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
def test_attention_projections_are_preconditioned_as_their_linear_twins(
    preconditioner, fisher_type: str, batch_first: bool
) -> None:
    results = []
    for model in twins(batch_first):
        options = fisher_options(fisher_type, seed=4)
        precond = preconditioner(model, damping=0.1, inv_update_interval=1, **options)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
        for seed in range(3):
            train_steps(model, precond, optimizer, *batch(seed), steps=1)
        results.append((model, precond))
    (model, precond), (twin, twin_precond) = results
    assert [state.name for state in precond.layers] == [
        "attention.in_proj",
        "attention.out_proj",
        "head",
    ]
    for ours, theirs in zip(precond.layers, twin_precond.layers, strict=True):
        torch.testing.assert_close(ours.input_factor, theirs.input_factor)
        torch.testing.assert_close(ours.output_factor, theirs.output_factor)
    for ours, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_a_cross_attention_call_records_only_the_output_projection() -> None:
    """The packed input projection's rows act on different inputs when ``query`` is not
    ``key``: no Kronecker block of one layer describes it, so it records nothing (named in a
    warning) while ``out_proj`` is preconditioned."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(EMBED, HEADS, batch_first=True).double()
    precond = KFAC(attention, damping=0.1)
    inputs, _ = batch(0)
    memory = torch.randn(5, 7, EMBED, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="'in_proj' records nothing on cross-attention"):
        mixed, _ = attention(inputs, memory, memory)
    mixed.square().sum().backward()
    plain = attention.in_proj_weight.grad.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not also the generic silent-layer warning
        precond.step()
    torch.testing.assert_close(attention.in_proj_weight.grad, plain, rtol=0, atol=0)
    assert precond.layers[1].input_factor is not None


def test_a_transformer_layer_records_with_the_plain_values_and_gradients() -> None:
    """An ``nn.TransformerEncoderLayer`` records its attention's projections; the recording
    forward gives the plain forward's values and gradients, and on a step that records
    nothing the forward is the plain one, bit for bit."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(EMBED, HEADS, 8, dropout=0.0, batch_first=True).double()
    plain = copy.deepcopy(layer)
    precond = KFAC(layer, damping=0.1, factor_update_interval=2)
    names = [state.name for state in precond.layers]
    assert names[:2] == ["self_attn.in_proj", "self_attn.out_proj"]
    inputs, _ = batch(0)
    for model in (layer, plain):
        model(inputs).square().mean().backward()
    torch.testing.assert_close(layer(inputs), plain(inputs))
    for ours, theirs in zip(layer.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precond.step()
    assert precond.layers[0].input_factor is not None
    torch.testing.assert_close(layer(inputs), plain(inputs), rtol=0, atol=0)


def test_choosing_an_attention_selects_both_projections() -> None:
    model, _ = twins(True)
    precond = KFAC(model, layers=[model.attention])
    assert [state.name for state in precond.layers] == ["attention.in_proj", "attention.out_proj"]
    with pytest.raises(ValueError, match=r"pass the nn\.MultiheadAttention module"):
        KFAC(model, layers=[model.attention.out_proj])
    separate = nn.MultiheadAttention(EMBED, HEADS, kdim=3, vdim=3)
    with pytest.raises(ValueError, match="cannot be preconditioned"):
        KFAC(nn.Sequential(separate), layers=[separate])


MODULE_OPTIONS = {
    "default": {},
    "no bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
}
CALLS = {
    "weights": {},
    "no weights": {"need_weights": False},
    "padding mask": {"key_padding_mask": torch.tensor([[False] * (TOKENS - 1) + [True]] * 5)},
    "causal": {
        "attn_mask": torch.triu(torch.full((TOKENS, TOKENS), -math.inf), 1).double(),
        "is_causal": True,
        "need_weights": False,
    },
    "per-head weights": {"average_attn_weights": False},
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("options", MODULE_OPTIONS)
def test_every_attention_option_records_the_plain_values_and_gradients(
    options: str, call: str
) -> None:
    """The recording forward runs the attention's own code with identity projections, so its
    options (biases on keys and values, a zero attention slot, masks, causal attention,
    attention weights) keep their effect: outputs, weights and gradients are the plain
    forward's, and both projections record."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(EMBED, HEADS, batch_first=True, **MODULE_OPTIONS[options])
    attention = attention.double()
    plain = copy.deepcopy(attention)
    precond = KFAC(attention, damping=0.1)
    inputs, _ = batch(0)
    results = []
    for module in (attention, plain):
        outputs, weights = module(inputs, inputs, inputs, **CALLS[call])
        outputs.square().sum().backward()
        results.append((outputs, weights))
    (outputs, weights), (plain_outputs, plain_weights) = results
    torch.testing.assert_close(outputs, plain_outputs)
    if weights is not None:
        torch.testing.assert_close(weights, plain_weights)
    for ours, theirs in zip(attention.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad)
    precond.step()
    assert all(state.input_factor is not None for state in precond.layers)
