"""Per-layer state of the K-FAC/EKFAC preconditioners: running factors and their eigenbases.

The maths is the curvature layer's (:mod:`natgrad.curvature.kfac_capture` for features and
factors, :mod:`natgrad.linalg.kron` for eigenbasis solves, :mod:`natgrad.curvature.ekfac` for
the projected second moment); this module only keeps statistics between steps.

Factors are stored in ``factor_dtype`` (float32 for half/bfloat16 or float32 parameters, float64
for float64 parameters), so ``torch.autocast`` never lowers their precision.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from natgrad.curvature.ekfac import projected_second_moment
from natgrad.curvature.kfac_capture import KroneckerLayer, input_features, output_features
from natgrad.linalg.kron import (
    SymmetricEigen,
    eigenbasis_mv,
    eigenbasis_project,
    eigenbasis_solve,
    factored_damping,
    symmetric_eigh,
)

__all__ = ["EmbeddingState", "KroneckerLayerState", "LayerState", "factor_dtype_for"]


def factor_dtype_for(param: Tensor) -> torch.dtype:
    """float64 for float64 parameters, float32 otherwise."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _ema(old: Tensor | None, new: Tensor, decay: float) -> Tensor:
    return new if old is None else decay * old + (1.0 - decay) * new


def _damped_reciprocal(eigenvalues: Tensor, damping: float) -> Tensor:
    """``1 / (S + λ)`` elementwise (pseudo-inverse at ``λ = 0``), as
    :func:`~natgrad.linalg.kron.eigenbasis_solve` of the all-ones matrix in the identity basis."""
    identity_out = SymmetricEigen(eigenvalues[:, 0], None)
    identity_in = SymmetricEigen(eigenvalues[0], None)
    ones = torch.ones_like(eigenvalues)
    return eigenbasis_solve(identity_out, identity_in, eigenvalues, ones, damping)


def _factor_inverse(eigen: SymmetricEigen, damping: float) -> Tensor:
    """``(M + λI)⁻¹`` from ``M``'s eigendecomposition: a ``(d, d)`` matrix, or the diagonal
    ``(d,)`` for a diagonal factor."""
    reciprocal = (eigen.values + damping).reciprocal()
    if eigen.vectors is None:
        return reciprocal
    return (eigen.vectors * reciprocal) @ eigen.vectors.mT


class _DampedInverse:
    """What one layer's damped solve reuses between eigendecompositions: the eigenbasis
    reciprocal ``1/(S + λ)`` (exact damping) or the factors' inverses (factored damping)."""

    def __init__(
        self,
        reciprocal: Tensor | None = None,
        output_inverse: Tensor | None = None,
        input_inverse: Tensor | None = None,
    ) -> None:
        self.reciprocal = reciprocal
        self.output_inverse = output_inverse
        self.input_inverse = input_inverse

    def apply_factored(self, matrix: Tensor) -> Tensor:
        """``(G + λ_G I)⁻¹ V (A + λ_A I)⁻¹``."""
        left = self.output_inverse @ matrix
        if self.input_inverse.ndim == 1:
            return left * self.input_inverse
        return left @ self.input_inverse


