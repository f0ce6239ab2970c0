"""K-FAC statistics of ``nn.MultiheadAttention``'s projections.

The attention multiplies by its packed input projection (``in_proj_weight``, ``3E × E``) and
by its ``out_proj`` inside ``F.multi_head_attention_forward``, without calling any layer, so no
layer hook sees their inputs. On the steps that record statistics the attention's forward
runs under :class:`AttentionRecording`, a ``TorchFunctionMode`` that takes over the call of
``F.multi_head_attention_forward``: it applies the two projections itself, as ordinary linear
layers on batch-first inputs whose calls the preconditioner records, and runs the attention
in between with identity projections (exact: a product with the identity and a zero bias
returns its input unchanged). The values and gradients are those of the plain forward.

The packed input projection is preconditioned as one layer of ``3E`` outputs when the
attention is a self-attention (``query is key is value``, as in ``nn.Transformer`` layers);
its rows act on different inputs otherwise, and such calls record only the output
projection. Attentions with separate ``kdim``/``vdim`` projections are left out.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    from natgrad.optim.kfac import KFAC
    from natgrad.optim.kfac_layers import LayerState

__all__ = ["AttentionHooks", "AttentionLayers", "attention_projections", "in_projection"]


def in_projection(attention: nn.MultiheadAttention) -> nn.Linear:
    """An ``nn.Linear`` holding the attention's ``in_proj_weight`` and ``in_proj_bias`` (the
    same parameters, not copies), never called: the layer K-FAC preconditions them as."""
    projection = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(projection)
    projection.in_features = attention.embed_dim
    projection.out_features = 3 * attention.embed_dim
    projection.weight = attention.in_proj_weight
    projection.bias = attention.in_proj_bias
    return projection


def attention_projections(
    name: str, attention: nn.MultiheadAttention
) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of the attention's projections K-FAC can precondition: the packed
    input projection (``"{name}.in_proj"``) and ``out_proj`` (``"{name}.out_proj"``); none
    with separate ``kdim`` / ``vdim`` projections."""
    if not attention._qkv_same_embed_dim:
        return []
    prefix = f"{name}." if name else ""
    return [
        (f"{prefix}in_proj", in_projection(attention)),
        (f"{prefix}out_proj", attention.out_proj),
    ]


class AttentionLayers:
    """The preconditioned projections of one attention: the states of the packed input
    projection and of ``out_proj`` (``None`` where not preconditioned)."""

    def __init__(
        self,
        attention: nn.MultiheadAttention,
        input_state: LayerState | None,
        output_state: LayerState | None,
    ) -> None:
        self.attention = attention
        self.input_state = input_state
        self.output_state = output_state


class AttentionRecording(TorchFunctionMode):
    """Active during one forward pass of an attention on a recording step: runs its
    ``F.multi_head_attention_forward`` with the projections applied as recorded linear
    layers; every other torch function passes through."""

    def __init__(self, precond: KFAC, layers: AttentionLayers) -> None:
        super().__init__()
        self._precond = precond
        self._layers = layers

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is not functional.multi_head_attention_forward:
            return func(*args, **kwargs)
        if not self._precond._recording(self._layers.attention):
            return func(*args, **kwargs)
        return self._attend(func, args, kwargs)

    def _attend(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Tensor, Tensor | None]:
        query, key, value, *rest = args
        in_weight, in_bias, out_weight, out_bias = rest[2], rest[3], rest[8], rest[9]
        embed_dim = out_weight.shape[0]
        input_state = self._layers.input_state
        if input_state is not None and query is key and key is value:
            projected = self._project(input_state, query, in_weight, in_bias)
            query, key, value = projected.chunk(3, dim=-1)
            rest[2] = torch.eye(embed_dim, dtype=query.dtype, device=query.device).repeat(3, 1)
            rest[3] = None if in_bias is None else torch.zeros_like(in_bias)
        elif input_state is not None:
            self._precond._warn_cross_attention(input_state)
        if self._layers.output_state is None:
            return func(query, key, value, *rest, **kwargs)
        rest[8] = torch.eye(embed_dim, dtype=out_weight.dtype, device=out_weight.device)
        rest[9] = None if out_bias is None else torch.zeros_like(out_bias)
        attended, weights = func(query, key, value, *rest, **kwargs)
        output = self._project(self._layers.output_state, attended, out_weight, out_bias)
        return output, weights

    def _project(
        self, state: LayerState, rows: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        """``rows @ weightᵀ + bias`` for sequence-first rows ``(T, N, d)`` (unbatched:
        ``(T, d)``), computed batch-first and recorded as a call of ``state``'s layer."""
        batch_first = rows.transpose(0, 1) if rows.ndim == 3 else rows.unsqueeze(0)
        output = functional.linear(batch_first, weight, bias)
        self._precond._record_call(state, self._layers.attention, batch_first, output)
        return output.transpose(0, 1) if rows.ndim == 3 else output.squeeze(0)


class AttentionHooks:
    """The forward pre-hook and (always called) forward hook that run an attention's forward
    under :class:`AttentionRecording`. They hold the preconditioner weakly and pickle and
    deep-copy to inert hooks, as the layers' hooks do."""

    def __init__(self, precond: KFAC | None, layers: AttentionLayers | None) -> None:
        self._precond = None if precond is None else weakref.ref(precond)
        self._layers = layers
        self._active: list[AttentionRecording] = []

    def enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        precond = None if self._precond is None else self._precond()
        if precond is None:
            return
        recording = AttentionRecording(precond, self._layers)
        recording.__enter__()
        self._active.append(recording)

    def leave(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._active:
            self._active.pop().__exit__(None, None, None)

    def register(self, attention: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Attach both hooks to ``attention``; returns their handles."""
        return [
            attention.register_forward_pre_hook(self.enter),
            attention.register_forward_hook(self.leave, always_call=True),
        ]

    def __reduce__(self) -> tuple[type[AttentionHooks], tuple[None, None]]:
        return AttentionHooks, (None, None)
