"""K-FAC and EKFAC (with a tuned learning rate and momentum, or with Martens & Grosse's adaptive
step) vs SGD-momentum and Adam on scikit-learn's digits (8×8 images), and the cost of a K-FAC
step in natgrad and ASDL.

Five tasks, same seed, same data split:

- ``mlp``: 64-128-10 ReLU classifier, batch 64; target test accuracy 0.97.
- ``cnn``: two 3×3 convolutions, max-pool, linear head, batch 64; target test accuracy 0.975.
- ``autoencoder``: 64-128-64-32-8-32-64-128-64 tanh autoencoder with a linear code layer and a
  Bernoulli (sigmoid cross-entropy) reconstruction loss, the Martens & Grosse (2015) task scaled to
  digits, batch 64; target training loss 18.5, just past the plateau at 27.1 on which every
  method starts (25 epochs).
- ``autoencoder_long``: the same, trained to training loss 16.0 (100 epochs): the regime of the
  classic deep-autoencoder benchmark, optimisation to a low training error.
- ``autoencoder_full_batch``: the same model on the whole training set per step (1437 images,
  deterministic optimisation; 200 steps), target 18.5.

Tuning, the same treatment for every method: 3 learning rates × 4 settings of its other options
(12 configurations each; ``LR_GRIDS`` × ``SECOND_GRIDS``): SGD its momentum; Adam ``(beta1,
beta2)``; K-FAC ``(momentum, damping, damping mode)`` and EKFAC ``(momentum, damping)`` of the
SGD-momentum they precondition. The second grids hold each method's usual default (SGD and
Adam), the settings that preliminary searches found best and, for every method alike, a low
momentum (0.5; Adam's ``beta1``): with the KL clip binding, K-FAC's learning rate barely sizes
its step, and momentum 0.8 keeps its late steps twice Adam's, which makes its test accuracy
noisy near the classifiers' targets (CNN median steps 50 → 35 over seeds 0–2 with momentum 0.5).
K-FAC's and EKFAC's fourth setting, ``SHORT_FACTOR_MEMORY``, replaced their earlier first one
(momentum 0.9, damping 0.3), which won no task: factors that forget fast (EMA 0.3 per refresh
instead of 0.8) for the first 150 steps (``SwitchedDecay``: then 0.8, which keeps most of the long
memory's late loss) under a looser KL clip (0.1 instead of 0.01). K-FAC's first setting,
``LOOSE_KL_CLIP``, replaced momentum 0.8 with eigenbasis damping 0.05 (which won no task): the
factored setting with momentum 0.5 under clip 0.1 and the long memory, which ``kfac_grid_check.py``
found the MLP's best point (45 median steps against 55). With factors refreshed every 10 steps an
EMA of 0.8 averages over about 50 steps, during which the autoencoder's weights leave the plateau
and its curvature changes; a preliminary search on the autoencoder (K-FAC, momentum 0.5, factored
damping 0.03, seeds 0–2, median steps to 18.5) gave 125 with (0.8, 0.01), 110 with (0.8, 0.1), 90
with (0.5, 0.1), 75 with (0.3, 0.1), 85 with (0, 0.1), 80 with (0.3, 0.05) and 205 with (0.3, 0.2);
with no KL clip (lr 0.03–1, damping 0.03–1) no setting reached the target on more than one seed;
refreshing factors every step instead (EMA 0.8) gave 85 at a higher cost per step. The CNN prefers
the long memory (35 → 95 median steps), the MLP at lr 1 too (60 → 95), and EKFAC does not gain on
the autoencoder (120 → 145).
Preliminary searches: Adam's steps to the autoencoder target fall from
about 420 to 230 with ``beta1 = 0.8, beta2 = 0.9``, K-FAC's from about 205 to 135 with momentum
0.8 and damping 0.05; on the classifiers K-FAC with factored (π) damping 0.03 needs the fewest
steps (MLP 55, CNN 50 against 75 and 65-75 with eigenbasis damping) and is the cheaper per step,
on the autoencoder eigenbasis damping needs fewer (270 against 355 steps to loss 16.5). Fixed
K-FAC/EKFAC options: Monte-Carlo Fisher (one extra backward pass at targets sampled from the
model; with the empirical Fisher K-FAC does not reach the autoencoder target; ``--fisher-type``
trains with another, see ``kfac_fisher_type.py`` and BENCHMARKS.md), factors and
eigenbases (or damped inverses) updated every 10 steps (factor intervals 1, 5 and 10 needed
about as many steps on the autoencoder with factor EMA 0.8; 10 is the cheapest), factor EMA 0.8
and KL clipping 0.01 (which mostly binds, so that the K-FAC learning rate matters little) but in
the ``SHORT_FACTOR_MEMORY`` setting.

``kfac_qm``: the same K-FAC (no KL clipping) under :class:`natgrad.optim.QuadraticModelOptimizer`,
Martens & Grosse's update ``α Δ + μ δ₀`` with ``α`` and ``μ`` chosen every step by the exact
damped quadratic model (two forward-mode passes on at most ``QM_CURVATURE_BATCH`` samples) and
Levenberg–Marquardt damping handed to K-FAC at its refreshes: no learning rate or momentum to
tune. At full batch it runs with ``full_batch=True``: the damping rule takes the loss after a
step from the next step's closure (the same images, reshuffled) instead of re-running it. Its
grid is the initial damping (0.001, 0.01) × damping mode × trust region (none, or
``max_kl = 0.1``): 8 configurations. Without the trust region small initial dampings can
overshoot on the classifiers (the exact Fisher vanishes where the softmax saturates) and never
reach the target; those runs count as failed tuning runs.

Each configuration is trained with ``--tune-seeds`` training seeds (default 3: ``--seed`` and
the next two; model initialisation and batch order), each run stopped at the target, and ranked
by its median steps to target over the seeds (a run that misses counts as infinitely slow), so
that a configuration that is fast on one seed and fails on the others does not win; per method
the fewest median steps win, then the faster (the configurations of a method cost about the
same per step, so this is the least time without the timing noise of a shared machine). The
winners are re-run ``--repeats`` times on each tuning seed in interleaved rounds (on
``--seed`` the first to the end of the epoch budget, for the curves and final metrics); per
seed the time to target is the median over the repeats, and a winner's row reports the medians
over the tuning seeds of its time and of its ratio to Adam's time at the same seed (so that a
winner is not judged on one lucky or unlucky seed). ``--check-seeds N`` then trains them on N
seeds that tuning did not use. Only
training steps are timed: the evaluation every ``--eval-every`` steps (the task's own interval
where it sets one; test accuracy, or training loss on the full training set) is excluded for
all methods alike.

Step cost: one full training step (forward, backward, curvature and inverse updates as
scheduled, preconditioning, SGD-momentum update) relative to an SGD-momentum step timed in the
same round (mean over ``--cost-steps`` steps, a whole number of update cycles; median over
``--cost-rounds`` interleaved rounds; 20 steps and at most 3 rounds for the full-batch task)
for natgrad's K-FAC/EKFAC (MC and empirical Fisher; factor/inverse intervals 1/1, 1/10, 10/10;
K-FAC also under the quadratic-model optimizer, MC 10/10, with its two forward-mode passes, the
loss re-evaluation of its damping rule every 5 steps and ``max_kl`` ``COST_MAX_KL``: without a
bound its step can run away on the one batch that the timing repeats)
and for ASDL's ``KfacGradientMaker`` (``asdfghjkl`` 0.1a5) against natgrad in the comparable
configuration: empirical Fisher, π-damping (natgrad ``damping_mode="factored"``), same damping
and factor EMA, no KL clipping. Before timing, the
script checks that both give the same preconditioned gradient on a bias-free model (agreement to
rounding). Where the conventions differ:

- Damping: ASDL always damps the factors, ``(A + π√λ I)⁻¹ ⊗ (B + √λ/π I)⁻¹`` with
  ``π² = (tr A / d_A) / (tr B / d_B)``; natgrad's ``"factored"`` mode is the same, its default
  ``"eigen"`` mode is the exact ``(G ⊗ A + λI)⁻¹``.
- Mean over the batch: ASDL's Fisher maker calls the loss with ``reduction="sum"`` and divides
  factors and gradients by ``data_size`` (which must be set to the batch size); natgrad scales
  the output gradients of the mean loss by ``N``. Both give ``A`` = mean of ``a aᵀ`` (averaged
  over locations for convolutions), ``B`` = mean over samples of ``g gᵀ`` (summed over
  locations).
- Biases: natgrad folds the bias into ``A`` as a homogeneous coordinate; ASDL's ``A`` excludes
  it and the bias gradient is preconditioned by ``B⁻¹`` alone, so with biases the two updates
  differ by construction (the agreement table shows by how much).
- Factor EMA: ASDL's ``ema_decay`` is the weight of the new factor (natgrad's
  ``1 - factor_decay``) and its average starts from zero; natgrad's starts at the first batch.
- Inverses: ASDL by Cholesky (explicit inverses); natgrad's ``"factored"`` mode also by
  Cholesky, its ``"eigen"`` mode by eigendecomposition.
- ``--kfac-approx reduce`` gives natgrad's K-FAC/EKFAC (and natgrad's and curvlinops' factor
  builds) K-FAC-reduce factors for the convolutions (Eschenhagen et al. 2023); ASDL and
  BackPACK keep KFC's.
- ASDL's MC Fisher supports cross-entropy and MSE losses only (no Bernoulli), hence the
  empirical Fisher in the comparison; on curvature steps its Fisher maker runs the forward and
  backward itself, with its hooks attached for that pass.
- ASDL opens ``torch.cuda.nvtx`` ranges, which raise on CPU-only torch; :func:`import_asdl`
  turns them into no-ops. Torch warns that ASDL uses non-full backward hooks.

Also measured: the time to build K-FAC factors on one batch with natgrad, curvlinops, BackPACK
(MC, one sample; it refuses non-binary targets on the autoencoder) and ASDL.

Batch size (``--batch-sizes``, off by default): every method of the mini-batch tasks is tuned
over the listed batch sizes as well, the same grid at each, within the same epoch budget, with
evaluations after as many samples as at the task's own batch size. Within one batch size the
fewest steps win as above; across batch sizes, where steps differ in cost, the least tuning time.
The step costs are then measured at every listed batch size.

Run ``python benchmarks/kfac_digits.py`` (30–45 minutes with 1 torch thread); ``--quick``
for a smoke run (2 epochs, one configuration per method and batch size, one tuning seed, under
a minute), ``--cost-only`` for the cost tables alone (``--cost-only --device cuda`` on a GPU:
models and batches there, the device synchronised around each timing; the training runs stay
on the CPU), ``--check-seeds N`` to train the winners once more on N held-out training seeds
(e.g. ``--tasks autoencoder_long --check-seeds 4``). Writes
``benchmarks/results/kfac_digits.{json,png}`` (not with ``--quick`` or ``--cost-only``; with a
subset of ``--tasks``, ``kfac_digits_<tasks>.{json,png}``; with ``--batch-sizes 64 256``,
``..._batch64-256.{json,png}``; ``--cost-only --device cuda`` writes
``kfac_digits_cost_cuda.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import itertools
import math
import os
import platform
import statistics
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from tqdm import tqdm

from _report import environment, print_table, save_figure, save_json
from _timing import synchronize
from natgrad.optim import EKFAC, KFAC, QuadraticModelOptimizer

NAME = "kfac_digits"


@dataclass
class Task:
    name: str
    build: Callable[[], nn.Module]
    loss: Callable[[Tensor, Tensor], Tensor]
    metric: str  # "test_accuracy" (higher is better) or "train_loss" (lower is better)
    target: float
    epochs: int
    batch_size: int
    image: bool = False
    reconstruct: bool = False
    eval_every: int | None = None  # steps between evaluations; None: ``--eval-every``
    step_cost: bool = True  # measure the cost of a step (False: a variant of another task)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 16, 10),
    )


def autoencoder() -> nn.Module:
    sizes = [64, 128, 64, 32, 8, 32, 64, 128, 64]
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if fan_out != 8 and index < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def bernoulli_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Sigmoid cross-entropy summed over pixels; ``"mean"`` averages over the batch, ``"sum"``
    sums (ASDL's Fisher maker calls the loss with ``reduction="sum"``)."""
    total = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / len(logits)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