class LayerState:
    """Running Kronecker factors of one layer; subclasses say how features are formed.

    The factors follow :mod:`natgrad.curvature.kfac_capture`: ``A`` is the mean of ``a aᵀ`` over
    samples and locations, ``G`` the mean over samples of ``Σ_t g gᵀ``, both accumulated as
    sums and counts until :meth:`update_factors` turns them into an exponential moving average.
    """

    name: str
    module: nn.Module

    def __init__(self, name: str, module: nn.Module, keep_pairs: bool) -> None:
        self.name = name
        self.module = module
        self.dtype = factor_dtype_for(module.weight)
        self.keep_pairs = keep_pairs
        self.pairs: list[tuple[Tensor, Tensor]] = []
        self.input_factor: Tensor | None = None
        self.output_factor: Tensor | None = None
        self._output_eigen: SymmetricEigen | None = None
        self._input_eigen: SymmetricEigen | None = None
        self._eigenvalues: Tensor | None = None
        self._inverse: tuple[tuple[float, bool], _DampedInverse] | None = None
        self._reset_sums()

    # -- eigen attributes: setting one drops the cached damped inverse ----------------------
    @property
    def output_eigen(self) -> SymmetricEigen | None:
        """Eigendecomposition of ``G``."""
        return self._output_eigen

    @output_eigen.setter
    def output_eigen(self, value: SymmetricEigen | None) -> None:
        self._output_eigen, self._inverse = value, None

    @property
    def input_eigen(self) -> SymmetricEigen | None:
        """Eigendecomposition of ``A`` (diagonal for embeddings)."""
        return self._input_eigen

    @input_eigen.setter
    def input_eigen(self, value: SymmetricEigen | None) -> None:
        self._input_eigen, self._inverse = value, None

    @property
    def eigenvalues(self) -> Tensor | None:
        """EKFAC's re-estimated eigenvalue matrix ``(d_out, d_in)``; ``None`` for K-FAC's."""
        return self._eigenvalues

    @eigenvalues.setter
    def eigenvalues(self, value: Tensor | None) -> None:
        self._eigenvalues, self._inverse = value, None

    # -- statistics --------------------------------------------------------------------------
    def _reset_sums(self) -> None:
        zero = torch.zeros((), dtype=self.dtype, device=self.module.weight.device)
        self.input_sum: Tensor = torch.zeros_like(self._input_template())
        self.output_sum: Tensor = torch.zeros_like(self._output_template())
        self.input_count: Tensor = zero.clone()
        self.output_count: Tensor = zero.clone()

    def pending(self) -> list[Tensor]:
        """Accumulated sums and counts, the tensors a distributed run all-reduces."""
        return [self.input_sum, self.input_count, self.output_sum, self.output_count]

    def has_pending(self) -> bool:
        return bool(self.input_count > 0) and bool(self.output_count > 0)

    def record_output_grad(self, grad: Tensor, scale: float, features: Tensor) -> None:
        """Add ``Σ_n Σ_t g gᵀ`` for output gradients ``scale · grad`` (per-sample gradients)."""
        grads = output_features(self._feature_layer(), grad.detach()).to(self.dtype) * scale
        flat = grads.reshape(-1, grads.shape[-1])
        self.output_sum += flat.mT @ flat
        self.output_count += grads.shape[0]
        if self.keep_pairs:
            self.pairs.append((features, grads))

    def update_factors(self, decay: float) -> None:
        """Fold the (already all-reduced) sums into the moving averages and reset them."""
        self.input_factor = _ema(self.input_factor, self._input_mean(), decay)
        self.output_factor = _ema(self.output_factor, self.output_sum / self.output_count, decay)
        self._reset_sums()

    # -- eigenbases and solves -----------------------------------------------------------------
    def eigen_tensors(self) -> list[Tensor]:
        """Eigen-decomposition tensors, in a fixed order (for broadcasting)."""
        tensors = [self.output_eigen.values, self.output_eigen.vectors, self.input_eigen.values]
        if self.input_eigen.vectors is not None:
            tensors.append(self.input_eigen.vectors)
        return tensors

    def allocate_eigens(self) -> None:
        """Empty eigendecompositions of the right shapes, to be filled by a broadcast."""
        self.output_eigen = SymmetricEigen(
            torch.empty_like(self.output_factor[0]), torch.empty_like(self.output_factor)
        )
        self.input_eigen = self._empty_input_eigen()

    def eigen_cost(self) -> float:
        """Cost of :meth:`update_eigens` in flops, up to a constant."""
        return float(self.output_factor.shape[0] ** 3 + self._input_eigen_cost())

    def kfac_eigenvalues(self) -> Tensor:
        """``outer(g, a)``: the K-FAC block's eigenvalues, shape ``(d_out, d_in)``."""
        return torch.outer(self.output_eigen.values, self.input_eigen.values)

    def solve(self, matrix: Tensor, damping: float, factored: bool) -> Tensor:
        """``(block + λI)⁻¹ vec(matrix)`` (exact eigenbasis damping) or the factored π form.

        The damped inverse (``1/(S + λ)`` in the eigenbasis, or the two factored inverses) is
        built once per eigendecomposition and damping and reused until either changes.
        """
        key = (float(damping), factored)
        if self._inverse is None or self._inverse[0] != key:
            self._inverse = (key, self._damped_inverse(damping, factored))
        inverse = self._inverse[1]
        if factored:
            return inverse.apply_factored(matrix)
        return eigenbasis_mv(self.output_eigen, self.input_eigen, inverse.reciprocal, matrix)

    def _damped_inverse(self, damping: float, factored: bool) -> _DampedInverse:
        if not factored:
            eigenvalues = self.kfac_eigenvalues() if self.eigenvalues is None else self.eigenvalues
            return _DampedInverse(reciprocal=_damped_reciprocal(eigenvalues, damping))
        if not damping > 0:
            raise ValueError(f"factored damping needs damping > 0, got {damping!r}")
        output_damping, input_damping = factored_damping(
            self.output_eigen, self.input_eigen, damping
        )
        return _DampedInverse(
            output_inverse=_factor_inverse(self.output_eigen, output_damping),
            input_inverse=_factor_inverse(self.input_eigen, input_damping),
        )

    def curvature_quadratic(self, matrix: Tensor) -> Tensor:
        """``vec(V)ᵀ C vec(V)`` for the block ``C`` that :meth:`solve` inverts (undamped)."""
        coordinates = eigenbasis_project(self.output_eigen, self.input_eigen, matrix)
        eigenvalues = self.kfac_eigenvalues() if self.eigenvalues is None else self.eigenvalues
        return (coordinates.square() * eigenvalues).sum()

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor | None]:
        state: dict[str, Tensor | None] = {
            "input_factor": self.input_factor,
            "output_factor": self.output_factor,
            "eigenvalues": self.eigenvalues,
            "input_sum": self.input_sum,
            "input_count": self.input_count,
            "output_sum": self.output_sum,
            "output_count": self.output_count,
        }
        for side, eigen in (("output", self.output_eigen), ("input", self.input_eigen)):
            state[f"{side}_eigenvalues"] = None if eigen is None else eigen.values
            state[f"{side}_eigenvectors"] = None if eigen is None else eigen.vectors
        return {key: None if value is None else value.clone() for key, value in state.items()}

    def load_state_dict(self, state: dict[str, Tensor | None]) -> None:
        def get(key: str) -> Tensor | None:
            value = state[key]
            return None if value is None else value.to(self.dtype).clone()

        self.input_factor, self.output_factor = get("input_factor"), get("output_factor")
        self.eigenvalues = get("eigenvalues")
        self.input_sum, self.output_sum = get("input_sum"), get("output_sum")
        self.input_count, self.output_count = get("input_count"), get("output_count")
        eigens = []
        for side in ("output", "input"):
            values = get(f"{side}_eigenvalues")
            eigens.append(
                None if values is None else SymmetricEigen(values, get(f"{side}_eigenvectors"))
            )
        self.output_eigen, self.input_eigen = eigens
        self.pairs.clear()

    # -- for subclasses ------------------------------------------------------------------------
    def record_input(self, layer_input: Tensor) -> Tensor:
        raise NotImplementedError

    def update_eigens(self) -> None:
        raise NotImplementedError

    def grad_matrix(self) -> Tensor | None:
        raise NotImplementedError

    def write_grad(self, matrix: Tensor) -> None:
        raise NotImplementedError

    def param_matrix(self) -> Tensor:
        """The parameters in the layout of :meth:`grad_matrix` (may share their memory)."""
        raise NotImplementedError

    def projected_moment(self) -> tuple[Tensor, Tensor] | None:
        """Sum over samples of squared eigenbasis coordinates of per-sample gradients, and the
        sample count, from the kept (features, gradients) pairs; ``None`` if not supported."""
        raise NotImplementedError

    def _feature_layer(self) -> KroneckerLayer:
        raise NotImplementedError

    def _input_template(self) -> Tensor:
        raise NotImplementedError

    def _output_template(self) -> Tensor:
        raise NotImplementedError

    def _input_mean(self) -> Tensor:
        raise NotImplementedError

    def _empty_input_eigen(self) -> SymmetricEigen:
        raise NotImplementedError

    def _input_eigen_cost(self) -> float:
        raise NotImplementedError


