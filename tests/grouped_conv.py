"""A grouped convolution as one ordinary convolution per group: the oracle of the grouped
K-FAC tests (the same function, whose ungrouped layers K-FAC already handles)."""

import copy

import torch
from torch import nn


class SplitConv(nn.Module):
    """``grouped``'s weights copied into one ordinary convolution per group, applied to the
    group's input channels, outputs concatenated."""

    def __init__(self, grouped: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__()
        groups = grouped.groups
        self.in_per_group = grouped.in_channels // groups
        biases = [None] * groups if grouped.bias is None else grouped.bias.detach().chunk(groups)
        self.parts = nn.ModuleList()
        for weight, bias in zip(grouped.weight.detach().chunk(groups), biases, strict=True):
            part = type(grouped)(
                self.in_per_group,
                len(weight),
                grouped.kernel_size,
                stride=grouped.stride,
                padding=grouped.padding,
                dilation=grouped.dilation,
                bias=bias is not None,
                padding_mode=grouped.padding_mode,
            ).to(weight.dtype)
            with torch.no_grad():
                part.weight.copy_(weight)
                if bias is not None:
                    part.bias.copy_(bias)
            self.parts.append(part)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        slices = inputs.split(self.in_per_group, dim=1)
        return torch.cat([part(piece) for part, piece in zip(self.parts, slices, strict=True)], 1)


def split_twin(model: nn.Sequential, index: int = 0) -> nn.Sequential:
    """``model`` with its grouped convolution at ``index`` replaced by a :class:`SplitConv`."""
    twin = copy.deepcopy(model)
    twin[index] = SplitConv(model[index])
    return twin


def twin_positions(model: nn.Sequential, index: int = 0) -> torch.Tensor:
    """For each entry of ``model``'s flat parameter vector, its position in the flat vector of
    :func:`split_twin` (whose split layer lists each group's weight and bias in turn)."""
    sizes = [param.numel() for param in model.parameters()]
    ids = torch.arange(sum(sizes)).split(sizes)
    names = [name for name, _ in model.named_parameters()]
    conv = model[index]
    weight = ids[names.index(f"{index}.weight")].reshape(conv.weight.shape).chunk(conv.groups)
    parts: list[torch.Tensor] = []
    for group, weight_ids in enumerate(weight):
        parts.append(weight_ids.reshape(-1))
        if conv.bias is not None:
            parts.append(ids[names.index(f"{index}.bias")].chunk(conv.groups)[group])
    split = {f"{index}.weight", f"{index}.bias"}
    before = [
        ids[i]
        for i, name in enumerate(names)
        if name not in split and i < names.index(f"{index}.weight")
    ]
    after = [
        ids[i]
        for i, name in enumerate(names)
        if name not in split and i > names.index(f"{index}.weight")
    ]
    order = torch.cat([*before, *parts, *after])  # twin's flat order, as ids of model's entries
    positions = torch.empty_like(order)
    positions[order] = torch.arange(len(order))
    return positions
