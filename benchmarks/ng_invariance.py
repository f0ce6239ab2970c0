"""Experiment 1: natural-gradient trajectories do not depend on the parameterization.

The same model is trained in two parameterizations with the same step size ``lr`` for the same
"time" ``T = lr × steps``, once by natural gradient descent (``natgrad.optim.NaturalGradient``,
exact dense Fisher, no damping) and once by plain gradient descent (``torch.optim.SGD``). The
gap between the two trajectories is measured in *function space* (predicted probabilities or
the fitted distribution), step by step, and its maximum over the run is reported per ``lr``:

- logistic regression, ``w`` vs ``w = A v`` (``A`` linear, condition number 25): the Fisher
  transforms as ``F_v = Aᵀ F_w A``, so NGD is invariant *exactly*, at every ``lr``;
- logistic regression, ``w`` vs ``w = sinh(v)`` (elementwise, nonlinear): NGD steps agree to
  first order, so the gap shrinks linearly with ``lr`` (both are Euler steps of one flow);
- a Gaussian fitted by maximum likelihood in ``(μ, σ)`` vs ``(μ, log σ)``: the same, with a
  custom likelihood whose outputs are the Gaussian's natural parameters.

Plain gradient descent follows a different flow in each parameterization, so its gap stays of
order one as ``lr → 0``. Writes ``benchmarks/results/ng_invariance.{json,png}``.

    python benchmarks/ng_invariance.py
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from _report import environment, print_table, save_figure, save_json
from natgrad.curvature.likelihoods import Likelihood
from natgrad.expfam import Gaussian
from natgrad.optim import NaturalGradient

LEARNING_RATES = (0.2, 0.1, 0.05, 0.025, 0.0125)
TOTAL_TIME = 2.0
SEED = 0


class NaturalGaussianLikelihood(Likelihood):
    """``x ~ N(μ, σ²)`` whose model outputs ``(N, 2)`` are the natural parameters ``(θ₁, θ₂)``.

    ``θ₁ = μ/σ²``, ``θ₂ = −1/(2σ²)``; the Fisher of the outputs ``∇²A(θ) = Cov[(x, x²)]`` comes
    from :class:`natgrad.expfam.Gaussian`. Targets are the observations, shape ``(N,)``.
    """

    name = "natural-gaussian"

    @staticmethod
    def _family(outputs: Tensor) -> Gaussian:
        return Gaussian.from_natural(outputs[:, 0], outputs[:, 1], validate=False)

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return -self._family(outputs).log_prob(targets)

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        variance = -0.5 / outputs[:, 1].detach()
        noise = torch.randn(variance.shape, generator=generator, dtype=variance.dtype)
        return outputs[:, 0].detach() * variance + variance.sqrt() * noise

    def natural_hessian_sqrt(self, outputs: Tensor) -> Tensor:
        return torch.linalg.cholesky(self._family(outputs).fisher())


class TransformedLogistic(nn.Module):
    """Logits ``x @ transform(v)``: logistic regression with weights ``w = transform(v)``."""

    def __init__(self, transform: Callable[[Tensor], Tensor], initial: Tensor) -> None:
        super().__init__()
        self.transform = transform
        self.v = nn.Parameter(initial.clone())

    def forward(self, inputs: Tensor) -> Tensor:
        return inputs @ self.transform(self.v)


class GaussianFit(nn.Module):
    """A Gaussian ``N(μ, σ²)`` with ``σ`` stored as itself or as ``log σ``.

    The forward pass ignores the values of its inputs and returns the natural parameters
    ``(θ₁, θ₂)``, shape ``(N, 2)``, once per input row.
    """

    def __init__(self, mean: float, scale: float, log_scale: bool) -> None:
        super().__init__()
        self.log_scale = log_scale
        self.mean = nn.Parameter(torch.tensor(mean))
        self.scale_param = nn.Parameter(torch.tensor(math.log(scale) if log_scale else scale))

    def scale(self) -> Tensor:
        return self.scale_param.exp() if self.log_scale else self.scale_param

    def forward(self, inputs: Tensor) -> Tensor:
        variance = self.scale().square()
        natural = torch.stack([self.mean / variance, -0.5 / variance])
        return inputs.new_ones(inputs.shape[0], 1) * natural


@dataclass
class Problem:
    """Two parameterizations of one model, its data and what is compared in function space."""

    name: str
    likelihood: str | Likelihood
    inputs: Tensor
    targets: Tensor
    models: Callable[[], tuple[nn.Module, nn.Module]]
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor]
    observe: Callable[[nn.Module], Tensor]


def logistic_data(seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(200, 2, generator=generator)
    inputs = torch.cat([features, torch.ones(200, 1)], dim=1)
    probs = torch.sigmoid(inputs @ torch.tensor([2.0, -1.0, 0.5]))
    return inputs, torch.bernoulli(probs, generator=generator)


def mixing_matrix(seed: int) -> Tensor:
    """``A = Q diag(5, 1, 0.2) Qᵀ`` with a random rotation ``Q`` (condition number 25)."""
    generator = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=generator))
    return rotation @ torch.diag(torch.tensor([5.0, 1.0, 0.2])) @ rotation.T


def logistic_loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.binary_cross_entropy_with_logits(model(inputs), targets)


def problems() -> list[Problem]:
    inputs, labels = logistic_data(SEED)
    mixing = mixing_matrix(SEED + 1)
    start = torch.zeros(3)

    def linear_pair() -> tuple[nn.Module, nn.Module]:
        reparameterized = TransformedLogistic(
            lambda v: mixing @ v, torch.linalg.solve(mixing, start)
        )
        return TransformedLogistic(lambda w: w, start), reparameterized

    def sinh_pair() -> tuple[nn.Module, nn.Module]:
        return TransformedLogistic(lambda w: w, start), TransformedLogistic(
            torch.sinh, torch.asinh(start)
        )

    def gaussian_pair() -> tuple[nn.Module, nn.Module]:
        return GaussianFit(0.0, 1.0, log_scale=False), GaussianFit(0.0, 1.0, log_scale=True)

    generator = torch.Generator().manual_seed(SEED + 2)
    observations = 2.0 + 0.5 * torch.randn(200, generator=generator)
    likelihood = NaturalGaussianLikelihood()

    def gaussian_loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        return likelihood.nll(model(inputs), targets).mean()

    def probabilities(model: nn.Module) -> Tensor:
        return torch.sigmoid(model(inputs))

    def mean_and_scale(model: nn.Module) -> Tensor:
        return torch.stack([model.mean, model.scale()])

    return [
        Problem("logistic, w vs w = A v", "bernoulli", inputs, labels, linear_pair,
                logistic_loss, probabilities),
        Problem("logistic, w vs w = sinh(v)", "bernoulli", inputs, labels, sinh_pair,
                logistic_loss, probabilities),
        Problem("Gaussian, (mu, sigma) vs (mu, log sigma)", likelihood, torch.zeros(200, 1),
                observations, gaussian_pair, gaussian_loss, mean_and_scale),
    ]  # fmt: skip


def trajectory(problem: Problem, model: nn.Module, method: str, lr: float, steps: int) -> Tensor:
    """Function-space observations after each of ``steps`` steps, shape ``(steps + 1, ...)``."""
    if method == "NGD":
        optimizer = NaturalGradient(model, problem.likelihood, lr=lr, damping=0.0)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = problem.loss(model, problem.inputs, problem.targets)
        loss.backward()
        return loss

    observed = [problem.observe(model).detach()]
    for _ in range(steps):
        optimizer.step(closure)
        observed.append(problem.observe(model).detach())
    return torch.stack(observed)


def function_space_gap(problem: Problem, method: str, lr: float) -> float:
    """Largest difference between the two parameterizations' observations along the run."""
    steps = round(TOTAL_TIME / lr)
    first, second = problem.models()
    difference = trajectory(problem, first, method, lr, steps) - trajectory(
        problem, second, method, lr, steps
    )
    return float(difference.abs().amax(dim=-1).max())