TRAIN_SIZE = 1437
"""Training images of the digits split (80 %): the batch size of a full-batch task."""

TASKS = [
    Task("mlp", mlp, nn.functional.cross_entropy, "test_accuracy", 0.97, 20, 64),
    Task("cnn", cnn, nn.functional.cross_entropy, "test_accuracy", 0.975, 10, 64, image=True),
    Task("autoencoder", autoencoder, bernoulli_loss, "train_loss", 18.5, 25, 64, reconstruct=True),
    Task(
        "autoencoder_long",
        autoencoder,
        bernoulli_loss,
        "train_loss",
        16.0,
        100,
        64,
        reconstruct=True,
        eval_every=10,
        step_cost=False,
    ),
    Task(
        "autoencoder_full_batch",
        autoencoder,
        bernoulli_loss,
        "train_loss",
        18.5,
        200,
        TRAIN_SIZE,
        reconstruct=True,
        eval_every=2,
    ),
]

PRECONDITIONER_OPTIONS = {
    "fisher_type": "mc",
    "factor_decay": 0.8,
    "factor_update_interval": 10,
    "inv_update_interval": 10,
    "kl_clip": 1e-2,
    "kfac_approx": "expand",
}


@dataclass(frozen=True)
class TrainConfig:
    """One point of a tuning grid: the learning rate, the momentum (SGD's momentum, Adam's
    ``beta1``), Adam's ``beta2`` and, for K-FAC/EKFAC, the damping and (K-FAC) its mode; the
    batch size where ``--batch-sizes`` tunes it (``None``: the task's)."""

    method: str
    lr: float
    momentum: float = 0.9
    beta2: float | None = None
    damping: float | None = None
    damping_mode: str | None = None
    max_kl: float | None = None
    batch_size: int | None = None
    factor_decay: float | None = None
    kl_clip: float | None = None
    short_memory_steps: int | None = None

    def label(self) -> str:
        batch = "" if self.batch_size is None else f"batch={self.batch_size}, "
        if self.method == "kfac_qm":
            bound = "" if self.max_kl is None else f", max_kl={self.max_kl:g}"
            return f"{batch}damping={self.damping:g} ({self.damping_mode}){bound}, adaptive"
        text = f"{batch}lr={self.lr:g}, momentum={self.momentum:g}"
        if self.beta2 is not None:
            text += f", beta2={self.beta2:g}"
        if self.damping is not None:
            text += f", damping={self.damping:g}"
        if self.damping_mode is not None:
            text += f" ({self.damping_mode})"
        if self.factor_decay is not None:
            text += f", factor_decay={self.factor_decay:g}"
        if self.short_memory_steps is not None:
            late = PRECONDITIONER_OPTIONS["factor_decay"]
            text += f" until step {self.short_memory_steps}, then {late:g}"
        if self.kl_clip is not None:
            text += f", kl_clip={self.kl_clip:g}"
        return text


