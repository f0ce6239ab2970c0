"""K-FAC statistics of ``nn.MultiheadAttention``'s projections.

The attention multiplies by its packed input projection (``in_proj_weight``, ``3E × E``) and
by its ``out_proj`` inside ``F.multi_head_attention_forward``, without calling any layer, so no
layer hook sees their inputs. On the steps that record statistics the attention's forward
runs under :class:`AttentionRecording`, a ``TorchFunctionMode`` that takes over the call of
``F.multi_head_attention_forward``: it applies the two projections itself, as linear layers on
batch-first inputs whose calls the preconditioner records, and runs the attention in between
with identity projections (exact: a product with the identity and a zero bias returns its
input unchanged). The values and gradients are those of the plain forward.

The packed input projection is three linear maps, the query, key and value rows, each with
its own input (the same one in a self-attention, ``query is key is value``; the target and
the memory sequences in a cross-attention). K-FAC gives each its own block ``G_j ⊗ A_j``
(:class:`PackedProjectionState`), as it would give three ``nn.Linear`` layers: the layer's
block is block diagonal over the three, like a grouped convolution's over its groups.
An attention with ``kdim``/``vdim`` has separate query, key and value weights of different
widths instead (``q_proj_weight``, ...), each preconditioned as a linear layer of its own
(:class:`SeparateProjection`) without its share of the packed ``in_proj_bias``, which keeps its
plain gradient (a bias of three layers, which no one layer's block describes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional

from natgrad.curvature.kfac_capture import add_column_gram
from natgrad.optim.kfac_layers import GroupedConvState
from natgrad.optim.kfac_mode_hooks import RecordingMode, linear_view

if TYPE_CHECKING:
    from natgrad.optim.kfac_layers import LayerState

__all__ = [
    "AttentionLayers",
    "AttentionRecording",
    "PackedInProjection",
    "PackedProjectionState",
    "SeparateProjection",
    "attention_projections",
    "in_projection",
]

PACKED = 3  # the query, key and value rows of the packed input projection
SEPARATE = ("q", "k", "v")  # the separate projection weights' prefixes, with kdim / vdim


class PackedInProjection(nn.Linear):
    """The attention's ``in_proj_weight`` ``(3E, E)`` and ``in_proj_bias`` (the same
    parameters, not copies) as a layer of ``groups = 3`` row blocks, never called."""

    groups = PACKED


class SeparateProjection(nn.Linear):
    """One of the query, key and value weights of an attention with ``kdim`` / ``vdim``
    (``q_proj_weight``, ...; the same parameter, not a copy), without its share of the packed
    ``in_proj_bias``, never called."""


def in_projection(attention: nn.MultiheadAttention) -> PackedInProjection:
    """The :class:`PackedInProjection` of ``attention``: the layer K-FAC preconditions its
    packed input projection as."""
    return linear_view(PackedInProjection, attention.in_proj_weight, attention.in_proj_bias)


def _with_ones(layer_input: Tensor) -> Tensor:
    """``[x, 1]``: the input with a column of ones appended."""
    return torch.cat([layer_input, layer_input.new_ones(*layer_input.shape[:-1], 1)], dim=-1)


class PackedProjectionState(GroupedConvState):
    """K-FAC state of a :class:`PackedInProjection`: one block ``G_j ⊗ A_j`` for each of the
    query, key and value rows ``j``, stacked ``(3, d, d)`` (the products, inverses and
    eigenbases of a grouped convolution's state). ``A_j`` is the mean over samples and
    positions of ``[x, 1] [x, 1]ᵀ`` of the rows' own inputs, ``G_j`` the sum over positions of
    their output gradients' outer products, averaged over samples, as for an ``nn.Linear`` on
    ``(N, T, E)`` inputs.

    A call is recorded from either of two inputs: ``(N, T, E)``, a self-attention's one input
    (all three rows' input), with output ``(N, T, 3E)``; or ``(N, 3, P, E + 1)``, the three
    inputs zero-padded to a common length ``P`` with a last column that is 1 at real positions
    and 0 at padding, with output ``(N, 3, P, E)``. The padded rows add nothing, and ``A_j`` of
    an input of ``L_j`` positions is scaled by ``P / L_j``, so that with the layer's count of
    ``N P`` positions it is the mean over its own ``N L_j``."""

    def record_input(self, layer_input: Tensor) -> Tensor | None:
        """Add each row block's ``Σ_n Σ_t a aᵀ`` (reduce: ``Σ_n ā āᵀ``, ``ā`` the mean over
        its positions); returns the features ``(3, N, P, E [+ 1])`` if pairs are kept (EKFAC),
        else ``None``."""
        layer_input = layer_input.detach().to(self.dtype)
        padded = layer_input.ndim == 4
        rows = (
            layer_input.movedim(1, 0)
            if padded
            else _with_ones(layer_input).expand(PACKED, -1, -1, -1)
        )
        samples, positions = rows.shape[1], rows.shape[2]
        features = rows if self.layer.has_bias else rows[..., :-1]
        if not padded:  # one input for the three blocks: one Gram matrix, added to each
            shared = features[:1]
            columns = shared.mean(dim=2) if self.reduce else shared.flatten(1, 2)
        elif self.reduce:
            columns = features.sum(dim=2) / rows[..., -1].sum(dim=2, keepdim=True)
        else:
            lengths = rows[..., -1:].sum(dim=2, keepdim=True)  # (3, N, 1, 1)
            columns = (features * (positions / lengths).sqrt()).flatten(1, 2)
        self._add_input_gram(add_column_gram(None, columns.mT, ones=False, fresh=True))
        self.input_count += samples if self.reduce else samples * positions
        return features if self.keep_pairs else None

    def _add_input_gram(self, gram: Tensor) -> None:
        """Add ``(3, d, d)`` Gram matrices, or one ``(1, d, d)`` to every block, to ``A``'s sums."""
        if self.input_count == 0 or self.input_sum is None:
            self.input_sum = gram.expand(PACKED, -1, -1).clone()
        else:
            self.input_sum.add_(gram)

    def record_output_grad(
        self, grad: Tensor, scale: float, features: Tensor, call_pass: int, vector: int = 0
    ) -> None:
        """Add each row block's ``Σ_n Σ_t g gᵀ`` (reduce: ``Σ_n ĝ ĝᵀ``, ``ĝ`` the sum over
        positions) for output gradients ``scale · grad``, ``(N, T, 3E)`` or ``(N, 3, P, E)``
        (see the class), of a call of forward pass ``call_pass``, from its ``vector``-th
        backward vector."""
        grad = grad.detach().to(self.dtype)
        if grad.ndim == 3:  # (N, T, 3E): a self-attention's
            grad = grad.unflatten(-1, (PACKED, self._rows)).permute(2, 0, 1, 3)
        else:  # (N, 3, P, E)
            grad = grad.movedim(1, 0)
        if scale != 1.0:
            grad = grad * scale
        columns = grad.sum(dim=2) if self.reduce else grad.flatten(1, 2)
        fresh = self.output_count == 0
        self.output_sum = add_column_gram(self.output_sum, columns.mT, ones=False, fresh=fresh)
        pair = (features, grad) if self.keep_pairs else None
        self._count_samples(grad.shape[1], call_pass, pair, vector)


def attention_projections(
    name: str, attention: nn.MultiheadAttention
) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of the attention's projections K-FAC can precondition: the packed
    input projection (``"{name}.in_proj"``), or with ``kdim`` / ``vdim`` the separate query,
    key and value weights (``"{name}.q_proj"``, ``"{name}.k_proj"``, ``"{name}.v_proj"``,
    each without its share of the packed bias, which keeps its gradient), and ``out_proj``
    (``"{name}.out_proj"``)."""
    prefix = f"{name}." if name else ""
    if attention._qkv_same_embed_dim:
        inputs = [(f"{prefix}in_proj", in_projection(attention))]
    else:
        inputs = [
            (
                f"{prefix}{kind}_proj",
                linear_view(SeparateProjection, getattr(attention, f"{kind}_proj_weight"), None),
            )
            for kind in SEPARATE
        ]
    return [*inputs, (f"{prefix}out_proj", attention.out_proj)]


class AttentionLayers:
    """The preconditioned projections of one attention: the states of the packed input
    projection, of the separate query, key and value weights (with ``kdim`` / ``vdim``) and of
    ``out_proj`` (``None`` where not preconditioned)."""

    def __init__(
        self,
        attention: nn.MultiheadAttention,
        input_state: LayerState | None,
        output_state: LayerState | None,
        separate_states: tuple[LayerState | None, ...] = (None, None, None),
    ) -> None:
        self.module = attention
        self.input_state = input_state
        self.output_state = output_state
        self.separate_states = separate_states


class AttentionRecording(RecordingMode):
    """Active during one forward pass of an attention on a recording step: runs its
    ``F.multi_head_attention_forward`` with the projections applied as recorded linear
    layers; every other torch function passes through."""

    _layers: AttentionLayers

    def _takes_over(self, func: Callable[..., Any]) -> bool:
        return func is functional.multi_head_attention_forward

    def _run(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Tensor, Tensor | None]:
        query, key, value, *rest = args
        in_weight, in_bias, out_weight, out_bias = rest[2], rest[3], rest[8], rest[9]
        embed_dim = out_weight.shape[0]
        input_state = self._layers.input_state
        if input_state is not None:
            if query is key and key is value:
                projected = self._project(input_state, query, in_weight, in_bias)
                query, key, value = projected.chunk(PACKED, dim=-1)
            else:
                query, key, value = self._project_apart(
                    input_state, (query, key, value), in_weight, in_bias
                )
            identity = torch.eye(embed_dim, dtype=query.dtype, device=query.device)
            rest[2] = identity.repeat(PACKED, 1)
            rest[3] = None if in_bias is None else torch.zeros_like(in_bias)
        elif any(self._layers.separate_states):
            query, key, value = self._project_separately((query, key, value), in_bias, kwargs)
            rest[3] = None if in_bias is None else torch.zeros_like(in_bias)
        if self._layers.output_state is None:
            return func(query, key, value, *rest, **kwargs)
        rest[8] = torch.eye(embed_dim, dtype=out_weight.dtype, device=out_weight.device)
        rest[9] = None if out_bias is None else torch.zeros_like(out_bias)
        attended, weights = func(query, key, value, *rest, **kwargs)
        output = self._project(self._layers.output_state, attended, out_weight, out_bias)
        return output, weights

    def _project_separately(
        self, inputs: tuple[Tensor, Tensor, Tensor], bias: Tensor | None, kwargs: dict[str, Any]
    ) -> tuple[Tensor, ...]:
        """The query, key and value inputs (sequence first) through their separate weights
        (``kwargs``' ``q_proj_weight``, ...) and shares of ``bias``, each product with a
        preconditioned weight recorded; ``kwargs`` then get identity weights."""
        biases = (None,) * PACKED if bias is None else bias.chunk(PACKED)
        projected = []
        for kind, rows, state, share in zip(
            SEPARATE, inputs, self._layers.separate_states, biases, strict=True
        ):
            weight = kwargs[f"{kind}_proj_weight"]
            if state is None:
                projected.append(functional.linear(rows, weight, share))
            else:
                projected.append(self._project(state, rows, weight, share))
            kwargs[f"{kind}_proj_weight"] = torch.eye(
                weight.shape[0], dtype=weight.dtype, device=weight.device
            )
        return tuple(projected)

    def _project(
        self, state: LayerState, rows: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        """``rows @ weightᵀ + bias`` for sequence-first rows ``(T, N, d)`` (unbatched:
        ``(T, d)``), computed batch-first and recorded as a call of ``state``'s layer."""
        batch_first = _batch_first(rows)
        output = functional.linear(batch_first, weight, bias)
        self._precond._record_call(state, self._layers.module, batch_first, output)
        return _sequence_first(output, rows.ndim)

    def _project_apart(
        self,
        state: LayerState,
        inputs: tuple[Tensor, Tensor, Tensor],
        weight: Tensor,
        bias: Tensor | None,
    ) -> tuple[Tensor, ...]:
        """The query, key and value rows of the packed projection applied to their own inputs
        (a cross-attention: sequence first, ``(L_j, N, E)``; unbatched ``(L_j, E)``), as one
        batched product recorded as one call of ``state``'s layer: the three inputs
        zero-padded to the longest, with a column that is 1 at their real positions (which
        multiplies the bias, so padded positions give zero rows), ``(N, 3, P, E + 1)``."""
        batch_first = [_batch_first(rows) for rows in inputs]
        positions = max(rows.shape[1] for rows in batch_first)
        padded = torch.stack(
            [
                functional.pad(_with_ones(rows), (0, 0, 0, positions - rows.shape[1]))
                for rows in batch_first
            ],
            dim=1,
        )
        blocks = weight.unflatten(0, (PACKED, -1))  # (3, E, E)
        if bias is None:
            output = padded[..., :-1] @ blocks.mT
        else:
            output = padded @ torch.cat([blocks, bias.view(PACKED, -1, 1)], dim=2).mT
        self._precond._record_call(state, self._layers.module, padded, output)
        return tuple(
            _sequence_first(output[:, index, : rows.shape[1]], original.ndim)
            for index, (rows, original) in enumerate(zip(batch_first, inputs, strict=True))
        )


def _batch_first(rows: Tensor) -> Tensor:
    """Sequence-first rows ``(L, N, d)`` (unbatched: ``(L, d)``) as ``(N, L, d)``."""
    return rows.transpose(0, 1) if rows.ndim == 3 else rows.unsqueeze(0)


def _sequence_first(rows: Tensor, ndim: int) -> Tensor:
    """The inverse of :func:`_batch_first` for rows that were ``ndim``-dimensional."""
    return rows.transpose(0, 1) if ndim == 3 else rows.squeeze(0)
