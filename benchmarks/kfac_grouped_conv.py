"""K-FAC on grouped (depthwise) convolutions: the cost of a step with one Kronecker block per
group, stacked and batched, against the same blocks as one layer per group, and against leaving
the grouped layers out.

The model is a depthwise-separable CNN for 3×32×32 inputs (MobileNet's building block: a 3×3
convolution, then two blocks of a depthwise 3×3 convolution with ``groups = channels`` and a
pointwise 1×1 convolution, the second block strided, global average pooling and a linear head;
batch 64, random images, since only the cost is measured). Three K-FAC set-ups precondition it
(empirical Fisher, factored damping, SGD-momentum):

- ``grouped``: natgrad's K-FAC on the model as it is: each depthwise layer's 32 or 64 blocks are
  stacked ``(g, d, d)`` factors, and every product is batched over the groups;
- ``one layer per group``: the same function with each depthwise layer split into one ordinary
  convolution per channel (the same blocks, checked equal to the grouped ones before timing),
  so K-FAC handles 32 and 64 separate layers;
- ``grouped layers left out``: K-FAC on the other layers only, the depthwise gradients passed
  through (what natgrad did before it supported grouped convolutions);
- ``grouped, reduce``: as ``grouped`` with ``kfac_approx="reduce"``, whose factors come from
  each image's mean patch instead of the patches at all ``T`` positions.

A step (forward, backward, factor and inverse updates as scheduled, preconditioning, update)
is timed relative to a plain SGD-momentum step of the grouped model in the same round, with
factors and inverses every step (1/1) and every 10 steps (10/10); median over ``--rounds``
interleaved rounds of ``--steps`` steps.

Run ``python benchmarks/kfac_grouped_conv.py`` (about 8 minutes with 1 torch thread). Writes
``benchmarks/results/kfac_grouped_conv.json``.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from _report import environment, print_table, save_json
from _timing import cost_rows, interleaved_costs
from kfac_reduce import kfac_step

INTERVALS = (1, 10)
SETUPS = ("grouped", "grouped, reduce", "one layer per group", "grouped layers left out")


def separable_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1, groups=64),
        nn.ReLU(),
        nn.Conv2d(64, 128, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


class PerGroup(nn.Module):
    """A grouped convolution as one ordinary convolution per group (weights copied)."""

    def __init__(self, grouped: nn.Conv2d) -> None:
        super().__init__()
        self.width = grouped.in_channels // grouped.groups
        self.parts = nn.ModuleList()
        for weight, bias in zip(
            grouped.weight.detach().chunk(grouped.groups),
            grouped.bias.detach().chunk(grouped.groups),
            strict=True,
        ):
            part = nn.Conv2d(
                self.width, len(weight), grouped.kernel_size, grouped.stride, grouped.padding
            )
            with torch.no_grad():
                part.weight.copy_(weight)
                part.bias.copy_(bias)
            self.parts.append(part)

    def forward(self, inputs: Tensor) -> Tensor:
        pieces = inputs.split(self.width, dim=1)
        return torch.cat([part(piece) for part, piece in zip(self.parts, pieces, strict=True)], 1)


def per_group(model: nn.Sequential) -> nn.Sequential:
    """``model`` with every grouped convolution split into one convolution per group."""
    split = copy.deepcopy(model)
    for index, module in enumerate(model):
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            split[index] = PerGroup(module)
    return split


def ungrouped_layers(model: nn.Module) -> list[nn.Module]:
    return [
        module
        for module in model.modules()
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)
    ]


def make_step(
    setup: str | None, interval: int, inputs: Tensor, labels: Tensor
) -> tuple[Callable[[], None], nn.Module]:
    """A training step of SGD-momentum, preconditioned by K-FAC in ``setup`` (None: plain)."""
    torch.manual_seed(0)
    model = separable_cnn()
    if setup == "one layer per group":
        model = per_group(model)
    options = {"kfac_approx": "reduce" if setup == "grouped, reduce" else "expand"}
    if setup == "grouped layers left out":
        options["layers"] = ungrouped_layers(model)
    step = kfac_step(model, inputs, labels, None if setup is None else interval, **options)
    return step, model


def check_same_blocks(inputs: Tensor, labels: Tensor) -> float:
    """Largest relative difference between the grouped model's preconditioned depthwise
    gradients and those of the one-layer-per-group model, after 3 steps of each."""
    grouped_step, grouped = make_step("grouped", 1, inputs, labels)
    split_step, split = make_step("one layer per group", 1, inputs, labels)
    for _ in range(3):
        grouped_step()
        split_step()
    worst = 0.0
    for index, module in enumerate(grouped):
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            expected = torch.cat([part.weight.grad for part in split[index].parts])
            difference = (module.weight.grad - expected).norm() / expected.norm()
            worst = max(worst, float(difference))
    return worst


def step_costs(inputs: Tensor, labels: Tensor, steps: int, rounds: int) -> list[dict]:
    """Per-step milliseconds and the ratio to the grouped model's SGD step of the same round."""
    sgd, _ = make_step(None, 1, inputs, labels)
    keys = [(setup, interval) for interval in INTERVALS for setup in SETUPS]
    steppers = {key: make_step(*key, inputs, labels)[0] for key in keys}
    for step in [sgd, *steppers.values()]:
        for _ in range(10):
            step()
    base, costs = interleaved_costs(sgd, steppers, steps, rounds)

    def describe(key: tuple[str, int] | None) -> dict:
        if key is None:
            return {"setup": "SGD", "intervals": ""}
        setup, interval = key
        return {"setup": f"K-FAC, {setup}", "intervals": f"{interval}/{interval}"}

    return cost_rows(base, costs, describe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per timing (default 20)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (64,), generator=generator)
    difference = check_same_blocks(inputs, labels)
    print(f"grouped vs one layer per group, preconditioned gradients: {difference:.1e} (relative)")
    costs = step_costs(inputs, labels, args.steps, args.rounds)
    print_table(
        "Cost of a K-FAC step (empirical Fisher, factored damping) on a depthwise-separable CNN "
        "relative to SGD-momentum",
        costs,
        ["setup", "intervals", "ms_per_step", "x_sgd"],
    )
    save_json(
        "kfac_grouped_conv",
        {
            "environment": environment(steps=args.steps, rounds=args.rounds),
            "relative_difference": difference,
            "step_cost": costs,
        },
    )


if __name__ == "__main__":
    main()