SHORT_FACTOR_MEMORY = {"factor_decay": 0.3, "short_memory_steps": 150, "kl_clip": 0.1}
"""A K-FAC/EKFAC setting of the second grid: factors that forget fast (EMA 0.3 per update
every 10 steps instead of 0.8) for the first 150 steps, then the usual 0.8, under a looser KL
clip (0.1 instead of 0.01)."""
LOOSE_KL_CLIP = {"kl_clip": 0.1}
"""K-FAC's factored setting with momentum 0.5 under the KL clip of ``SHORT_FACTOR_MEMORY`` and
the usual factor memory (``kfac_grid_check.py`` found it the MLP's best point)."""


@dataclass(frozen=True)
class SwitchedDecay:
    """A ``factor_decay`` schedule: ``early`` before step ``switch_step``, ``late`` from it."""

    early: float
    late: float
    switch_step: int

    def __call__(self, step: int) -> float:
        return self.early if step < self.switch_step else self.late


LR_GRIDS = {
    "sgd": [0.03, 0.1, 0.3],
    "adam": [3e-3, 1e-2, 3e-2],
    "kfac": [0.1, 0.3, 1.0],
    "ekfac": [0.1, 0.3, 1.0],
    "kfac_qm": [1.0],
}
SECOND_GRIDS = {
    "sgd": [{"momentum": 0.9}, {"momentum": 0.8}, {"momentum": 0.95}, {"momentum": 0.5}],
    "adam": [
        {"momentum": 0.9, "beta2": 0.999},
        {"momentum": 0.8, "beta2": 0.999},
        {"momentum": 0.8, "beta2": 0.9},
        {"momentum": 0.5, "beta2": 0.999},
    ],
    "kfac": [
        {"momentum": 0.5, "damping": 0.03, "damping_mode": "factored", **LOOSE_KL_CLIP},
        {"momentum": 0.8, "damping": 0.03, "damping_mode": "factored"},
        {"momentum": 0.5, "damping": 0.03, "damping_mode": "factored"},
        {"momentum": 0.5, "damping": 0.03, "damping_mode": "factored", **SHORT_FACTOR_MEMORY},
    ],
    "ekfac": [
        {"momentum": 0.8, "damping": 0.1},
        {"momentum": 0.8, "damping": 0.05},
        {"momentum": 0.5, "damping": 0.05},
        {"momentum": 0.5, "damping": 0.05, **SHORT_FACTOR_MEMORY},
    ],
    "kfac_qm": [
        {"momentum": 0.0, "damping": damping, "damping_mode": mode, "max_kl": max_kl}
        for max_kl in (None, 0.1)
        for mode in ("factored", "eigen")
        for damping in (1e-3, 1e-2)
    ],
}
QM_CURVATURE_BATCH = 256
"""``curvature_batch_size`` of the quadratic model: its Fisher products use at most this many
samples of the batch (all of a batch of 64; a sixth of the full batch)."""


def grid(method: str, batch_sizes: list[int | None] | None = None) -> list[TrainConfig]:
    """The tuning grid of ``method``: 3 learning rates × 4 settings of its other options (× the
    ``batch_sizes``; default the task's own)."""
    return [
        TrainConfig(method, lr, **options, batch_size=batch_size)
        for batch_size in batch_sizes or [None]
        for options in SECOND_GRIDS[method]
        for lr in LR_GRIDS[method]
    ]


def load_data(seed: int) -> dict[str, Tensor]:
    digits = load_digits()
    features = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    labels = torch.tensor(digits.target)
    train_x, test_x, train_y, test_y = train_test_split(
        features, labels, test_size=0.2, random_state=seed, stratify=labels
    )
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def make_optimizer(task: Task, config: TrainConfig, model: nn.Module, **overrides):
    """The torch.optim optimizer and the preconditioner (None for SGD/Adam); ``overrides``
    replace entries of ``PRECONDITIONER_OPTIONS``."""
    if config.method == "adam":
        betas = (config.momentum, config.beta2)
        return torch.optim.Adam(model.parameters(), lr=config.lr, betas=betas), None
    if config.method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum), None
    precond = make_preconditioner(task, config, model, **overrides)
    if config.method != "kfac_qm":
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
        return optimizer, precond
    optimizer = QuadraticModelOptimizer(
        model,
        likelihood_of(task),
        preconditioner=precond,
        damping=config.damping,
        max_kl=config.max_kl,
        curvature_batch_size=QM_CURVATURE_BATCH,
        full_batch=(config.batch_size or task.batch_size) >= TRAIN_SIZE,
    )
    return optimizer, precond


