"""K-FAC on ``nn.MultiheadAttention``: its packed input projection and ``out_proj`` are
preconditioned as the linear layers they are, the input projection as three (its query, key
and value rows, each on its own input). The oracle is a twin attention written with four
``nn.Linear`` projections (the same weights), which K-FAC covers through its layer hooks: both
must take the same steps, in self-attention and in cross-attention on sequences of other
lengths."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from kfac_training import fisher_options, train_steps
from natgrad.optim import EKFAC, KFAC

EMBED, HEADS, TOKENS, CLASSES = 6, 2, 4, 3
MEMORY = 3  # positions of the cross-attention's key and value sequences


class LinearAttention(nn.Module):
    """Multi-head attention from four ``nn.Linear`` layers, batch first."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(EMBED, EMBED) for _ in range(3))
        self.out = nn.Linear(EMBED, EMBED)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        def heads(rows: torch.Tensor) -> torch.Tensor:
            return rows.unflatten(-1, (HEADS, EMBED // HEADS)).transpose(1, 2)

        query, key, value = heads(self.q(query)), heads(self.k(key)), heads(self.v(value))
        scores = query @ key.transpose(-2, -1) / math.sqrt(EMBED // HEADS)
        mixed = (scores.softmax(dim=-1) @ value).transpose(1, 2).flatten(2)
        return self.out(mixed)


class Classifier(nn.Module):
    """Attention over the tokens (self-attention) or from the tokens to a memory sequence
    made from them by a linear map (cross-attention; with ``separate_values`` the values are
    another such sequence), then a linear head."""

    def __init__(
        self,
        attention: nn.Module,
        batch_first: bool = True,
        cross: bool = False,
        separate_values: bool = False,
    ) -> None:
        super().__init__()
        self.attention, self.batch_first, self.cross = attention, batch_first, cross
        self.separate_values = separate_values
        self.memory = nn.Parameter(torch.randn(MEMORY, TOKENS)) if cross else None
        self.head = nn.Linear(TOKENS * EMBED, CLASSES)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        key = value = inputs
        if self.cross:
            key = self.memory @ inputs  # (N, MEMORY, EMBED)
            value = key.flip(-1) if self.separate_values else key
        if isinstance(self.attention, nn.MultiheadAttention):
            rows = (inputs, key, value)
            if not self.batch_first:
                rows = tuple(part.transpose(0, 1) for part in rows)
            mixed, _ = self.attention(*rows)
            mixed = mixed if self.batch_first else mixed.transpose(0, 1)
        else:
            mixed = self.attention(inputs, key, value)
        return self.head(torch.tanh(mixed).flatten(1))


def twins(
    batch_first: bool, cross: bool = False, separate_values: bool = False
) -> tuple[Classifier, Classifier]:
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(EMBED, HEADS, batch_first=batch_first)
    with torch.no_grad():
        attention.in_proj_bias.normal_()
        attention.out_proj.bias.normal_()
    model = Classifier(attention, batch_first, cross, separate_values).double()
    twin = Classifier(LinearAttention(), True, cross, separate_values).double()
    with torch.no_grad():
        for index, linear in enumerate((twin.attention.q, twin.attention.k, twin.attention.v)):
            linear.weight.copy_(attention.in_proj_weight.chunk(3)[index])
            linear.bias.copy_(attention.in_proj_bias.chunk(3)[index])
        twin.attention.out.load_state_dict(attention.out_proj.state_dict())
        twin.head.load_state_dict(model.head.state_dict())
        if cross:
            twin.memory.copy_(model.memory)
    return model, twin


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(5, TOKENS, EMBED, generator=generator, dtype=torch.float64)
    return inputs, torch.randint(0, CLASSES, (5,), generator=generator)


def train_twins(models, preconditioner, fisher_type: str, **options) -> list:
    """Three steps of each model on three batches; the preconditioners."""
    preconds = []
    for model in models:
        precond = preconditioner(
            model,
            damping=0.1,
            inv_update_interval=1,
            **fisher_options(fisher_type, seed=4),
            **options,
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
        for seed in range(3):
            train_steps(model, precond, optimizer, *batch(seed), steps=1)
        preconds.append(precond)
    return preconds


def assert_twin_states(precond: KFAC, twin_precond: KFAC) -> None:
    """The packed projection's three blocks are the twin's q, k and v layers'; the other
    layers are the same."""
    states = {state.name: state for state in precond.layers}
    twin_states = {state.name: state for state in twin_precond.layers}
    packed = states.pop("attention.in_proj")
    for index, name in enumerate(["attention.q", "attention.k", "attention.v"]):
        twin_state = twin_states.pop(name)
        torch.testing.assert_close(packed.input_factor[index], twin_state.input_factor)
        torch.testing.assert_close(packed.output_factor[index], twin_state.output_factor)
    twin_states["attention.out_proj"] = twin_states.pop("attention.out")
    assert sorted(states) == sorted(twin_states)
    for name, state in states.items():
        torch.testing.assert_close(state.input_factor, twin_states[name].input_factor)
        torch.testing.assert_close(state.output_factor, twin_states[name].output_factor)


def assert_twin_parameters(model: Classifier, twin: Classifier) -> None:
    attention, linears = model.attention, twin.attention
    packed = [linears.q, linears.k, linears.v]
    torch.testing.assert_close(
        attention.in_proj_weight, torch.cat([linear.weight for linear in packed])
    )
    torch.testing.assert_close(
        attention.in_proj_bias, torch.cat([linear.bias for linear in packed])
    )
    torch.testing.assert_close(
        attention.out_proj.state_dict(), linears.out.state_dict(), check_dtype=True
    )
    torch.testing.assert_close(model.head.state_dict(), twin.head.state_dict())
    if model.cross:
        torch.testing.assert_close(model.memory, twin.memory)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "exact"])
@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
@pytest.mark.parametrize("attention", ["self", "cross", "cross, separate values"])
def test_attention_projections_are_preconditioned_as_their_linear_twins(
    attention: str, preconditioner, fisher_type: str, batch_first: bool
) -> None:
    models = twins(batch_first, cross=attention != "self", separate_values="separate" in attention)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precond, twin_precond = train_twins(models, preconditioner, fisher_type)
    assert [state.name for state in precond.layers][:2] == [
        "attention.in_proj",
        "attention.out_proj",
    ]
    assert_twin_states(precond, twin_precond)
    assert_twin_parameters(*models)


@pytest.mark.parametrize("attention", ["self", "cross"])
def test_reduce_treats_the_packed_rows_as_their_linear_twins(attention: str) -> None:
    """K-FAC-reduce: each row block's ``A`` from its input's means over its own positions.
    (The key rows' ``G`` vanishes under reduce, the key gradients summing to zero over the
    positions, as the softmax ignores a shift of all keys; so EKFAC's eigenbasis of it is
    round-off, and only K-FAC is compared.)"""
    models = twins(True, cross=attention == "cross")
    precond, twin_precond = train_twins(models, KFAC, "mc", kfac_approx="reduce")
    assert float(precond.layers[0].output_factor[1].abs().max()) < 1e-20
    assert_twin_states(precond, twin_precond)
    assert_twin_parameters(*models)


def test_a_cross_attention_call_records_with_the_plain_values_and_gradients() -> None:
    """Unbatched and batched cross-attention, key and value of another length than the query:
    the recording forward gives the plain forward's outputs and gradients."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(EMBED, HEADS).double()
    plain = copy.deepcopy(attention)
    precond = KFAC(attention, damping=0.1)
    for shape in [(TOKENS, EMBED), (TOKENS, 5, EMBED)]:
        query = torch.randn(*shape, dtype=torch.float64)
        memory = torch.randn(7, *shape[1:], dtype=torch.float64)
        results = []
        for module in (attention, plain):
            module.zero_grad()
            outputs, weights = module(query, memory, memory.tanh())
            outputs.square().sum().backward()
            results.append(
                (outputs, weights, [param.grad.clone() for param in module.parameters()])
            )
        torch.testing.assert_close(results[0][0], results[1][0])
        torch.testing.assert_close(results[0][1], results[1][1])
        for ours, theirs in zip(results[0][2], results[1][2], strict=True):
            torch.testing.assert_close(ours, theirs)
        precond.discard_statistics()


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


def test_choosing_an_attention_selects_its_projections() -> None:
    model, _ = twins(True)
    precond = KFAC(model, layers=[model.attention])
    assert [state.name for state in precond.layers] == ["attention.in_proj", "attention.out_proj"]
    with pytest.raises(ValueError, match=r"pass the nn\.MultiheadAttention module"):
        KFAC(model, layers=[model.attention.out_proj])
    separate = nn.MultiheadAttention(EMBED, HEADS, kdim=3, vdim=3)
    chosen = KFAC(nn.Sequential(separate), layers=[separate])
    assert [state.name for state in chosen.layers] == [
        "0.q_proj",
        "0.k_proj",
        "0.v_proj",
        "0.out_proj",
    ]
    chosen.remove()
    separate.requires_grad_(False)
    with pytest.raises(ValueError, match="'0' cannot be preconditioned"):
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


@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
def test_every_projection_of_an_encoder_decoder_transformer_records(preconditioner) -> None:
    """``nn.Transformer``: the decoder's cross-attention (memory of another length than the
    target) records its input projection too; no layer is left silent, nothing warns."""
    torch.manual_seed(0)
    model = nn.Transformer(EMBED, HEADS, 1, 1, 8, dropout=0.0, batch_first=True).double()
    source = torch.randn(3, 6, EMBED, dtype=torch.float64)
    target = torch.randn(3, TOKENS, EMBED, dtype=torch.float64)
    precond = preconditioner(model, damping=0.1)
    assert "decoder.layers.0.multihead_attn.in_proj" in [state.name for state in precond.layers]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (model(source, target) - target).square().mean().backward()
        precond.step()
    assert all(state.input_factor is not None for state in precond.layers)