def log_log_slope(lrs: list[float], gaps: list[float]) -> float:
    """Least-squares slope of ``log gap`` against ``log lr`` over the three smallest ``lr``."""
    pairs = sorted(zip(lrs, gaps, strict=True))[:3]
    log_lrs, log_gaps = np.log([pair[0] for pair in pairs]), np.log([pair[1] for pair in pairs])
    return float(np.polyfit(log_lrs, log_gaps, 1)[0])


def run() -> list[dict]:
    rows = []
    for problem in problems():
        for method in ("NGD", "GD"):
            gaps = [function_space_gap(problem, method, lr) for lr in LEARNING_RATES]
            exact = max(gaps) < 1e-12
            slope = "- (round-off)" if exact else log_log_slope(list(LEARNING_RATES), gaps)
            for lr, gap in zip(LEARNING_RATES, gaps, strict=True):
                rows.append(
                    {"problem": problem.name, "method": method, "lr": lr,
                     "steps": round(TOTAL_TIME / lr), "max gap": gap, "slope": slope}
                )  # fmt: skip
    return rows


LR_COLUMNS = [f"lr={lr:g}" for lr in LEARNING_RATES]


def gap_table(rows: list[dict]) -> list[dict]:
    """One row per problem and method with the gap at every ``lr`` side by side."""
    table: dict[tuple[str, str], dict] = {}
    for row in rows:
        entry = table.setdefault(
            (row["problem"], row["method"]),
            {"problem": row["problem"], "method": row["method"], "slope": row["slope"]},
        )
        entry[f"lr={row['lr']:g}"] = row["max gap"]
    return list(table.values())


def plot(rows: list[dict]) -> Figure:
    names = list(dict.fromkeys(row["problem"] for row in rows))
    figure = Figure(figsize=(4.2 * len(names), 3.6))
    for axis, name in zip(figure.subplots(1, len(names)), names, strict=True):
        for method, marker in (("NGD", "o"), ("GD", "s")):
            chosen = [row for row in rows if row["problem"] == name and row["method"] == method]
            lrs = [row["lr"] for row in chosen]
            gaps = [max(row["max gap"], 1e-17) for row in chosen]
            axis.loglog(lrs, gaps, marker=marker, label=method)
        reference = np.array(LEARNING_RATES)
        axis.loglog(reference, reference * 0.1, "k:", label="∝ lr")
        axis.minorticks_off()
        axis.set_xticks(list(LEARNING_RATES), [f"{lr:g}" for lr in LEARNING_RATES])
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("step size lr (same total time)")
        axis.set_ylabel("max function-space gap")
        axis.legend(fontsize=8)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    rows = run()
    title = f"Max function-space gap between the parameterizations over time T = {TOTAL_TIME:g}"
    print_table(title, gap_table(rows), ["problem", "method", *LR_COLUMNS, "slope"])
    settings = {"learning_rates": LEARNING_RATES, "total_time": TOTAL_TIME, "seed": SEED}
    save_json("ng_invariance", {"environment": environment(**settings), "rows": rows})
    save_figure(plot(rows), "ng_invariance")


if __name__ == "__main__":
    main()