def make_preconditioner(task: Task, config: TrainConfig, model: nn.Module, **overrides) -> KFAC:
    """K-FAC (EKFAC) with ``PRECONDITIONER_OPTIONS``, the configuration's damping (and mode) and
    ``overrides``; under the quadratic model without KL clipping (the model sizes the step)."""
    options = PRECONDITIONER_OPTIONS | {"damping": config.damping}
    if config.factor_decay is not None:
        options["factor_decay"] = config.factor_decay
    if config.short_memory_steps is not None:
        late = PRECONDITIONER_OPTIONS["factor_decay"]
        options["factor_decay"] = SwitchedDecay(
            config.factor_decay, late, config.short_memory_steps
        )
    if config.kl_clip is not None:
        options["kl_clip"] = config.kl_clip
    if config.method == "kfac_qm":
        options["kl_clip"] = None
    if config.damping_mode is not None:
        options["damping_mode"] = config.damping_mode
    return (EKFAC if config.method == "ekfac" else KFAC)(
        model,
        lr=config.lr,
        likelihood=likelihood_of(task),
        generator=torch.Generator(device=next(model.parameters()).device).manual_seed(0),
        **(options | overrides),
    )


def likelihood_of(task: Task) -> str:
    return "bernoulli" if task.reconstruct else "categorical"


def inputs_of(task: Task, features: Tensor) -> Tensor:
    return features.reshape(-1, 1, 8, 8) if task.image else features


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, data: dict[str, Tensor]) -> float:
    model.eval()
    try:
        if task.metric == "test_accuracy":
            logits = model(inputs_of(task, data["test_x"]))
            return float((logits.argmax(1) == data["test_y"]).float().mean())
        return float(task.loss(model(data["train_x"]), data["train_x"]))
    finally:
        model.train()


def reached(task: Task, value: float) -> bool:
    if task.metric == "test_accuracy":
        return value >= task.target
    return value <= task.target


def training_step(task: Task, model, optimizer, precond, inputs: Tensor, targets: Tensor) -> None:
    """One step: forward, (MC backward for the preconditioner), backward, precondition, update
    and, when adaptive damping asks for it, the loss of the same batch after the update."""

    def forward_backward() -> Tensor:
        optimizer.zero_grad()
        outputs = model(inputs)
        if precond is not None and precond.fisher_type != "empirical":
            precond.sample_backward(outputs)
        loss = task.loss(outputs, targets)
        loss.backward()
        return loss

    if isinstance(optimizer, QuadraticModelOptimizer):
        optimizer.step(forward_backward)
        return
    loss = forward_backward()
    if precond is not None:
        precond.step()
    optimizer.step()
    if precond is not None and precond.damping_update_due:
        with torch.no_grad():
            precond.update_damping(loss, task.loss(model(inputs), targets))


def finite_step(task: Task, model, optimizer, precond, inputs: Tensor, targets: Tensor) -> bool:
    """:func:`training_step`; ``False`` where it raised because the model's outputs on the
    batch are no longer finite (a diverged run, evaluated as a NaN: K-FAC's Monte-Carlo draws
    refuse non-finite outputs). Any other error propagates."""
    try:
        training_step(task, model, optimizer, precond, inputs, targets)
    except ValueError:
        with torch.no_grad():
            if bool(torch.isfinite(model(inputs)).all()):
                raise
        return False
    return True


def train_run(
    task: Task,
    config: TrainConfig,
    data: dict[str, Tensor],
    seed: int,
    epochs: int,
    eval_every: int,
    stop_at_target: bool = False,
    **preconditioner_options,
) -> dict:
    """Train for ``epochs`` epochs (or until the target, with ``stop_at_target``), evaluating
    every ``eval_every`` steps of the task's batch size (as many samples between evaluations at
    the configuration's batch size); only the training steps are timed.
    ``preconditioner_options`` override ``PRECONDITIONER_OPTIONS``."""
    batch_size = config.batch_size or task.batch_size
    eval_every = max(1, round(eval_every * task.batch_size / batch_size))
    torch.manual_seed(seed)
    model = task.build()
    optimizer, precond = make_optimizer(task, config, model, **preconditioner_options)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = data["train_x"], data["train_y"]
    wall, steps, curve = 0.0, 0, []
    time_to_target = steps_to_target = None
    diverged = False
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for begin in range(0, len(order), batch_size):
            index = order[begin : begin + batch_size]
            inputs = inputs_of(task, train_x[index])
            targets = train_x[index] if task.reconstruct else train_y[index]
            start = time.perf_counter()
            if not finite_step(task, model, optimizer, precond, inputs, targets):
                curve.append((wall, steps, math.nan))
                diverged = True
                break
            wall += time.perf_counter() - start
            steps += 1
            if steps % eval_every:
                continue
            value = evaluate(task, model, data)
            curve.append((wall, steps, value))
            if not math.isfinite(value):
                diverged = True
                break
            if time_to_target is None and reached(task, value):
                time_to_target, steps_to_target = wall, steps
        if diverged or (stop_at_target and time_to_target is not None):
            break
    if precond is not None:
        precond.remove()
    values = [value for _, _, value in curve]
    return {
        "task": task.name,
        "method": config.method,
        "config": config.label(),
        "lr": config.lr,
        "momentum": config.momentum,
        "beta2": config.beta2,
        "damping": config.damping,
        "damping_mode": config.damping_mode,
        "max_kl": config.max_kl,
        "batch_size": config.batch_size,
        "factor_decay": config.factor_decay,
        "short_memory_steps": config.short_memory_steps,
        "kl_clip": config.kl_clip,
        "final": values[-1],
        "best": max(values) if task.metric == "test_accuracy" else min(values),
        "time_to_target_s": time_to_target,
        "steps_to_target": steps_to_target,
        "wall_s": wall,
        "steps": steps,
        "diverged": diverged,
        "curve": curve,
    }


def pick_best(task: Task, runs: list[dict]) -> dict:
    """Fewest (median) steps to the target (then least time) at each batch size, and of those
    the fastest; otherwise the best metric. At one batch size the configurations of a method cost
    about the same per step (K-FAC's factored damping is cheaper than its eigenbasis damping,
    which the tie-break by time favours), so fewest steps is least time without the timing
    noise of a shared machine; steps at different batch sizes differ in cost, so there the
    time decides."""
    hit = [run for run in runs if run["steps_to_target"] is not None]
    if hit:
        per_batch = {}
        for run in sorted(hit, key=lambda run: (run["steps_to_target"], run["time_to_target_s"])):
            per_batch.setdefault(run["batch_size"], run)
        return min(per_batch.values(), key=lambda run: run["time_to_target_s"])
    sign = -1.0 if task.metric == "test_accuracy" else 1.0
    finite = [run for run in runs if math.isfinite(run["best"])] or runs
    return min(finite, key=lambda run: sign * run["best"])


def batch_sizes(task: Task, args: argparse.Namespace) -> list[int | None]:
    """The batch sizes to tune over: ``--batch-sizes`` for a mini-batch task, else the task's
    own (``None``)."""
    if not args.batch_sizes or task.batch_size >= TRAIN_SIZE:
        return [None]
    return list(args.batch_sizes)


def eval_every(task: Task, args: argparse.Namespace) -> int:
    """Steps between evaluations: the task's own, else ``--eval-every``."""
    return task.eval_every or args.eval_every