class KroneckerLayerState(LayerState):
    """``nn.Linear`` / ``nn.Conv2d`` (groups=1): ``G ⊗ A`` with the bias folded into ``A``."""

    def __init__(self, name: str, module: nn.Module, keep_pairs: bool) -> None:
        bias = module.bias
        bias_index = 1 if bias is not None and bias.requires_grad else None
        self.layer = KroneckerLayer(name, module, 0, bias_index)
        super().__init__(name, module, keep_pairs)

    def _feature_layer(self) -> KroneckerLayer:
        return self.layer

    def _input_template(self) -> Tensor:
        size = self.layer.input_dim
        return torch.empty(size, size, dtype=self.dtype, device=self.module.weight.device)

    def _output_template(self) -> Tensor:
        size = self.layer.output_dim
        return torch.empty(size, size, dtype=self.dtype, device=self.module.weight.device)

    def record_input(self, layer_input: Tensor) -> Tensor:
        """Add ``Σ_n Σ_t a aᵀ``; returns the features ``(N, T, d_in [+ 1])``."""
        features = input_features(self.layer, layer_input.detach()).to(self.dtype)
        flat = features.reshape(-1, features.shape[-1])
        self.input_sum += flat.mT @ flat
        self.input_count += flat.shape[0]
        return features

    def _input_mean(self) -> Tensor:
        return self.input_sum / self.input_count

    def update_eigens(self) -> None:
        self.output_eigen = symmetric_eigh(self.output_factor)
        self.input_eigen = symmetric_eigh(self.input_factor)

    def _empty_input_eigen(self) -> SymmetricEigen:
        return SymmetricEigen(
            torch.empty_like(self.input_factor[0]), torch.empty_like(self.input_factor)
        )

    def _input_eigen_cost(self) -> float:
        return float(self.input_factor.shape[0] ** 3)

    def _params(self) -> list[Tensor]:
        params = [self.module.weight]
        if self.layer.bias_index is not None:
            params.append(self.module.bias)
        return params

    def grad_matrix(self) -> Tensor | None:
        weight_grad = self.module.weight.grad
        bias_grad = None if self.layer.bias_index is None else self.module.bias.grad
        if weight_grad is None or (bias_grad is None and self.layer.bias_index is not None):
            return None
        matrix = weight_grad.reshape(weight_grad.shape[0], -1)
        if bias_grad is not None:
            matrix = torch.cat([matrix, bias_grad.unsqueeze(1)], dim=1)
        return matrix.to(self.dtype)

    def param_matrix(self) -> Tensor:
        return self.layer.to_matrix([param.detach() for param in self._params()]).to(self.dtype)

    def write_grad(self, matrix: Tensor) -> None:
        weight_grad = self.module.weight.grad
        if self.layer.bias_index is None:
            weight_grad.copy_(matrix.reshape(weight_grad.shape))
            return
        weight_grad.copy_(matrix[:, :-1].reshape(weight_grad.shape))
        self.module.bias.grad.copy_(matrix[:, -1])

    def projected_moment(self) -> tuple[Tensor, Tensor] | None:
        total = torch.zeros_like(self.kfac_eigenvalues())
        count = torch.zeros((), dtype=self.dtype, device=total.device)
        for features, grads in self.pairs:
            total += projected_second_moment(features, grads, self.output_eigen, self.input_eigen)
            count += features.shape[0]
        self.pairs.clear()
        return total, count


