"""K-FAC on recurrent layers: a digits sequence classifier with ``nn.LSTM`` or ``nn.GRU``.

Each 8×8 ``load_digits`` image is read as a sequence of its 8 rows (8 features per step) by a
recurrent layer of 32 units whose last output feeds a linear head; batch 64, test accuracy
target 0.93 on 397 held-out images (data split seed 0). Methods: SGD-momentum (0.9), Adam, and
K-FAC (factored damping 0.03, empirical Fisher, factors and inverses every 10 steps,
factor EMA 0.8, KL clip 0.01, preconditioning SGD-momentum 0.8) either on every weight (the
recurrent weights included: ``ih_l0``, ``hh_l0``) or on the head alone, which is how natgrad
treated recurrent layers before it covered them. Each method tries 3 learning rates on training
seeds 0–2; the rate with the fewest median steps wins. Training seconds exclude evaluations.
The step cost is a K-FAC step ÷ an SGD step (both with the recurrent layer), median ratio of 9
interleaved rounds of 50 steps: a recording step runs the recurrent layer unrolled. The
sequence-length costs time the same models on random sequences of 8 and 50 steps (batch 64):
K-FAC recording at every step (factors every step, inverses every 10) and the 10/10 K-FAC
above, each ÷ an SGD step, median ratio of 5 interleaved rounds of 20 steps.

Run ``python benchmarks/kfac_recurrent.py`` (about 4 minutes with 1 torch thread). Writes
``benchmarks/results/kfac_recurrent.json``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from _report import environment, print_table, save_json
from _timing import interleaved_costs
from natgrad.optim import KFAC

TARGET = 0.93
BATCH = 64
MAX_STEPS = 1500
EVERY = 10
LEARNING_RATES = {
    "sgd": (0.1, 0.3, 1.0),
    "adam": (0.003, 0.01, 0.03),
    "kfac": (0.03, 0.1, 0.3),
    "kfac_head_only": (0.03, 0.1, 0.3),
}


class SequenceClassifier(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.recurrent = (nn.LSTM if kind == "lstm" else nn.GRU)(8, 32, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, rows: Tensor) -> Tensor:
        return self.head(self.recurrent(rows)[0][:, -1])


def load_data() -> dict[str, Tensor]:
    images, labels = load_digits(return_X_y=True)
    images = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 8, 8)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    labels = torch.tensor(labels)
    return {"x": images[train], "y": labels[train], "x_test": images[test], "y_test": labels[test]}


def make_step(
    method: str, model: nn.Module, lr: float, factor_interval: int = EVERY
) -> Callable[[Tensor, Tensor], None]:
    """One training step of ``method`` on ``model`` for a batch (K-FAC's factors every
    ``factor_interval`` steps)."""
    if method == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        precond = None
    else:
        momentum = 0.9 if method == "sgd" else 0.8
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        precond = None
        if method.startswith("kfac"):
            precond = KFAC(
                model,
                damping=0.03,
                damping_mode="factored",
                factor_decay=0.8,
                factor_update_interval=factor_interval,
                inv_update_interval=EVERY,
                kl_clip=0.01,
                lr=optimizer,
                layers=[model.head] if method == "kfac_head_only" else None,
            )

    def step(inputs: Tensor, targets: Tensor) -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        if precond is not None:
            precond.step()
        optimizer.step()

    return step


def steps_to_target(kind: str, method: str, lr: float, seed: int, data: dict) -> dict:
    """Steps and training seconds until the test accuracy reaches ``TARGET`` (``None``: missed
    within ``MAX_STEPS``)."""
    torch.manual_seed(seed)
    model = SequenceClassifier(kind)
    step = make_step(method, model, lr)
    generator = torch.Generator().manual_seed(seed)
    steps, seconds = 0, 0.0
    while steps < MAX_STEPS:
        for batch in torch.randperm(len(data["x"]), generator=generator).split(BATCH):
            start = time.perf_counter()
            step(data["x"][batch], data["y"][batch])
            seconds += time.perf_counter() - start
            steps += 1
            if steps % EVERY == 0:
                with torch.no_grad():
                    predicted = model(data["x_test"]).argmax(dim=1)
                if (predicted == data["y_test"]).float().mean().item() >= TARGET:
                    return {"steps": steps, "seconds": seconds}
    return {"steps": None, "seconds": None}


def median_or_none(values: list[float | None]) -> float | None:
    """Median with a miss (``None``) counted as infinitely slow."""
    ranked = sorted(values, key=lambda value: float("inf") if value is None else value)
    return ranked[len(ranked) // 2]


def tune(kind: str, method: str, seeds: int, data: dict) -> dict:
    """The learning rate with the fewest median steps, and its runs."""
    best = None
    for lr in LEARNING_RATES[method]:
        runs = [steps_to_target(kind, method, lr, seed, data) for seed in range(seeds)]
        steps = [run["steps"] for run in runs]
        median = median_or_none(steps)
        key = float("inf") if median is None else median
        if best is None or key < best["key"]:
            best = {"key": key, "lr": lr, "steps": steps, "runs": runs}
    return {
        "layer": kind,
        "method": method,
        "lr": best["lr"],
        "steps_per_seed": best["steps"],
        "median_steps": median_or_none(best["steps"]),
        "median_seconds": median_or_none([run["seconds"] for run in best["runs"]]),
    }


def step_costs(kind: str, data: dict) -> dict:
    """Seconds per step of K-FAC (every weight) and Adam ÷ an SGD step, interleaved."""
    batches = data["x"][:BATCH], data["y"][:BATCH]

    def stepper(method: str) -> Callable[[], None]:
        torch.manual_seed(0)
        step = make_step(method, SequenceClassifier(kind), 0.01)
        return lambda: step(*batches)

    base, costs = interleaved_costs(
        stepper("sgd"), {"kfac": stepper("kfac"), "adam": stepper("adam")}, steps=50, rounds=9
    )
    return {
        "layer": kind,
        "sgd_ms": 1e3 * base,
        "kfac_over_sgd": costs["kfac"][1],
        "adam_over_sgd": costs["adam"][1],
    }


def length_costs(kind: str, length: int) -> dict:
    """Seconds per step of K-FAC recording at every step and of the 10/10 K-FAC ÷ an SGD step,
    on random sequences of ``length`` steps, interleaved."""
    generator = torch.Generator().manual_seed(0)
    batches = torch.randn(BATCH, length, 8, generator=generator), torch.arange(BATCH) % 10

    def stepper(method: str, factor_interval: int = EVERY) -> Callable[[], None]:
        torch.manual_seed(0)
        step = make_step(method, SequenceClassifier(kind), 0.01, factor_interval)
        return lambda: step(*batches)

    steppers = {"record": stepper("kfac", factor_interval=1), "kfac": stepper("kfac")}
    base, costs = interleaved_costs(stepper("sgd"), steppers, steps=20, rounds=5)
    return {
        "layer": kind,
        "steps": length,
        "sgd_ms": 1e3 * base,
        "record_over_sgd": costs["record"][1],
        "kfac_over_sgd": costs["kfac"][1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds (default 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data()
    rows = [
        tune(kind, method, args.seeds, data)
        for kind in ("lstm", "gru")
        for method in LEARNING_RATES
    ]
    for kind in ("lstm", "gru"):
        adam = next(row for row in rows if row["layer"] == kind and row["method"] == "adam")
        for row in rows:
            if row["layer"] == kind:
                row["seconds_over_adam"] = (
                    None
                    if row["median_seconds"] is None or adam["median_seconds"] is None
                    else row["median_seconds"] / adam["median_seconds"]
                )
    costs = [step_costs(kind, data) for kind in ("lstm", "gru")]
    lengths = [length_costs(kind, length) for kind in ("lstm", "gru") for length in (8, 50)]
    columns = ["layer", "method", "lr", "steps_per_seed", "median_steps", "median_seconds"]
    print_table(
        f"Digits rows as sequences: steps to test accuracy {TARGET}",
        rows,
        [*columns, "seconds_over_adam"],
    )
    print_table(
        "Step cost ÷ an SGD step", costs, ["layer", "sgd_ms", "kfac_over_sgd", "adam_over_sgd"]
    )
    print_table(
        "Step cost ÷ an SGD step by sequence length (random sequences)",
        lengths,
        ["layer", "steps", "sgd_ms", "record_over_sgd", "kfac_over_sgd"],
    )
    save_json(
        "kfac_recurrent",
        {
            "environment": environment(seeds=args.seeds, target=TARGET, batch=BATCH),
            "rows": rows,
            "step_costs": costs,
            "length_costs": lengths,
        },
    )


if __name__ == "__main__":
    main()