def tune(task: Task, data: dict[str, Tensor], args: argparse.Namespace) -> list[dict]:
    """Every method over its grid at every batch size (one configuration per batch size with
    ``--quick``), each configuration trained with the ``--tune-seeds`` training seeds and
    stopped at the target; per configuration the median over the seeds (:func:`over_seeds`)."""
    epochs = 2 if args.quick else task.epochs
    runs = []
    for method in LR_GRIDS:
        configs = [
            config
            for batch_size in batch_sizes(task, args)
            for config in grid(method, [batch_size])[slice(4, 5) if args.quick else slice(None)]
        ]
        for config in configs:
            seeded = [
                train_run(
                    task, config, data, seed, epochs, eval_every(task, args), stop_at_target=True
                )
                for seed in tuning_seeds(args)
            ]
            runs.append(over_seeds(seeded))
    return runs


def tuning_seeds(args: argparse.Namespace) -> range:
    """The training seeds of the tuning runs: ``--seed`` and the next ``--tune-seeds`` − 1."""
    return range(args.seed, args.seed + args.tune_seeds)


def over_seeds(runs: list[dict]) -> dict:
    """One configuration's tuning runs (one per seed) as one row: the median steps and time to
    target over the seeds, a run that missed the target counting as infinitely slow (``None``
    where most missed), the median best metric; the per-seed steps; diverged if any run did."""
    steps = [run["steps_to_target"] for run in runs]
    times = [run["time_to_target_s"] for run in runs]
    median_steps = median_or_none(steps)
    return {key: value for key, value in runs[0].items() if key != "curve"} | {
        "steps_to_target": median_steps,
        "time_to_target_s": None if median_steps is None else median_or_none(times),
        "steps_per_seed": steps,
        "best": statistics.median(run["best"] for run in runs),
        "wall_s": sum(run["wall_s"] for run in runs),
        "diverged": any(run["diverged"] for run in runs),
    }


def median_or_none(values: list[float | None]) -> float | None:
    """Median with ``None`` as +∞; ``None`` if that is the median."""
    median = statistics.median(math.inf if value is None else value for value in values)
    return None if math.isinf(median) else median


def config_of(run: dict) -> TrainConfig:
    """The configuration a :func:`train_run` result was trained with."""
    return TrainConfig(**{field.name: run.get(field.name) for field in fields(TrainConfig)})


def other_seeds(task: Task, best: list[dict], data, args: argparse.Namespace) -> list[dict]:
    """The winners of ``task`` trained once more with ``--check-seeds`` training seeds not used
    in tuning (model initialisation and batch order; the data split stays), each up to the
    target, and their time to target relative to Adam's at the same seed."""
    epochs = 2 if args.quick else task.epochs
    rows = []
    first = args.seed + args.tune_seeds
    for seed in range(first, first + args.check_seeds):
        runs = [
            train_run(
                task,
                config_of(row),
                data,
                seed,
                epochs,
                eval_every(task, args),
                stop_at_target=True,
            )
            for row in best
        ]
        adam = next(run for run in runs if run["method"] == "adam")["time_to_target_s"]
        for run in runs:
            time = run["time_to_target_s"]
            ratio = time / adam if time is not None and adam is not None else None
            rows.append(
                {
                    "task": task.name,
                    "seed": seed,
                    "method": run["method"],
                    "steps_to_target": run["steps_to_target"],
                    "time_to_target_s": time,
                    "x_adam_time": ratio,
                }
            )
    return rows


def rerun_best(task: Task, tuning: list[dict], data, args: argparse.Namespace) -> list[dict]:
    """The best configuration of every method, re-run on every tuning seed ``args.repeats``
    times in interleaved rounds (on the first seed the first run goes to the end of the epoch
    budget, for the curve and the final metric; the others stop at the target). Per seed the
    time to target is the median over the repeats; a row reports the median over the seeds (a
    miss counting as infinitely slow) and ``x_adam_time``, the median over the seeds of the
    ratio to Adam's time at the same seed (:func:`_ratio_to_adam`)."""
    epochs = 2 if args.quick else task.epochs
    chosen = {}
    for method in LR_GRIDS:
        best = pick_best(task, [run for run in tuning if run["method"] == method])
        chosen[method] = config_of(best)
    first_runs: dict[str, dict] = {}
    per_seed: dict[str, list[dict]] = {method: [] for method in chosen}
    for seed in tuning_seeds(args):
        repeats: dict[str, list[dict]] = {method: [] for method in chosen}
        for repeat in range(args.repeats):
            for method, config in chosen.items():
                full = seed == args.seed and repeat == 0
                run = train_run(
                    task,
                    config,
                    data,
                    seed,
                    epochs,
                    eval_every(task, args),
                    stop_at_target=not full,
                )
                first_runs.setdefault(method, run)
                repeats[method].append(run)
        for method, runs in repeats.items():
            times = [run["time_to_target_s"] for run in runs if run["time_to_target_s"] is not None]
            steps = runs[0]["steps_to_target"]
            per_seed[method].append(
                {"steps": steps, "seconds": statistics.median(times) if times else None}
            )
    return [_timed_row(first_runs[method], per_seed[method], per_seed["adam"]) for method in chosen]


def _timed_row(first_run: dict, seeds: list[dict], adam: list[dict]) -> dict:
    """The row of one winner: its first run (curve, final and best metric) with the medians
    over the timing seeds of its steps and seconds to target and of its ratio to Adam's
    seconds at the same seed (a miss counting as infinitely slow; a seed where both missed
    is left out of the ratio)."""
    seconds = [seed["seconds"] for seed in seeds]
    ratios = [
        _ratio_to_adam(ours["seconds"], theirs["seconds"])
        for ours, theirs in zip(seeds, adam, strict=True)
    ]
    compared = [
        ratio
        for ratio, ours, theirs in zip(ratios, seeds, adam, strict=True)
        if ours["seconds"] is not None or theirs["seconds"] is not None
    ]
    paced = [1e3 * seed["seconds"] / seed["steps"] for seed in seeds if seed["seconds"] is not None]
    return first_run | {
        "steps_to_target": median_or_none([seed["steps"] for seed in seeds]),
        "time_to_target_s": median_or_none(seconds),
        "x_adam_time": median_or_none(compared) if compared else None,
        "steps_per_seed": [seed["steps"] for seed in seeds],
        "seconds_per_seed": seconds,
        "x_adam_per_seed": [None if ratio is None else round(ratio, 3) for ratio in ratios],
        "ms_per_step": statistics.median(paced) if paced else None,
    }


def _ratio_to_adam(seconds: float | None, adam_seconds: float | None) -> float | None:
    """Time to target ÷ Adam's at the same seed; ``None`` where this method missed the target
    (or both did), ``0`` where only Adam did."""
    if seconds is None:
        return None
    return 0.0 if adam_seconds is None else seconds / adam_seconds


