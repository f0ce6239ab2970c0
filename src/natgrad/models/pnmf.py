"""Probabilistic Poisson NMF with standard (Adam) or natural-gradient variational inference."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_array, check_random_state
from sklearn.utils.validation import check_is_fitted, check_non_negative, validate_data

from natgrad._validation import is_integer, is_real
from natgrad._warnings import warn_at_caller
from natgrad.expfam import Gaussian
from natgrad.models.pnmf_counts import CountMatrix, count_matrix
from natgrad.models.pnmf_elbo import ELBO_MODES, elbo, expected_exp_factors
from natgrad.models.pnmf_training import (
    LOADINGS_UPDATES,
    FitSettings,
    FitState,
    fit_natural,
    fit_standard,
    warn_if_refused,
)
from natgrad.models.pnmf_updates import gaussian_from_moments

TRAINING_MODES = ("standard", "natural")
DEFAULT_ADAM_LEARNING_RATE = 0.01
DEFAULT_NATURAL_STEP = {"lower-bound": 1.0, "expanded": 0.3, "simple": 0.3}
EVALUATION_DRAWS = 100
INITIAL_VARIANCE = 0.1
EVALUATION_CHUNK_ENTRIES = 2_000_000
INITIAL_DRAW_DTYPE = torch.float32
"""The dtype of the initialisation's random draws, whatever the dtype of the counts (float32,
the default counts' dtype, so that float32 fits start where they always did)."""


def column_sums(counts: CountMatrix) -> torch.Tensor:
    """``Σ_i y_ij``, shape ``(n_features,)``."""
    if not counts.is_sparse:
        return counts.dense.sum(0)
    sums = torch.zeros(counts.n_features, dtype=counts.dtype, device=counts.device)
    return sums.index_add_(0, counts.cols, counts.values)


def initial_loadings(
    column_means: torch.Tensor, n_components: int, generator: torch.Generator
) -> torch.Tensor:
    """``W_jl = (ȳ_j + 10⁻³) e^{−σ₀²/2} / L · u_jl``, ``u ~ U(0.5, 1.5)``, shape ``(D, L)``.

    With ``μ ≈ 0`` and ``σ² = σ₀²`` this makes the initial expected rate match the column means.
    ``u`` is drawn in float32 whatever the counts' dtype (float32 and float64 draws of one
    generator differ), so float32 and float64 counts start from the same point.
    """
    jitter = torch.rand(
        (len(column_means), n_components),
        generator=generator,
        dtype=INITIAL_DRAW_DTYPE,
        device=generator.device,
    ).to(column_means.device, column_means.dtype)
    scale = np.exp(-0.5 * INITIAL_VARIANCE) / n_components
    return (column_means + 1e-3)[:, None] * scale * (0.5 + jitter)