class EmbeddingState(LayerState):
    """``nn.Embedding``: the weight gradient transposed, ``(d_embedding, vocabulary)``, has
    block ``G ⊗ diag(a)`` with ``a`` the token frequencies (mean over samples and positions) and
    ``G`` the output-gradient factor. EKFAC re-estimation is not applied to embeddings (they
    keep the K-FAC eigenvalues ``outer(g, a)``).
    """

    def __init__(self, name: str, module: nn.Embedding, keep_pairs: bool) -> None:
        if module.sparse:
            raise ValueError(f"layer {name!r}: sparse embedding gradients are not supported")
        self.layer = KroneckerLayer(name, module, 0, None)
        super().__init__(name, module, keep_pairs=False)

    def _feature_layer(self) -> KroneckerLayer:
        return self.layer

    def _input_template(self) -> Tensor:
        vocabulary = self.module.weight.shape[0]
        return torch.empty(vocabulary, dtype=self.dtype, device=self.module.weight.device)

    def _output_template(self) -> Tensor:
        size = self.module.weight.shape[1]
        return torch.empty(size, size, dtype=self.dtype, device=self.module.weight.device)

    def record_input(self, layer_input: Tensor) -> Tensor:
        """Add the token counts; returns the indices."""
        tokens = layer_input.detach().reshape(-1)
        self.input_sum += torch.bincount(tokens, minlength=self.input_sum.shape[0]).to(self.dtype)
        self.input_count += tokens.numel()
        return tokens

    def _input_mean(self) -> Tensor:
        return self.input_sum / self.input_count

    def update_eigens(self) -> None:
        self.output_eigen = symmetric_eigh(self.output_factor)
        self.input_eigen = SymmetricEigen(self.input_factor.clamp_min(0), None)

    def _empty_input_eigen(self) -> SymmetricEigen:
        return SymmetricEigen(torch.empty_like(self.input_factor), None)

    def _input_eigen_cost(self) -> float:
        return float(self.input_factor.shape[0])

    def grad_matrix(self) -> Tensor | None:
        grad = self.module.weight.grad
        if grad is None:
            return None
        if grad.is_sparse:
            raise ValueError(f"layer {self.name!r}: sparse embedding gradients are not supported")
        return grad.mT.to(self.dtype)

    def param_matrix(self) -> Tensor:
        return self.module.weight.detach().mT.to(self.dtype)

    def write_grad(self, matrix: Tensor) -> None:
        self.module.weight.grad.copy_(matrix.mT)

    def projected_moment(self) -> tuple[Tensor, Tensor] | None:
        return None