@dataclass(frozen=True)
class CostConfig:
    """One row of the step-cost table: the library, the method and, for K-FAC/EKFAC, the Fisher
    type, the damping mode, the factor (curvature) and inverse update intervals and whether the
    update is KL-clipped."""

    library: str
    method: str
    fisher_type: str | None = None
    damping_mode: str | None = None
    factor_interval: int | None = None
    inv_interval: int | None = None
    kl_clip: bool = False

    def intervals(self) -> str:
        return "" if self.factor_interval is None else f"{self.factor_interval}/{self.inv_interval}"


COST_DAMPING = 0.1
COST_MAX_KL = 0.1
"""The quadratic model's ``max_kl`` in the step-cost loop: on its one repeated batch the model's
momentum coefficient can reverse ever larger previous steps (``μ`` down to −7 with
K-FAC-reduce on the CNN, the parameters at 1e14 within 12 steps), which the bound prevents."""
LARGE_BATCH = 256
"""Above this batch size a step-cost timing covers 20 steps (two update cycles) and at most 3
rounds."""
SGD_COST = CostConfig("torch", "sgd")
COST_CONFIGS = [
    SGD_COST,
    CostConfig("torch", "adam"),
    *(
        CostConfig("natgrad", "kfac", fisher_type, "eigen", *intervals, kl_clip=True)
        for fisher_type in ("mc", "empirical")
        for intervals in ((1, 1), (1, 10), (10, 10))
    ),
    *(
        CostConfig(library, "kfac", "empirical", "factored", *intervals)
        for intervals in ((1, 10), (10, 10))
        for library in ("natgrad", "asdl")
    ),
    *(
        CostConfig("natgrad", "ekfac", fisher_type, "eigen", interval, interval, kl_clip=True)
        for fisher_type in ("mc", "empirical")
        for interval in (1, 10)
    ),
    *(CostConfig("natgrad", "kfac_qm", "mc", mode, 10, 10) for mode in ("eigen", "factored")),
]


def batch_of(task: Task, data: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The first training batch: inputs and targets."""
    features = data["train_x"][: task.batch_size]
    targets = features if task.reconstruct else data["train_y"][: task.batch_size]
    return inputs_of(task, features), targets


def natgrad_stepper(task: Task, config: CostConfig, model: nn.Module, inputs, targets):
    """A training step of SGD-momentum, Adam or SGD-momentum preconditioned by natgrad's
    K-FAC/EKFAC; and its clean-up."""
    if config.library == "torch":
        beta2 = 0.999 if config.method == "adam" else None
        optimizer, precond = make_optimizer(
            task, TrainConfig(config.method, 0.01, beta2=beta2), model
        )
    else:
        lr = 1.0 if config.method == "kfac_qm" else 0.01
        optimizer, precond = make_optimizer(
            task,
            TrainConfig(
                config.method,
                lr,
                damping=COST_DAMPING,
                damping_mode=config.damping_mode,
                max_kl=COST_MAX_KL if config.method == "kfac_qm" else None,
            ),
            model,
            fisher_type=config.fisher_type,
            damping_mode=config.damping_mode,
            factor_update_interval=config.factor_interval,
            inv_update_interval=config.inv_interval,
            kl_clip=PRECONDITIONER_OPTIONS["kl_clip"] if config.kl_clip else None,
        )

    def step() -> None:
        training_step(task, model, optimizer, precond, inputs, targets)

    return step, (lambda: None) if precond is None else precond.remove


def asdl_stepper(task: Task, config: CostConfig, model: nn.Module, inputs, targets):
    """A training step with ASDL's ``KfacGradientMaker`` (empirical Fisher, π-damping) and
    SGD-momentum: ``forward_and_backward()`` runs forward, backward, the curvature and
    inverse updates as scheduled and the preconditioning; then ``optimizer.step()``."""
    asdl = import_asdl()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    maker = asdl.KfacGradientMaker(
        model,
        asdl.PreconditioningConfig(
            data_size=len(inputs),
            damping=COST_DAMPING,
            ema_decay=1.0 - PRECONDITIONER_OPTIONS["factor_decay"],
            curvature_upd_interval=config.factor_interval,
            preconditioner_upd_interval=config.inv_interval,
        ),
        fisher_type="fisher_emp",
    )

    def step() -> None:
        optimizer.zero_grad()
        outputs = maker.setup_model_call(model, inputs)
        maker.setup_loss_call(task.loss, outputs, targets)
        maker.forward_and_backward()
        optimizer.step()

    return step, lambda: None


def step_seconds(
    task: Task, config: CostConfig, data: dict[str, Tensor], steps: int, device: torch.device
) -> float:
    """Mean wall seconds per training step on ``device`` over ``steps`` steps (a multiple of the
    update intervals, so that factor and inverse updates are counted at their share), after a
    warm-up of 10 steps."""
    torch.manual_seed(0)
    model = task.build().to(device)
    inputs, targets = (tensor.to(device) for tensor in batch_of(task, data))
    make = asdl_stepper if config.library == "asdl" else natgrad_stepper
    step, cleanup = make(task, config, model, inputs, targets)
    for _ in range(10):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    cleanup()
    return seconds


def step_costs(
    task: Task, data: dict[str, Tensor], steps: int, rounds: int, device: torch.device
) -> list[dict]:
    """Per-step cost of every ``COST_CONFIGS`` entry, relative to SGD-momentum.

    The configurations are timed in turn, ``rounds`` times over; each reports the median over
    rounds of its mean milliseconds per step and of its ratio to the SGD-momentum step of the
    same round, so that a load burst on a shared machine hits all configurations alike.
    """
    timings: dict[CostConfig, list[float]] = {config: [] for config in COST_CONFIGS}
    description = f"step costs, {task.name} batch {task.batch_size}"
    for _ in tqdm(range(rounds), desc=description, unit="round", leave=False):
        for config in COST_CONFIGS:
            timings[config].append(step_seconds(task, config, data, steps, device))
    sgd = timings[SGD_COST]
    return [
        {
            "task": task.name,
            "batch_size": task.batch_size,
            "library": config.library,
            "method": config.method,
            "fisher_type": config.fisher_type or "",
            "damping_mode": config.damping_mode or "",
            "intervals": config.intervals(),
            "kl_clip": config.kl_clip,
            "ms_per_step": 1e3 * statistics.median(seconds),
            "x_sgd": statistics.median(s / base for s, base in zip(seconds, sgd, strict=True)),
        }
        for config, seconds in timings.items()
    ]


def import_asdl():
    """ASDL (``asdfghjkl``), with its NVTX ranges turned into no-ops: ``torch.cuda.nvtx`` raises
    on CPU-only builds of torch, and ASDL opens a range around every inverse update."""
    import asdl

    no_ranges = types.SimpleNamespace(range=lambda *args, **kwargs: contextlib.nullcontext())
    for module in ("asdl.precondition.natural_gradient", "asdl.operations.operation", "asdl.utils"):
        importlib.import_module(module).nvtx = no_ranges
    return asdl


def agreement_model(bias: bool) -> nn.Module:
    """A float64 convolution-and-MLP classifier of 8×8 images for :func:`asdl_agreement`."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=bias),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 64, 16, bias=bias),
        nn.Tanh(),
        nn.Linear(16, 10, bias=bias),
    ).double()


