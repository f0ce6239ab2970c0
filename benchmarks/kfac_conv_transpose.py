"""Cost of a K-FAC/EKFAC step on a decoder of transposed convolutions, against an SGD step.

The decoder maps 16 × 8 × 8 codes to 1 × 32 × 32 images: ``ConvTranspose2d(16, 16, 4, stride
2, padding 1)``, ReLU, ``ConvTranspose2d(16, 8, 4, stride 2, padding 1)``, ReLU,
``ConvTranspose2d(8, 1, 3, padding 1)``; batch 64, MSE loss, SGD-momentum. K-FAC (empirical
Fisher, factors every step, inverses every 10) builds a transposed convolution's ``A`` from the
non-zero entries of its zero-inserted input, phase by phase (``transposed_patch_gram``); the
"every patch gathered" row switches that off (an ablation: the patches of the zero-inserted
input gathered whole), K-FAC-reduce builds ``A`` from the patches' means, and "kfac_10_10"
records factors only every 10 steps (the step cost of issue 5's target). EKFAC (factors every
step) builds ``A`` as K-FAC does and forms each sample's gradient from the layer's input and
output gradients in one grouped convolution (``transposed_per_sample_gradients``) for its
eigenvalues; its "every patch gathered" row is the ablation that keeps every sample's patches
and projects them instead (EKFAC before 2026-11-25). Median ratio to the SGD step timed just
before, 9 interleaved rounds of 10 steps.

Run ``python benchmarks/kfac_conv_transpose.py`` (about 4 minutes with 1 torch thread). Writes
``benchmarks/results/kfac_conv_transpose.json``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from _report import environment, print_table, save_json
from _timing import interleaved_costs
from natgrad.optim import EKFAC, KFAC
from natgrad.optim.kfac_layers import KroneckerLayerState

METHODS = (
    "kfac",
    "kfac_every_patch_gathered",
    "kfac_reduce",
    "kfac_10_10",
    "ekfac",
    "ekfac_every_patch_gathered",
    "adam",
)


def decoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 1, 3, padding=1),
    )


@contextlib.contextmanager
def patches_gathered(whole: bool) -> Iterator[None]:
    """Within it, if ``whole``, K-FAC-expand gathers a transposed convolution's patches whole
    and EKFAC keeps them as the features of its eigenvalue estimate."""
    phased, keeps_patches = KroneckerLayerState._phased, KroneckerLayerState._keeps_patches
    if whole:
        KroneckerLayerState._phased = lambda self: False
        KroneckerLayerState._keeps_patches = lambda self: self.keep_pairs
    try:
        yield
    finally:
        KroneckerLayerState._phased, KroneckerLayerState._keeps_patches = phased, keeps_patches


def stepper(method: str) -> Callable[[], None]:
    """One training step of ``method`` on a fixed batch."""
    model = decoder()
    generator = torch.Generator().manual_seed(1)
    codes = torch.randn(64, 16, 8, 8, generator=generator)
    images = torch.randn(64, 1, 32, 32, generator=generator)
    if method == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    precond = None
    if method.startswith(("kfac", "ekfac")):
        preconditioner = EKFAC if method.startswith("ekfac") else KFAC
        approx = "reduce" if method == "kfac_reduce" else "expand"
        precond = preconditioner(
            model,
            kfac_approx=approx,
            factor_update_interval=10 if method == "kfac_10_10" else 1,
            inv_update_interval=10,
            damping=1e-2,
        )
    whole = method.endswith("every_patch_gathered")

    def step() -> None:
        with patches_gathered(whole):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(codes), images).backward()
            if precond is not None:
                precond.step()
            optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sgd = stepper("sgd")
    steppers = {method: stepper(method) for method in METHODS}
    for step in (sgd, *steppers.values()):
        for _ in range(10):  # warm-up, and the first inverses
            step()
    base, costs = interleaved_costs(sgd, steppers, steps=10, rounds=args.rounds)
    rows = [{"method": "sgd", "ms_per_step": 1e3 * base, "over_sgd": 1.0}] + [
        {"method": method, "ms_per_step": 1e3 * seconds, "over_sgd": ratio}
        for method, (seconds, ratio) in costs.items()
    ]
    print_table("Decoder of transposed convolutions: a step ÷ an SGD step", rows, list(rows[0]))
    save_json(
        "kfac_conv_transpose",
        {"environment": environment(rounds=args.rounds, batch=64), "rows": rows},
    )


if __name__ == "__main__":
    main()