def initial_posterior(
    n_samples: int,
    n_components: int,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> Gaussian:
    """``q(F) = N(0.1 ε, σ₀²)`` with ``ε ~ N(0, 1)``, batch shape ``(n_samples, n_components)``.

    ``ε`` is drawn in float32 and then cast to ``dtype``, as in :func:`initial_loadings`.
    """
    shape = (n_samples, n_components)
    noise = torch.randn(
        shape, generator=generator, dtype=INITIAL_DRAW_DTYPE, device=generator.device
    )
    mean = (0.1 * noise).to(device, dtype)
    variance = torch.full(shape, INITIAL_VARIANCE, dtype=dtype, device=device)
    return gaussian_from_moments(mean, variance)


class PNMF(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Poisson NMF with a Gaussian variational posterior over log-activations.

    Model: ``y_ij ~ Poisson(Σ_l W_jl exp(F_il))``, ``W ≥ 0`` of shape
    ``(n_features, n_components)``, ``F_il ~ N(0, 1)``, ``q(F) = Π N(μ_il, σ²_il)``. ``W`` is a
    point estimate; ``q(F)`` is fitted by maximising the ELBO (summed over entries, ``−log y!``
    included).

    Parameters
    ----------
    n_components : int, default=10
        Number of components ``L``.
    training_mode : {"standard", "natural"}, default="standard"
        ``"standard"``: Adam on ``(μ, softplus⁻¹ σ)`` and on ``W`` (projected onto ``W ≥ 0``).
        ``"natural"``: natural-gradient (variational online Newton) steps on ``q(F)`` held in
        natural parameters, and ``W`` by its closed-form multiplicative (EM) update (or by
        Adam steps, see ``loadings_update``).
    mode : {"simple", "expanded", "lower-bound"}, default="expanded"
        ELBO estimator: full Monte Carlo; Monte Carlo for ``y·log rate`` with the rate in
        closed form; or the analytic Jensen lower bound (no sampling).
    E : int, default=10
        Monte-Carlo draws per iteration (unused by ``"lower-bound"``).
    max_iter : int, default=1000
        Maximum number of iterations (epochs when ``batch_size`` is set).
    tol : float, default=1e-4
        Relative tolerance of the windowed ELBO stopping rule: stop when the means of the
        last two windows of 20 ELBO values differ by less than ``tol`` times their size.
    learning_rate : float or None, default=None
        Adam's learning rate (``"standard"``, default 0.01) or the natural step ``ρ`` on the
        summed ELBO (``"natural"``, in ``(0, 1]``; ramped up over 3 iterations, mean steps
        clipped to ``|Δμ| ≤ 1``). The natural default is 1.0 for ``"lower-bound"`` (exact
        gradients) and 0.3 for the Monte-Carlo modes, where ``ρ = 1`` with ``E = 10`` draws
        lets the gradient noise through undamped and ends at a clearly worse ELBO.
    loadings_update : {"multiplicative", "adam"}, default="multiplicative"
        How ``"natural"`` training updates ``W`` after each ``q(F)`` step: ``"multiplicative"``
        sets it to its closed-form multiplicative (EM) optimum given ``q``; ``"adam"`` takes one
        Adam step along ``∂ELBO/∂W`` with learning rate 0.01 (fixed, independent of
        ``learning_rate``, which is ``ρ`` for ``q(F)``), projected onto ``W ≥ 1e-10``. With
        ``batch_size`` set, ``"multiplicative"`` takes Robbins–Monro steps on W's sufficient
        statistics and ``"adam"`` uses the minibatch gradient scaled by ``N/B``. In
        ``"standard"`` training ``W`` is always updated by Adam (with ``learning_rate``) and
        this parameter has no effect.
    batch_size : int or None, default=None
        Minibatch size over samples (stochastic VI); ``None`` uses all samples.
    random_state : int, RandomState or None, default=None
        Seed of the initialisation and of the Monte-Carlo draws. The initialisation is drawn
        in float32 whatever the dtype of ``X``, so float32 and float64 counts start from the
        same point (and in ``"lower-bound"`` mode fit alike up to float32 round-off); the
        Monte-Carlo draws are made in the dtype of ``X``, so in the other modes float32 and
        float64 fits agree in distribution only.
    device : str, default="auto"
        Torch device; ``"auto"`` picks CUDA, then MPS, then CPU. An unavailable device raises.
    verbose : bool, default=False
        Print the ELBO every 100 iterations.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        ``Wᵀ``.
    elbo_ : float
        ELBO (summed over entries) at the fitted parameters, evaluated with the chosen
        ``mode`` and, in the Monte-Carlo modes, ``max(E, 100)`` draws.
    elbo_history_ : ndarray of shape (n_iter_,)
        The ELBO estimate of every iteration (of every epoch with minibatches).
    n_iter_ : int
        Iterations (epochs) run.
    converged_ : bool
        Whether the stopping rule held before ``max_iter``; a ``ConvergenceWarning`` is issued
        when it did not (by ``transform`` and ``score`` too, for their fit of ``q(F)``).
    n_features_in_ : int
    n_components_ : int
        The fitted number of components (``transform`` uses it, even after ``set_params``).
    learning_rate_ : float
        The Adam learning rate or natural step ``ρ`` actually used.
    n_refused_steps_ : int
        Entries whose natural step was refused as non-finite, over the whole fit (those
        entries keep their previous values); when it is positive a
        :class:`~natgrad.models.RefusedStepWarning` says so, once per fit (and once per
        ``transform`` or ``score``, for their fit of ``q(F)``).
    n_restarts_ : int
        Extrapolated points rejected in full-batch ``"lower-bound"`` natural training (see
        :mod:`natgrad.models.pnmf_extrapolation`); 0 otherwise.
    variational_mean_, variational_variance_ : ndarray of shape (n_samples, n_components)
        ``μ`` and ``σ²`` of ``q(F)`` for the training samples.
    """

    def __init__(
        self,
        n_components: int = 10,
        *,
        training_mode: str = "standard",
        mode: str = "expanded",
        E: int = 10,
        max_iter: int = 1000,
        tol: float = 1e-4,
        learning_rate: float | None = None,
        loadings_update: str = "multiplicative",
        batch_size: int | None = None,
        random_state: int | np.random.RandomState | None = None,
        device: str = "auto",
        verbose: bool = False,
    ):
        self.n_components = n_components
        self.training_mode = training_mode
        self.mode = mode
        self.E = E
        self.max_iter = max_iter
        self.tol = tol
        self.learning_rate = learning_rate
        self.loadings_update = loadings_update
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        tags.input_tags.sparse = True
        tags.non_deterministic = False
        return tags

    @property
    def _n_features_out(self) -> int:
        return self.components_.shape[0]

    # -- validation ------------------------------------------------------------------------
    def _check_params(self) -> None:
        self._check_choices()
        self._check_numbers()

    def _check_choices(self) -> None:
        if self.training_mode not in TRAINING_MODES:
            raise ValueError(
                f"training_mode must be one of {TRAINING_MODES}, got {self.training_mode!r}"
            )
        if self.loadings_update not in LOADINGS_UPDATES:
            raise ValueError(
                f"loadings_update must be one of {LOADINGS_UPDATES}, got {self.loadings_update!r}"
            )
        if self.mode not in ELBO_MODES:
            raise ValueError(f"mode must be one of {ELBO_MODES}, got {self.mode!r}")

    def _check_numbers(self) -> None:
        if not is_integer(self.n_components):
            raise ValueError(f"n_components must be an integer >= 1, got {self.n_components!r}")
        if self.n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {self.n_components!r}")
        for name in ("E", "max_iter"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not is_real(self.tol) or not self.tol >= 0:
            raise ValueError(f"tol must be >= 0, got {self.tol!r}")
        if self.learning_rate is not None and not is_real(self.learning_rate):
            raise ValueError(
                f"learning_rate must be None or a number > 0, got {self.learning_rate!r}"
            )
        rate = self._learning_rate()
        if not np.isfinite(rate) or rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.training_mode == "natural" and rate > 1:
            raise ValueError(f"learning_rate (natural step) must be in (0, 1], got {rate!r}")
        batch_size = self.batch_size
        if batch_size is not None and (not is_integer(batch_size) or batch_size < 1):
            raise ValueError(f"batch_size must be None or an integer >= 1, got {self.batch_size!r}")

    def _learning_rate(self) -> float:
        if self.learning_rate is not None:
            return float(self.learning_rate)
        if self.training_mode == "natural":
            return DEFAULT_NATURAL_STEP.get(self.mode, 1.0)
        return DEFAULT_ADAM_LEARNING_RATE

    def _validate_counts(self, X, reset: bool):
        X = validate_data(
            self,
            X,
            accept_sparse=("csr", "csc", "coo"),
            dtype=(np.float64, np.float32),
            reset=reset,
        )
        if sp.issparse(X):  # sum duplicate entries before judging the counts they make up
            X = X.tocsr()
            if not X.has_canonical_format:
                X = X.copy()  # sum_duplicates works in place: leave the caller's matrix alone
                X.sum_duplicates()
        check_non_negative(X, f"{type(self).__name__} (counts)")
        stored = X.data if sp.issparse(X) else X
        fractional = stored != np.round(stored)
        if np.any(fractional):
            example = stored[fractional].flat[0]
            warnings.warn(
                f"PNMF expects counts; X contains non-integer values (e.g. {example!r}); "
                "the Poisson likelihood is evaluated at them as given",
                UserWarning,
                stacklevel=3,
            )
        return X

    def _torch_device(self) -> torch.device:
        if self.device != "auto":
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError) as error:
                raise ValueError(
                    f"device must be 'auto' or a torch device, got {self.device!r}"
                ) from error
            if not _is_available(device):
                raise ValueError(f"device {self.device!r} is not available on this machine")
            return device
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")

    def _counts(self, X) -> CountMatrix:
        dtype = torch.float32 if X.dtype == np.float32 else torch.float64
        if self._torch_device().type == "mps":
            dtype = torch.float32
        return count_matrix(X, dtype, self._torch_device())

    def _generator(self, rng: np.random.RandomState) -> torch.Generator:
        device = self._torch_device()
        generator = torch.Generator(device=device if device.type == "cuda" else "cpu")
        generator.manual_seed(int(rng.randint(0, 2**31 - 1)))
        return generator

    # -- fitting ---------------------------------------------------------------------------
    def _initial_posterior(
        self, counts: CountMatrix, n_components: int, generator: torch.Generator
    ) -> Gaussian:
        return initial_posterior(
            counts.n_samples, n_components, generator, counts.dtype, counts.device
        )

    def _initial_loadings(self, counts: CountMatrix, generator: torch.Generator) -> torch.Tensor:
        return initial_loadings(
            column_sums(counts) / counts.n_samples, self.n_components, generator
        )

    def _settings(
        self,
        generator: torch.Generator,
        update_loadings: bool,
        callback: Callable[[int, float, FitState], None] | None = None,
    ) -> FitSettings:
        def report(iteration: int, value: float, state: FitState) -> None:
            if self.verbose and iteration % 100 == 0:
                print(f"PNMF iteration {iteration}: ELBO = {value:.4f}")
            if callback is not None:
                callback(iteration, value, state)

        return FitSettings(
            mode=self.mode,
            n_draws=int(self.E),
            step_size=self._learning_rate(),
            max_iter=int(self.max_iter),
            tol=self.tol,
            batch_size=None if self.batch_size is None else int(self.batch_size),
            update_loadings=update_loadings,
            generator=generator,
            loadings_update=self.loadings_update,
            callback=report if self.verbose or callback is not None else None,
        )

    def _run(self, counts: CountMatrix, state: FitState, settings: FitSettings) -> FitState:
        fit = fit_natural if self.training_mode == "natural" else fit_standard
        state = fit(counts, state, settings)
        fitted = "W and q(F)" if settings.update_loadings else "q(F) with W fixed"
        warn_if_refused(state, f"PNMF fitting {fitted}")
        if not state.converged:
            warn_at_caller(
                f"PNMF fitting {fitted} stopped at max_iter={self.max_iter} before the ELBO "
                f"stopping rule (tol={self.tol:g}) held; increase max_iter",
                ConvergenceWarning,
            )
        return state

    def fit(
        self, X, y=None, *, callback: Callable[[int, float, FitState], None] | None = None
    ) -> PNMF:
        """Fit ``W`` and ``q(F)`` to counts ``X`` of shape (n_samples, n_features).

        Parameters
        ----------
        X : array-like or scipy.sparse matrix of shape (n_samples, n_features)
            Non-negative counts.
        y : ignored
        callback : callable, optional
            Called after every iteration as ``callback(iteration, elbo, state)`` with the
            current :class:`~natgrad.models.pnmf_training.FitState` (``state.loadings`` of shape
            ``(n_features, n_components)``, ``state.posterior`` the Gaussian ``q(F)``); for
            monitoring, e.g. by the benchmark. It must not modify the state.
        """
        self._check_params()
        X = self._validate_counts(X, reset=True)
        rng = check_random_state(self.random_state)
        generator = self._generator(rng)
        counts = self._counts(X)
        state = FitState(
            loadings=self._initial_loadings(counts, generator),
            posterior=self._initial_posterior(counts, self.n_components, generator),
        )
        settings = self._settings(generator, update_loadings=True, callback=callback)
        state = self._run(counts, state, settings)
        self.components_ = state.loadings.T.cpu().numpy()
        self.variational_mean_ = state.posterior.loc.cpu().numpy()
        self.variational_variance_ = state.posterior.variance.cpu().numpy()
        self.n_components_ = self.n_components
        self.learning_rate_ = self._learning_rate()
        self.elbo_history_ = np.asarray(state.history)
        self.n_iter_ = state.n_iter
        self.converged_ = state.converged
        self.n_refused_steps_ = state.n_refused
        self.n_restarts_ = state.n_restarts
        self.elbo_ = float(self._evaluate_elbo(counts, state.posterior, generator))
        return self

    def _fit_posterior(self, X) -> tuple[CountMatrix, Gaussian, torch.Generator]:
        check_is_fitted(self)
        self._check_params()
        X = self._validate_counts(X, reset=False)
        rng = check_random_state(self.random_state)
        generator = self._generator(rng)
        counts = self._counts(X)
        loadings = torch.as_tensor(self.components_.T, dtype=counts.dtype, device=counts.device)
        posterior = self._initial_posterior(counts, self.n_components_, generator)
        state = FitState(loadings=loadings, posterior=posterior)
        state = self._run(counts, state, self._settings(generator, update_loadings=False))
        return counts, state.posterior, generator

    def _evaluate_elbo(
        self, counts: CountMatrix, posterior: Gaussian, generator: torch.Generator
    ) -> float:
        loadings = torch.as_tensor(self.components_.T, dtype=counts.dtype, device=counts.device)
        draws = max(self.E, EVALUATION_DRAWS)
        stored_per_row = (
            len(counts.values) / max(counts.n_samples, 1) if counts.is_sparse else counts.n_features
        )
        drawn = 1 if self.mode == "lower-bound" else draws  # the lower bound draws nothing
        entries_per_row = max(1, int(stored_per_row * drawn * self.n_components))
        chunk = max(1, EVALUATION_CHUNK_ENTRIES // entries_per_row)
        total = 0.0
        with torch.no_grad():
            for start in range(0, counts.n_samples, chunk):
                whole = chunk >= counts.n_samples
                index = torch.arange(
                    start, min(start + chunk, counts.n_samples), device=counts.device
                )
                value = elbo(
                    counts if whole else counts.take_rows(index),
                    loadings,
                    posterior.loc if whole else posterior.loc[index],
                    posterior.variance if whole else posterior.variance[index],
                    self.mode,
                    draws,
                    generator,
                )
                total += float(value)
        return total

    def transform(self, X) -> np.ndarray:
        """Fit ``q(F)`` for the samples of ``X`` with ``W`` fixed; return ``E_q[exp F]``.

        Returns
        -------
        ndarray of shape (n_samples, n_components)
        """
        _, posterior, _ = self._fit_posterior(X)
        return expected_exp_factors(posterior.loc, posterior.variance).cpu().numpy()

    def fit_transform(self, X, y=None) -> np.ndarray:
        """Fit to ``X``; return ``E_q[exp F]`` of its samples, shape (n_samples, n_components)."""
        self.fit(X)
        mean = torch.as_tensor(self.variational_mean_, device="cpu")
        variance = torch.as_tensor(self.variational_variance_, device="cpu")
        return expected_exp_factors(mean, variance).numpy()

    def inverse_transform(self, X) -> np.ndarray:
        """Expected counts ``X @ components_`` for activations ``X = E_q[exp F]``.

        Parameters
        ----------
        X : array-like or scipy.sparse matrix of shape (n_samples, n_components_)
            Non-negative, finite activations.

        Returns
        -------
        ndarray of shape (n_samples, n_features)
        """
        check_is_fitted(self)
        activations = check_array(
            X, accept_sparse=("csr", "csc"), dtype=self.components_.dtype, input_name="X"
        )
        check_non_negative(activations, f"{type(self).__name__}.inverse_transform (activations)")
        if activations.shape[1] != self.n_components_:
            raise ValueError(
                f"X must have shape (n_samples, {self.n_components_}), got {activations.shape}"
            )
        return np.asarray(activations @ self.components_)

    def score(self, X, y=None) -> float:
        """Mean ELBO per sample of ``X`` (``q(F)`` fitted with ``W`` fixed; held-out data too)."""
        counts, posterior, generator = self._fit_posterior(X)
        return self._evaluate_elbo(counts, posterior, generator) / counts.n_samples


def _is_available(device: torch.device) -> bool:
    """Whether torch can allocate on ``device`` here (CUDA and MPS need their backends)."""
    if device.type == "cuda":
        index = 0 if device.index is None else device.index
        return torch.cuda.is_available() and index < torch.cuda.device_count()
    if device.type == "mps":
        return torch.backends.mps.is_available()
    return True