def asdl_agreement(damping: float = 0.1) -> list[dict]:
    """Relative difference between ASDL's and natgrad's preconditioned gradients after one step
    (empirical Fisher, π-damping, factors of this batch only), per layer, on float64 models
    without and with biases. Without biases both compute the same K-FAC update (to rounding);
    with biases they differ by construction: natgrad folds the bias into the input factor
    (homogeneous coordinates), ASDL preconditions the bias gradient by ``G⁻¹`` alone.
    """
    asdl = import_asdl()
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(32, 1, 8, 8, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 10, (32,), generator=generator)
    rows = []
    for bias in (False, True):
        torch.manual_seed(0)
        ours = agreement_model(bias)
        peer = copy.deepcopy(ours)
        maker = asdl.KfacGradientMaker(
            peer,
            asdl.PreconditioningConfig(data_size=len(inputs), damping=damping, ema_decay=1.0),
            fisher_type="fisher_emp",
        )
        outputs = maker.setup_model_call(peer, inputs)
        maker.setup_loss_call(nn.functional.cross_entropy, outputs, targets)
        maker.forward_and_backward()
        precond = KFAC(
            ours, damping=damping, damping_mode="factored", factor_decay=0.0, inv_update_interval=1
        )
        nn.functional.cross_entropy(ours(inputs), targets).backward()
        precond.step()
        precond.remove()
        for (name, expected), got in zip(ours.named_parameters(), peer.parameters(), strict=True):
            difference = (got.grad - expected.grad).norm() / expected.grad.norm()
            rows.append(
                {"parameter": name, "model_bias": bias, "relative_difference": float(difference)}
            )
    return rows


def factor_cost(
    task: Task, data: dict[str, Tensor], repeats: int, device: torch.device
) -> list[dict]:
    """Seconds to build K-FAC factors (empirical Fisher) on one batch on ``device``, per
    library."""
    torch.manual_seed(0)
    model = task.build().to(device)
    inputs, targets = (tensor.to(device) for tensor in batch_of(task, data))
    builders: dict[str, Callable[[], None]] = {}
    from natgrad.curvature.kfac import build_kfac

    likelihood = "bernoulli" if task.reconstruct else "categorical"
    approx = PRECONDITIONER_OPTIONS["kfac_approx"]
    builders["natgrad build_kfac"] = lambda: build_kfac(
        model, inputs, likelihood=likelihood, kind="empirical", targets=targets, kfac_approx=approx
    )
    try:
        from curvlinops import KFACLinearOperator

        loss_func = (
            nn.BCEWithLogitsLoss(reduction="sum") if task.reconstruct else nn.CrossEntropyLoss()
        )
        params = [p for p in model.parameters() if p.requires_grad]

        def curvlinops_factors() -> None:
            operator = KFACLinearOperator(
                model,
                loss_func,
                params,
                [(inputs, targets)],
                fisher_type="empirical",
                check_deterministic=False,
                kfac_approx=approx,
            )
            operator.compute_kronecker_factors()

        builders["curvlinops KFACLinearOperator"] = curvlinops_factors
    except ImportError:
        pass
    builders["backpack KFAC (MC, 1 sample)"] = backpack_builder(task, model, inputs, targets)
    builders["asdl FisherEmp (kron)"] = asdl_factor_builder(task, model, inputs, targets)
    rows = []
    for library, build in builders.items():
        try:
            build()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                build()
            synchronize(device)
            rows.append(
                {
                    "task": task.name,
                    "library": library,
                    "seconds": (time.perf_counter() - start) / repeats,
                }
            )
        except Exception as error:  # a peer library may not support the model
            rows.append(
                {
                    "task": task.name,
                    "library": library,
                    "seconds": float("nan"),
                    "error": repr(error),
                }
            )
    return rows


def asdl_factor_builder(task: Task, model: nn.Module, inputs: Tensor, targets: Tensor):
    """ASDL's empirical-Fisher maker with Kronecker shape on a deep copy of ``model`` (one
    forward and backward, which also leave the loss gradient in ``.grad``)."""
    asdl = import_asdl()
    copied = copy.deepcopy(model)
    maker = asdl.get_fisher_maker(
        copied,
        asdl.FisherConfig(fisher_type="fisher_emp", fisher_shapes=["kron"], data_size=len(inputs)),
    )

    def build() -> None:
        copied.zero_grad()
        outputs = maker.setup_model_call(copied, inputs)
        maker.setup_loss_call(task.loss, outputs, targets)
        maker.forward_and_backward()

    return build


def backpack_builder(task: Task, model: nn.Module, inputs: Tensor, targets: Tensor):
    """BackPACK's KFAC extension (one MC sample) on a deep copy of ``model``."""
    import copy

    from backpack import backpack, extend
    from backpack.extensions import KFAC as BackpackKFAC

    extended = extend(copy.deepcopy(model))
    loss_func = extend(
        nn.BCEWithLogitsLoss(reduction="sum") if task.reconstruct else nn.CrossEntropyLoss()
    )

    def build() -> None:
        extended.zero_grad()
        with backpack(BackpackKFAC(mc_samples=1)):
            loss_func(extended(inputs), targets).backward()

    return build


def plot(best_runs: list[dict], tasks: list[Task]) -> Figure:
    figure = Figure(figsize=(4 * len(tasks), 3.4))
    for axis_index, task in enumerate(tasks):
        axis = figure.add_subplot(1, len(tasks), axis_index + 1)
        for run in (run for run in best_runs if run["task"] == task.name):
            times = [point[0] for point in run["curve"]]
            values = [point[2] for point in run["curve"]]
            axis.plot(times, values, label=run["method"], linewidth=1)
        axis.axhline(task.target, color="grey", linestyle=":", linewidth=1)
        axis.set_title(task.name)
        axis.set_xlabel("training wall time (s)")
        axis.set_ylabel(task.metric.replace("_", " "))
        if task.metric == "train_loss":
            axis.set_yscale("log")
        else:
            axis.set_ylim(0.9, 1.0)
        axis.legend(fontsize=7)
    return figure


def targets_text(tasks: list[Task]) -> str:
    return ", ".join(f"{task.name} {task.metric} {task.target:g}" for task in tasks)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 epochs, one configuration per method"
    )
    parser.add_argument("--tasks", nargs="*", default=[task.name for task in TASKS])
    parser.add_argument(
        "--eval-every", type=int, default=5, help="steps between evaluations (default 5)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed re-runs of each best configuration"
    )
    parser.add_argument(
        "--cost-steps", type=int, default=50, help="steps per step-cost timing (default 50)"
    )
    parser.add_argument(
        "--cost-rounds", type=int, default=9, help="interleaved step-cost rounds (default 9)"
    )
    parser.add_argument(
        "--cost-only", action="store_true", help="only the cost tables (no training runs)"
    )
    parser.add_argument(
        "--tune-seeds",
        type=int,
        default=3,
        help="training seeds per tuning configuration, ranked by the median (default 3)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        help="tune every method of the mini-batch tasks over these batch sizes as well "
        "(default: the task's own only) and measure the step costs at each",
    )
    parser.add_argument(
        "--kfac-approx",
        choices=["expand", "reduce"],
        default="expand",
        help="natgrad K-FAC/EKFAC factors of the convolutions: KFC (default) or K-FAC-reduce",
    )
    parser.add_argument(
        "--fisher-type",
        choices=["mc", "empirical", "exact"],
        default="mc",
        help="the Fisher of natgrad's K-FAC/EKFAC in the training runs (default mc)",
    )
    parser.add_argument(
        "--check-seeds",
        type=int,
        default=0,
        help="train the winners once more with seeds 1..N (default 0: no check)",
    )
    parser.add_argument(
        "--device",
        type=torch.device,
        default=torch.device("cpu"),
        help="device of the step-cost and factor-cost timings (default cpu); the training runs "
        "stay on the CPU, so another device needs --cost-only",
    )
    args = parser.parse_args(argv)
    if args.device.type != "cpu" and not args.cost_only:
        parser.error(f"--device {args.device} times the step costs only: add --cost-only")
    if args.batch_sizes and min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must be positive, got {args.batch_sizes}")
    if args.tune_seeds < 1:
        parser.error(f"--tune-seeds must be positive, got {args.tune_seeds}")
    if args.quick:
        args.repeats, args.cost_steps, args.cost_rounds, args.tune_seeds = 1, 10, 1, 1
    return args


def print_tables(tasks: list[Task], results: dict) -> None:
    print_table(
        "Best configuration per optimizer (targets: " + targets_text(tasks) + "; steps, time "
        "and ratio to Adam's time = medians over the tuning seeds of the timed re-runs; final "
        "and best metric of the first seed's full run)",
        results["best"],
        [
            "task",
            "method",
            "config",
            "steps_to_target",
            "time_to_target_s",
            "x_adam_time",
            "steps_per_seed",
            "x_adam_per_seed",
            "ms_per_step",
            "final",
            "best",
        ],
    )
    if results["other_seeds"]:
        print_table(
            "The winners with other training seeds (one run each, stopped at the target)",
            results["other_seeds"],
            ["task", "seed", "method", "steps_to_target", "time_to_target_s", "x_adam_time"],
        )
    print_table(
        "Tuning runs (each stopped at the target; median over the tuning seeds)",
        results["runs"],
        [
            "task",
            "method",
            "config",
            "steps_to_target",
            "steps_per_seed",
            "time_to_target_s",
            "best",
            "diverged",
        ],
    )
    print_table(
        "Cost of one training step (mean over whole update cycles; `intervals` = factor / "
        "inverse update interval; x_sgd = median over rounds of the ratio to SGD in that round)",
        results["step_cost"],
        [
            "task",
            "batch_size",
            "library",
            "method",
            "fisher_type",
            "damping_mode",
            "intervals",
            "kl_clip",
            "ms_per_step",
            "x_sgd",
        ],
    )
    print_table(
        "ASDL vs natgrad preconditioned gradient, one step (empirical Fisher, π-damping 0.1)",
        results["asdl_agreement"],
        ["parameter", "model_bias", "relative_difference"],
    )
    print_table(
        "K-FAC factors on one batch (empirical Fisher unless stated)",
        results["factor_cost"],
        ["task", "library", "seconds"],
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    PRECONDITIONER_OPTIONS["kfac_approx"] = args.kfac_approx
    PRECONDITIONER_OPTIONS["fisher_type"] = args.fisher_type
    data = load_data(args.seed)
    tasks = [task for task in TASKS if task.name in args.tasks]
    results: dict[str, list[dict]] = {
        "best": [],
        "other_seeds": [],
        "runs": [],
        "step_cost": [],
        "factor_cost": [],
        "asdl_agreement": asdl_agreement(),
    }
    for task in tasks:
        if not args.cost_only:
            tuning = tune(task, data, args)
            results["runs"].extend(tuning)
            best = rerun_best(task, tuning, data, args)
            results["best"].extend(best)
            results["other_seeds"].extend(other_seeds(task, best, data, args))
        if not task.step_cost:
            continue
        for batch_size in batch_sizes(task, args):
            variant = replace(task, batch_size=batch_size or task.batch_size)
            large = variant.batch_size > LARGE_BATCH
            steps, rounds = (
                (20, min(3, args.cost_rounds)) if large else (args.cost_steps, args.cost_rounds)
            )
            results["step_cost"].extend(step_costs(variant, data, steps, rounds, args.device))
        repeats = 3 if args.quick or large else 20
        results["factor_cost"].extend(factor_cost(task, data, repeats, args.device))
    print_tables(tasks, results)
    payload = {
        "environment": environment(
            seed=args.seed,
            quick=args.quick,
            eval_every=args.eval_every,
            repeats=args.repeats,
            tune_seeds=args.tune_seeds,
            batch_sizes=args.batch_sizes,
            preconditioner=PRECONDITIONER_OPTIONS,
            lr_grids=LR_GRIDS,
            second_grids=SECOND_GRIDS,
            load_average=os.getloadavg(),
            device=str(args.device),
            device_name=torch.cuda.get_device_name(args.device)
            if args.device.type == "cuda"
            else platform.processor(),
        ),
        "targets": {task.name: {"metric": task.metric, "target": task.target} for task in tasks},
        **results,
    }
    if not (args.quick or args.cost_only):
        name = NAME if len(tasks) == len(TASKS) else "_".join([NAME, *args.tasks])
        if args.batch_sizes:
            name += "_batch" + "-".join(str(size) for size in args.batch_sizes)
        if args.kfac_approx != "expand":
            name += "_" + args.kfac_approx
        if args.fisher_type != "mc":
            name += "_" + args.fisher_type
        save_json(name, payload)
        save_figure(plot(results["best"], tasks), name)
    elif args.cost_only and args.device.type != "cpu":
        save_json(f"{NAME}_cost_{args.device.type}", payload)
    return payload


if __name__ == "__main__":
    main()
