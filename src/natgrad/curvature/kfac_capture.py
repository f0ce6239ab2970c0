"""Per-layer statistics for Kronecker-factored curvature (K-FAC, EKFAC).

Which layers carry Kronecker factors, how their inputs and output gradients become feature
matrices, and the factors built from them. Shared by the curvature operators
(:mod:`natgrad.curvature.kfac`, :mod:`natgrad.curvature.ekfac`) and the preconditioners in
:mod:`natgrad.optim`.

Conventions
-----------
A layer's weight is viewed as a matrix ``W`` of shape ``(d_out, d_in)``: ``nn.Linear`` as is,
``nn.Conv2d`` as ``weight.reshape(d_out, C_in · k_h · k_w)`` (``nn.Conv1d``: ``C_in · k``). A
trainable bias is folded in as an extra input column (input feature constant 1), giving
``d_in + 1`` columns; in flat parameter vectors the weight still comes first and the bias after
it, as in ``model.parameters()``.

A transposed convolution (``nn.ConvTranspose2d``, ``nn.ConvTranspose1d``; weight
``(C_in, C_out / g, k_h, k_w)``) is the convolution of its *expanded* input, the input with
``s − 1`` zeros inserted between neighbours (stride ``s``) and padded by ``d (k − 1) − p`` on
each side (dilation ``d``, padding ``p``; negative: cropped) plus ``output_padding`` at the end,
with stride 1, dilation ``d`` and the kernel transposed within each group and flipped
(:func:`weight_as_matrix`): its features are that convolution's, and its matrix is
``(C_out, C_in / g · k_h · k_w)``, entry ``(j C_out/g + o, (i, a, b))`` holding
``weight[j C_in/g + i, o, k_h − 1 − a, k_w − 1 − b]``.

Features carry a "location" axis ``T``: the spatial positions of a convolution (unfolded
patches, Grosse & Martens 2016) or the extra dimensions of a ``Linear`` input of shape
``(N, ..., d_in)``; ``T = 1`` for an ordinary ``(N, d_in)`` input. The per-sample weight gradient
is ``Σ_t g_t a_tᵀ``. The factors are

    A = 1/(N T) Σ_n Σ_t a_nt a_ntᵀ        (mean over samples and locations)
    G = 1/N     Σ_n Σ_t g_nt g_ntᵀ        (mean over samples, sum over locations)

so that ``G ⊗ A`` is the KFC approximation ``E[Σ_t g gᵀ] ⊗ E[Σ_t a aᵀ] / T`` and is exact for a
single sample with ``T = 1``. This is K-FAC-*expand* in the terms of Eschenhagen et al. (2023,
"Kronecker-Factored Approximate Curvature for Modern Neural Network Architectures").
K-FAC-*reduce* (``kfac_approx="reduce"``) first reduces each sample over its locations,

    ā_n = 1/T Σ_t a_nt,   ĝ_n = Σ_t g_nt,   A = 1/N Σ_n ā_n ā_nᵀ,   G = 1/N Σ_n ĝ_n ĝ_nᵀ

(:func:`reduced_input_features`, :func:`reduced_output_features`), which is exact for a single
sample whose inputs are the same at every location (then ``Σ_t g_t a_tᵀ = ĝ āᵀ``) and costs
``T`` times fewer flops to build; both coincide when ``T = 1``.

A layer called several times in one forward pass (weight sharing across calls: a siamese
branch, an unrolled cell) applies its weight at the locations of all its calls, which are
pooled as one call's: ``A`` averages the rows of every call, ``G`` sums every call's terms
(the per-sample gradient sums over the calls). With reduce, each call is reduced over its own
locations and the calls are pooled as in expand.

An ``nn.Embedding`` (weight ``(V, d)``) is the linear layer ``W = weightᵀ`` of shape ``(d, V)``
applied to the one-hot vectors ``a = e_x`` of its tokens ``x``, at the ``T`` token positions of a
sample (its input ``(N, ...)`` of integer tokens). Its input factor is diagonal,

    A = diag(a),   a_v = 1/(N T) #{(n, t): x_nt = v}      (the token frequencies)

kept as the vector ``a`` of shape ``(V,)`` (:func:`token_frequencies`), never as a ``(V, V)``
matrix; ``G`` is the mean over samples of ``Σ_t g gᵀ`` as for any layer. The row of
``padding_idx`` gets no gradient (``nn.Embedding`` zeroes it), so its frequency is 0: its
positions still count in ``N T``, as they would as zero input rows of the one-hot layer.
Embeddings always expand: with ``"reduce"``, ``ā_n`` (the token histogram of sample ``n`` over
``T``) would give a dense ``A``, so both factors stay K-FAC-expand's, as in
:class:`natgrad.optim.KFAC`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as functional
from torch import Tensor, nn

from natgrad.curvature.evaluation_scope import curvature_evaluation
from natgrad.curvature.likelihoods import Likelihood, as_matrix

__all__ = [
    "CONV_TRANSPOSE_TYPES",
    "CONV_TYPES",
    "KFAC_APPROXIMATIONS",
    "KFAC_LAYER_TYPES",
    "KRONECKER_LAYER_TYPES",
    "ForwardCapture",
    "KroneckerLayer",
    "add_column_gram",
    "backward_vectors",
    "check_backward_vectors",
    "check_fisher_kind",
    "check_layer_input",
    "check_layer_output",
    "check_tokens",
    "conv_as_2d",
    "conv_patch_means",
    "conv_patches",
    "grouped_output_features",
    "input_factor",
    "input_features",
    "join_calls",
    "kronecker_layers",
    "matrix_as_weight",
    "output_factor",
    "output_features",
    "padded_conv_input",
    "patch_features",
    "per_sample_gradients",
    "reduced_input_features",
    "reduced_output_features",
    "shared_weights",
    "tied_parameters",
    "token_counts",
    "token_frequencies",
    "tokens_as_features",
    "trainable_parameters",
    "transposed_output_grad",
    "transposed_output_size",
    "transposed_patch_gram",
    "transposed_per_sample_gradients",
    "weight_as_matrix",
]

CONV_TRANSPOSE_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d)
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, *CONV_TRANSPOSE_TYPES)
_ONE_D_TYPES = (nn.Conv1d, nn.ConvTranspose1d)
KRONECKER_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, *CONV_TYPES)
KFAC_LAYER_TYPES: tuple[type[nn.Module], ...] = (*KRONECKER_LAYER_TYPES, nn.Embedding)
"""The layers with a block in the K-FAC and EKFAC operators: also ``nn.Embedding``, whose input
factor is diagonal (module docstring)."""
FISHER_KINDS = ("exact", "mc", "empirical")
KFAC_APPROXIMATIONS = ("expand", "reduce")


@dataclass(frozen=True, eq=False)
class KroneckerLayer:
    """A layer with a Kronecker-factored block and where its parameters sit.

    Attributes
    ----------
    name : str
        Qualified module name in the model.
    module : nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d or nn.Embedding
    weight_index : int
        Index of the weight among the trainable parameters (``model.parameters()`` order).
    bias_index : int or None
        Index of the bias, or ``None`` if the layer has no trainable bias.
    """

    name: str
    module: nn.Module
    weight_index: int
    bias_index: int | None

    @property
    def has_bias(self) -> bool:
        """Whether a bias column is folded into the input factor."""
        return self.bias_index is not None

    @property
    def is_embedding(self) -> bool:
        """Whether the layer is an ``nn.Embedding`` (matrix ``weightᵀ``, diagonal ``A``)."""
        return isinstance(self.module, nn.Embedding)

    def parameters(self) -> list[Tensor]:
        """The layer's weight, and its bias where one is folded into the input factor."""
        module = self.module
        return [module.weight, module.bias] if self.has_bias else [module.weight]

    @property
    def output_dim(self) -> int:
        """``d_out``: rows of the weight matrix (a transposed convolution's ``C_out``, an
        embedding's ``d``)."""
        module = self.module
        if isinstance(module, CONV_TRANSPOSE_TYPES):
            return module.out_channels
        if isinstance(module, nn.Embedding):
            return module.embedding_dim
        return module.weight.shape[0]

    @property
    def input_dim(self) -> int:
        """Columns of the weight matrix, plus one with a bias (of one group's, for a grouped
        convolution: ``C_in / g · k_h · k_w [+ 1]``)."""
        return self.module.weight.numel() // self.output_dim + int(self.has_bias)

    @property
    def groups(self) -> int:
        """``g``: the groups of a grouped convolution, each with its own Kronecker block
        (1 for every other layer)."""
        return getattr(self.module, "groups", 1)

    def to_matrix(self, tensors: Sequence[Tensor]) -> Tensor:
        """Gather this layer's weight (and bias) from per-parameter ``tensors`` as a
        ``(d_out, d_in [+ 1])`` matrix; for a grouped convolution one matrix per group,
        ``(g, d_out / g, d_in [+ 1])`` (group ``j`` holds weight rows ``j · d_out / g …``)."""
        weight = weight_as_matrix(self.module, tensors[self.weight_index])
        if self.bias_index is not None:
            weight = torch.cat([weight, tensors[self.bias_index].reshape(-1, 1)], dim=1)
        if self.groups == 1:
            return weight
        return weight.reshape(self.groups, self.output_dim // self.groups, -1)

    def from_matrix(self, matrix: Tensor) -> dict[int, Tensor]:
        """Split a matrix of :meth:`to_matrix`'s layout into ``{parameter index: tensor}``."""
        matrix = matrix.reshape(self.output_dim, -1)
        if self.bias_index is None:
            return {self.weight_index: matrix_as_weight(self.module, matrix)}
        return {
            self.weight_index: matrix_as_weight(self.module, matrix[:, :-1]),
            self.bias_index: matrix[:, -1].reshape(-1),
        }

    def flat_indices(self, offsets: Sequence[int]) -> Tensor:
        """Positions of the row-major matrix entries in the flat parameter vector.

        ``offsets[i]`` is where trainable parameter ``i`` starts in the flat vector.
        """
        rows = torch.arange(self.output_dim).unsqueeze(1)
        weight = self.module.weight
        entries = torch.arange(weight.numel()).reshape(weight.shape)
        positions = offsets[self.weight_index] + weight_as_matrix(self.module, entries)
        if self.bias_index is not None:
            positions = torch.cat([positions, offsets[self.bias_index] + rows], dim=1)
        return positions.reshape(-1)


def weight_as_matrix(module: nn.Module, weight: Tensor) -> Tensor:
    """``weight`` (of ``module``'s weight shape) as the layer's ``(d_out, d_in)`` matrix: a
    reshape, for an embedding (``(V, d)``) its transpose ``(d, V)`` (a view), or for a
    transposed convolution (``(C_in, C_out / g, *kernel)``) a copy, ``(C_out, C_in / g · Π
    kernel)``, the kernel transposed within each group and flipped (module docstring).
    Gradients and index tensors map the same way."""
    if isinstance(module, nn.Embedding):
        return weight.mT
    if not isinstance(module, CONV_TRANSPOSE_TYPES):
        return weight.reshape(weight.shape[0], -1)
    grouped = weight.unflatten(0, (module.groups, -1))  # (g, C_in / g, C_out / g, *kernel)
    flipped = grouped.flip(tuple(range(3, grouped.ndim)))
    return flipped.transpose(1, 2).reshape(module.out_channels, -1)


def matrix_as_weight(module: nn.Module, matrix: Tensor) -> Tensor:
    """The inverse of :func:`weight_as_matrix`: a ``(d_out, d_in)`` matrix in the shape of
    ``module``'s weight."""
    shape = module.weight.shape
    if isinstance(module, nn.Embedding):
        return matrix.mT.reshape(shape)
    if not isinstance(module, CONV_TRANSPOSE_TYPES):
        return matrix.reshape(shape)
    grouped = matrix.reshape(module.groups, shape[1], shape[0] // module.groups, *shape[2:])
    flipped = grouped.flip(tuple(range(3, grouped.ndim)))
    return flipped.transpose(1, 2).reshape(shape)


def trainable_parameters(model: nn.Module) -> list[Tensor]:
    """Parameters with ``requires_grad``, in ``model.parameters()`` order."""
    return [param for param in model.parameters() if param.requires_grad]


def kronecker_layers(
    model: nn.Module,
    layer_types: tuple[type[nn.Module], ...] = KRONECKER_LAYER_TYPES,
    *,
    strict: bool = True,
) -> list[KroneckerLayer]:
    """The layers of ``model`` that get Kronecker factors, in module order.

    Parameters
    ----------
    model : nn.Module
    layer_types : tuple of module types, default :data:`KRONECKER_LAYER_TYPES`
        ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.ConvTranspose1d``,
        ``nn.ConvTranspose2d``
    strict : bool, default True
        Require every trainable parameter to belong to exactly one such layer: none outside
        them, none shared by two layers or tied to another module (:func:`tied_parameters`).

    Raises
    ------
    ValueError
        With ``strict``, naming a trainable parameter outside the supported layers (and the
        type of its module: an ``nn.EmbeddingBag``, ...), or the layers or modules that share
        a parameter; for a layer whose bias is trainable but weight frozen.
    """
    params = trainable_parameters(model)
    position = {id(param): index for index, param in enumerate(params)}
    layers: list[KroneckerLayer] = []
    for name, module in model.named_modules():
        if not isinstance(module, layer_types) or not isinstance(module.weight, nn.Parameter):
            continue  # a computed weight (parametrized, pruned): its parameters are elsewhere
        weight = module.weight
        bias = getattr(module, "bias", None)
        bias_trainable = bias is not None and bias.requires_grad
        if not weight.requires_grad:
            if bias_trainable:
                raise ValueError(f"layer {name!r}: trainable bias with a frozen weight")
            continue
        bias_index = position[id(bias)] if bias_trainable else None
        layers.append(KroneckerLayer(name, module, position[id(weight)], bias_index))
    if strict:
        _check_unshared(layers)
        _check_covered(model, layers, layer_types)
        _check_untied(model, layers)
    return layers


def _check_covered(
    model: nn.Module, layers: Sequence[KroneckerLayer], layer_types: tuple[type[nn.Module], ...]
) -> None:
    """Every trainable parameter belongs to one of ``layers``; else a ``ValueError`` naming
    the others and the types of their modules."""
    params = trainable_parameters(model)
    covered = {layer.weight_index for layer in layers}
    covered |= {layer.bias_index for layer in layers if layer.bias_index is not None}
    missing = {id(param) for index, param in enumerate(params) if index not in covered}
    if not missing:
        return
    names, owners = [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(prefix=module_name, recurse=False):
            if id(param) in missing and name not in names:
                names.append(name)
                owners.add(type(module).__name__)
    supported = ", ".join(cls.__name__ for cls in layer_types)
    raise ValueError(
        f"Kronecker-factored curvature covers only {supported} layers; trainable "
        f"parameter(s) {names} belong to other modules ({', '.join(sorted(owners))}; freeze "
        "them or use another structure)"
    )


def shared_weights(layers: Sequence[KroneckerLayer]) -> list[list[str]]:
    """The names of layers that share one weight (tied weights), grouped by weight."""
    owners: dict[int, list[str]] = {}
    for layer in layers:
        owners.setdefault(layer.weight_index, []).append(layer.name)
    return [names for names in owners.values() if len(names) > 1]


def _check_unshared(layers: Sequence[KroneckerLayer]) -> None:
    tied = shared_weights(layers)
    if tied:
        weights = [f"{name}.weight" if name else "weight" for name in tied[0]]
        raise ValueError(
            f"layers {tied[0]} share one weight ({weights} are one tied parameter), whose "
            "curvature sums both layers' uses: no Kronecker block of one layer describes it; "
            "use another structure, or call one layer several times (its calls are pooled)"
        )


def tied_parameters(model: nn.Module, layers: Sequence[KroneckerLayer]) -> list[list[str]]:
    """The parameters of ``layers`` that other modules of ``model`` hold too (tied weights: an
    embedding and an output layer, two layers' biases), each as the qualified names of its
    holders. A module registered under several names holds its parameters once."""
    params = trainable_parameters(model)
    indices = [(layer.weight_index, layer.bias_index) for layer in layers]
    owned = {id(params[index]) for pair in indices for index in pair if index is not None}
    holders: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(prefix=module_name, recurse=False):
            if id(param) in owned:
                holders.setdefault(id(param), []).append(name)
    return [names for names in holders.values() if len(names) > 1]


def _check_untied(model: nn.Module, layers: Sequence[KroneckerLayer]) -> None:
    tied = tied_parameters(model, layers)
    if tied:
        raise ValueError(
            f"parameters {tied[0]} are one tied parameter, whose curvature sums the uses of "
            "every module holding it: no Kronecker block of one layer describes it; untie them "
            "or use another structure"
        )


def check_layer_input(module: nn.Module, layer_input: Tensor, name: str) -> None:
    """Raise a ``ValueError`` naming layer ``name`` if the input of an ``nn.Linear`` has no
    batch dimension, or that of a convolution (transposed or not) is not ``(N, C, H, W)``
    (``(N, C, L)``) with the layer's ``C``: K-FAC reads dim 0 as the samples. (An
    ``nn.Embedding``'s tokens are checked before it runs, :func:`check_tokens`.)"""
    if isinstance(module, CONV_TYPES):
        one_d = isinstance(module, _ONE_D_TYPES)
        if layer_input.ndim == (3 if one_d else 4) and layer_input.shape[1] == module.in_channels:
            return
        spatial = "L" if one_d else "H, W"
        raise ValueError(
            f"layer {name!r}: expected a batched (N, {module.in_channels}, {spatial}) input, "
            f"got shape {tuple(layer_input.shape)}"
        )
    if isinstance(module, nn.Linear) and layer_input.ndim < 2:
        raise ValueError(
            f"layer {name!r}: expected a batched (N, ..., {module.in_features}) input, "
            f"got shape {tuple(layer_input.shape)}"
        )


def check_tokens(module: nn.Embedding, tokens: Tensor, name: str) -> None:
    """Raise a ``ValueError`` naming embedding ``name`` and the offending value unless
    ``tokens`` is a batched ``(N, ...)`` tensor of integer indices in ``[0, V)``, ``V`` the
    vocabulary (one read-back of the extremes; ``nn.Embedding`` itself reports an index out of
    range without the value, or on an accelerator as a device-side assertion)."""
    if not isinstance(tokens, Tensor) or tokens.ndim == 0:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"layer {name!r}: expected batched (N, ...) token indices, got {shape}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(
            f"layer {name!r}: tokens must be integer indices, got dtype {tokens.dtype}"
        )
    if not tokens.numel():
        return
    low, high = torch.stack([tokens.min(), tokens.max()]).tolist()
    vocabulary = module.num_embeddings
    if low < 0 or high >= vocabulary:
        raise ValueError(
            f"layer {name!r}: tokens must lie in [0, {vocabulary}), got {low if low < 0 else high}"
        )


def tokens_as_features(tokens: Tensor) -> Tensor:
    """An embedding's tokens ``(N, ...)`` as ``(N, T, 1)``: the indices of its one-hot input
    features at the ``T`` positions of each sample (a view where the tokens are contiguous)."""
    return tokens.reshape(tokens.shape[0], -1, 1)


def token_frequencies(module: nn.Embedding, tokens: Tensor) -> Tensor:
    """An embedding's diagonal input factor ``a``, shape ``(V,)``: the mean over samples and
    positions of the one-hot inputs' squares, ``a_v = 1/(N T) #{(n, t): x_nt = v}``, with
    ``a = 0`` at ``padding_idx``, whose row gets no gradient (module docstring). Counted as
    integers, divided in float32 (float64 for a float64 weight), returned in the weight's dtype.

    Parameters
    ----------
    module : nn.Embedding
    tokens : Tensor of shape (N, ...)
        Integer tokens in ``[0, V)`` (:func:`check_tokens`).
    """
    dtype = module.weight.dtype
    working = torch.float64 if dtype == torch.float64 else torch.float32
    return (token_counts(module, tokens).to(working) / tokens.numel()).to(dtype)


def token_counts(module: nn.Embedding, tokens: Tensor) -> Tensor:
    """How often each token of ``module``'s vocabulary occurs in ``tokens``, an integer tensor
    of shape ``(V,)``, with 0 at ``padding_idx`` (its row gets no gradient, so no curvature)."""
    counts = torch.bincount(tokens.reshape(-1), minlength=module.num_embeddings)
    if module.padding_idx is not None:
        counts[module.padding_idx] = 0
    return counts


def transposed_output_size(module: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    """The spatial size of a transposed convolution's output for an input of shape
    ``input_shape`` ``(N, C_in, *L_in)`` called without ``output_size=``: ``L_out = (L_in − 1) s
    − 2 p + d (k − 1) + output_padding + 1`` along each axis."""
    return tuple(
        (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + extra + 1
        for size, stride, padding, dilation, kernel, extra in zip(
            input_shape[2:],
            module.stride,
            module.padding,
            module.dilation,
            module.kernel_size,
            module.output_padding,
            strict=True,
        )
    )


def check_layer_output(module: nn.Module, layer_input: Tensor, output: Tensor, name: str) -> None:
    """Raise a ``ValueError`` naming layer ``name`` if a transposed convolution's output is not
    of the size that its ``output_padding`` gives (``forward(x, output_size=...)`` chose
    another): its features are those of the expanded input of ``output_padding``. Other layers
    pass."""
    if not isinstance(module, CONV_TRANSPOSE_TYPES):
        return
    expected = transposed_output_size(module, layer_input.shape)
    if tuple(output.shape[2:]) != expected:
        raise ValueError(
            f"layer {name!r}: output of spatial size {tuple(output.shape[2:])}, but "
            f"output_padding={module.output_padding} gives {expected}; K-FAC supports a "
            "transposed convolution called without output_size= (set output_padding instead)"
        )


class ConvGeometry(NamedTuple):
    """A convolution as a 2-D one (a ``Conv1d`` has height 1): ``(h, w)`` pairs, and the pads
    in ``functional.pad`` order ``(w_left, w_right, h_top, h_bottom)``, negative for cropping.
    A transposed convolution's is that of the convolution of its zero-inserted input
    (:func:`conv_as_2d`)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]
    padding_mode: str


def conv_as_2d(module: nn.Module, layer_input: Tensor, name: str) -> tuple[ConvGeometry, Tensor]:
    """The convolution's geometry and its input as ``(N, C, H, W)``; validates the input.

    A transposed convolution's input is returned zero-inserted (``s − 1`` zeros between
    neighbours along an axis of stride ``s``), with the geometry of the convolution that the
    layer applies to it (module docstring): stride 1, the layer's dilation, pads
    ``d (k − 1) − p`` before and that plus ``output_padding`` after.
    """
    check_layer_input(module, layer_input, name)
    one_d = isinstance(module, _ONE_D_TYPES)
    planar = layer_input.unsqueeze(2) if one_d else layer_input
    if isinstance(module, CONV_TRANSPOSE_TYPES):
        return _transposed_geometry(module, one_d), _zero_inserted(planar, module.stride)
    pads = tuple(module._reversed_padding_repeated_twice)
    if not one_d:
        return ConvGeometry(
            module.kernel_size, module.stride, module.dilation, pads, module.padding_mode
        ), planar
    geometry = ConvGeometry(
        (1, *module.kernel_size),
        (1, *module.stride),
        (1, *module.dilation),
        (*pads, 0, 0),
        module.padding_mode,
    )
    return geometry, planar


def _transposed_geometry(module: nn.Module, one_d: bool) -> ConvGeometry:
    """The geometry of the convolution that a transposed convolution applies to its
    zero-inserted input, as a 2-D one."""
    before = [
        dilation * (kernel - 1) - padding
        for kernel, dilation, padding in zip(
            module.kernel_size, module.dilation, module.padding, strict=True
        )
    ]
    after = [pad + extra for pad, extra in zip(before, module.output_padding, strict=True)]
    if one_d:
        return ConvGeometry(
            (1, *module.kernel_size),
            (1, 1),
            (1, *module.dilation),
            (before[0], after[0], 0, 0),
            "zeros",
        )
    pads = (before[1], after[1], before[0], after[0])
    return ConvGeometry(module.kernel_size, (1, 1), module.dilation, pads, "zeros")


def _zero_inserted(planar: Tensor, stride: tuple[int, ...]) -> Tensor:
    """``(N, C, H, W)`` with ``s_h − 1`` zero rows and ``s_w − 1`` zero columns inserted
    between neighbours (``stride`` of a 1-D layer: ``(s_w,)``); unchanged for stride 1."""
    stride_h, stride_w = (1, *stride) if len(stride) == 1 else stride
    if stride_h == stride_w == 1:
        return planar
    samples, channels, height, width = planar.shape
    size = (samples, channels, (height - 1) * stride_h + 1, (width - 1) * stride_w + 1)
    inserted = planar.new_zeros(size)
    inserted[:, :, ::stride_h, ::stride_w] = planar
    return inserted


def padded_conv_input(geometry: ConvGeometry, layer_input: Tensor) -> Tensor:
    """The ``(N, C, H, W)`` input padded as the layer pads it."""
    mode = "constant" if geometry.padding_mode == "zeros" else geometry.padding_mode
    return functional.pad(layer_input, geometry.pads, mode=mode)


def _output_size(padded_size: int, kernel: int, dilation: int, stride: int) -> int:
    return (padded_size - dilation * (kernel - 1) - 1) // stride + 1


def conv_patches(module: nn.Module, layer_input: Tensor, name: str = "conv") -> Tensor:
    """The unfolded input patches of an ``nn.Conv2d`` or ``nn.Conv1d``, feature-major: shape
    ``(d_in, N, T)`` with ``d_in = C · k_h · k_w`` (``C · k`` for a ``Conv1d``; channel-major,
    matching ``weight.reshape(d_out, -1)``) and ``T`` the output positions (``H_out · W_out``,
    ``L_out``); contiguous, so ``.reshape(d_in, -1)`` is a view. For a grouped convolution
    (``groups = g``) ``C`` counts all the input channels, so group ``j``'s patches are the
    ``j``-th of ``g`` equal blocks of rows: ``.reshape(g, d_in // g, N, T)`` is a view.

    The input ``(N, C, H, W)`` (``(N, C, L)``) is padded as the layer pads it. The patches are
    what ``functional.unfold`` gives, permuted, but gathered as ``k_h · k_w`` strided slices of
    the padded input, one per kernel offset, stacked in one copy: on the CPU ``unfold`` is
    2–20× slower at the sizes of ``benchmarks/kfac_digits.py`` and ordinary image layers.

    A transposed convolution's (``nn.ConvTranspose2d``, ``nn.ConvTranspose1d``) are those of
    the convolution of its expanded input (:func:`conv_as_2d`), ``d_in = C_in · k_h · k_w``
    rows matching :func:`weight_as_matrix` and ``T`` its output positions.

    Raises
    ------
    ValueError
        Unless ``layer_input`` is a batched input of the layer, ``(N, C_in, H, W)`` or
        ``(N, C_in, L)`` (``name`` names it in the message).
    """
    geometry, layer_input = conv_as_2d(module, layer_input, name)
    padded = padded_conv_input(geometry, layer_input)
    (kernel_h, kernel_w), (dilation_h, dilation_w) = geometry.kernel, geometry.dilation
    stride_h, stride_w = geometry.stride
    out_h = _output_size(padded.shape[2], kernel_h, dilation_h, stride_h)
    out_w = _output_size(padded.shape[3], kernel_w, dilation_w, stride_w)
    channels_first = padded.transpose(0, 1)
    offsets = [
        channels_first[
            :,
            :,
            row * dilation_h : row * dilation_h + stride_h * (out_h - 1) + 1 : stride_h,
            column * dilation_w : column * dilation_w + stride_w * (out_w - 1) + 1 : stride_w,
        ]
        for row in range(kernel_h)
        for column in range(kernel_w)
    ]
    patches = torch.stack(offsets, dim=1)  # (C, k_h k_w, N, H_out, W_out)
    return patches.reshape(-1, layer_input.shape[0], out_h * out_w)


def _window_indicator(
    kernel: int, dilation: int, stride: int, padding: tuple[int, int], size: int, like: Tensor
) -> tuple[Tensor, int]:
    """Along one axis of an input of ``size`` positions with ``padding`` zeros before and after
    it: the ``(kernel, size)`` matrix whose row ``k`` marks the positions that kernel offset
    ``k`` reads (padding is not a position), and the number of output positions."""
    outputs = _output_size(size + sum(padding), kernel, dilation, stride)
    offsets = torch.arange(kernel, device=like.device) * dilation - padding[0]
    read = offsets.unsqueeze(1) + stride * torch.arange(outputs, device=like.device)
    outside = (read < 0) | (read >= size)
    indicator = like.new_zeros(kernel, size + 1)
    indicator.scatter_(1, read.masked_fill(outside, size), 1.0)
    return indicator[:, :size], outputs


def conv_patch_means(module: nn.Module, layer_input: Tensor, name: str = "conv") -> Tensor:
    """The mean over locations of :func:`conv_patches`, shape ``(d_in, N)``: K-FAC-reduce's
    input features, without gathering the patches.

    The sum over the locations of kernel offset ``(r, q)`` is ``Σ_{h,w} R[r,h] x[h,w] Q[q,w]``,
    with ``R`` and ``Q`` marking the rows and columns that the offset reads: two matrix
    products that read the input once, in its dtype (also under ``torch.autocast``). Zero
    padding adds nothing and is left out; the other padding modes pad the input first. A
    transposed convolution's are read from its zero-inserted input (:func:`conv_as_2d`).

    Raises
    ------
    ValueError
        As :func:`conv_patches`.
    """
    geometry, layer_input = conv_as_2d(module, layer_input, name)
    zeros = geometry.padding_mode == "zeros"
    source = layer_input if zeros else padded_conv_input(geometry, layer_input)
    samples, channels, height, width = source.shape
    pads = geometry.pads
    paddings = ((pads[2], pads[3]), (pads[0], pads[1])) if zeros else ((0, 0), (0, 0))
    (rows, out_h), (columns, out_w) = (
        _window_indicator(kernel, dilation, stride, padding, size, source)
        for kernel, dilation, stride, padding, size in zip(
            geometry.kernel,
            geometry.dilation,
            geometry.stride,
            paddings,
            (height, width),
            strict=True,
        )
    )
    with torch.autocast(source.device.type, enabled=False):  # sums in the input's dtype
        column_sums = source.reshape(-1, width) @ columns.mT  # (N C H, k_w)
        by_row = column_sums.reshape(samples * channels, height, len(columns)).transpose(0, 1)
        sums = rows @ by_row.reshape(height, samples * channels * len(columns))  # (k_h, N C k_w)
    sums = sums.reshape(len(rows), samples, channels, len(columns)).permute(2, 0, 3, 1)
    return sums.reshape(-1, samples) / (out_h * out_w)  # (C k_h k_w, N)


class _Phase(NamedTuple):
    """Along one axis of a transposed convolution, the ``count`` output positions
    ``t = r + s m`` of one residue ``r`` modulo the stride ``s``: kernel offset ``a`` of
    ``reads`` reads input entry ``start_a + m`` there (``(a, start_a)`` pairs; zero outside the
    input), every other offset a zero of the expanded input."""

    count: int
    reads: list[tuple[int, int]]


def _phases(
    kernel: int, dilation: int, stride: int, pads: tuple[int, int], size: int
) -> tuple[list[_Phase], tuple[int, int]]:
    """The phases of one axis, and the zeros to pad the input with before and after it so
    that every read is inside."""
    outputs = (size - 1) * stride + 1 + sum(pads) - dilation * (kernel - 1)
    phases = []
    for residue in range(stride):
        shifts = [(offset, residue + offset * dilation - pads[0]) for offset in range(kernel)]
        reads = [(offset, shift // stride) for offset, shift in shifts if shift % stride == 0]
        phases.append(_Phase(max(0, -(-(outputs - residue) // stride)), reads))
    starts = [(start, phase.count) for phase in phases for _, start in phase.reads]
    low = min([0] + [start for start, _ in starts])
    high = max([size] + [start + count for start, count in starts])
    return phases, (-low, high - size)


def transposed_patch_gram(
    module: nn.Module, layer_input: Tensor, bias: bool, name: str = "conv"
) -> tuple[Tensor, int]:
    """``Σ_n Σ_t a aᵀ`` over a transposed convolution's patches (:func:`conv_patches`, with a
    1 appended for a ``bias``; one matrix per group, ``(g, d [+ 1], d [+ 1])``, for
    ``groups = g > 1``) and the number ``N T`` of patches, without gathering the zeros of its
    expanded input.

    Along an axis of stride ``s`` the output positions ``t ≡ r (mod s)`` read input entries
    at the kernel offsets of one residue class and zeros at the others, so each of the
    ``s_h s_w`` phases gathers only its offsets' entries and adds their Gram matrix to those
    offsets' rows and columns: about ``s_h s_w`` times fewer entries gathered and
    ``(s_h s_w)²`` times fewer products than the Gram matrix of every patch.

    Raises
    ------
    ValueError
        As :func:`conv_patches`.
    """
    check_layer_input(module, layer_input, name)
    one_d = isinstance(module, _ONE_D_TYPES)
    planar = layer_input.unsqueeze(2) if one_d else layer_input
    geometry = _transposed_geometry(module, one_d)
    strides = (1, *module.stride) if one_d else tuple(module.stride)
    pads = ((geometry.pads[2], geometry.pads[3]), (geometry.pads[0], geometry.pads[1]))
    (rows, row_pads), (columns, column_pads) = (
        _phases(*axis)
        for axis in zip(
            geometry.kernel, geometry.dilation, strides, pads, planar.shape[2:], strict=True
        )
    )
    padded = functional.pad(planar, (*column_pads, *row_pads)).transpose(0, 1)  # (C, N, H, W)
    channels, samples = padded.shape[:2]
    features = channels // module.groups * geometry.kernel[0] * geometry.kernel[1]
    size = features + int(bias)
    total = padded.new_zeros((module.groups, size, size))
    for row, column in itertools.product(rows, columns):
        shifted = (row_pads[0], column_pads[0])
        _add_phase_gram(total, padded, row, column, shifted, geometry.kernel, bias)
    positions = samples * sum(row.count for row in rows) * sum(column.count for column in columns)
    return (total[0] if module.groups == 1 else total), positions


def transposed_output_grad(module: nn.Module, rows: Tensor, input_shape: Sequence[int]) -> Tensor:
    """A transposed convolution's output gradients ``(N, C_out, *L_out)`` from their rows
    ``(N, T, C_out)`` (:func:`output_features`), or from each group's ``(g, N, T, C_out / g)``
    (:class:`~natgrad.optim.kfac_layers.GroupedConvState`'s), for an input of shape
    ``input_shape`` ``(N, C_in, *L_in)`` (:func:`transposed_output_size`)."""
    sizes = transposed_output_size(module, input_shape)
    if rows.ndim == 4:  # (g, N, T, C_out / g)
        rows = rows.permute(1, 2, 0, 3).flatten(2)
    return rows.transpose(1, 2).reshape(rows.shape[0], rows.shape[2], *sizes)


def transposed_per_sample_gradients(
    module: nn.Module, layer_input: Tensor, output_grad: Tensor, bias: bool, name: str = "conv"
) -> Tensor:
    """Per-sample gradients of a transposed convolution's weight matrix
    (:func:`weight_as_matrix`, with a bias column for a ``bias``), ``Σ_t g_t a_tᵀ`` over its
    patches (:func:`per_sample_gradients` of :func:`input_features`), without gathering them.

    ``<g, conv_transpose(x, W)> = <conv(g, W), x>``, so the weight gradient is that of a
    convolution of ``g`` (stride ``s``, padding ``p``, dilation ``d``) whose output gradient is
    ``x``; the samples are made the groups of one such convolution (``N g`` groups), which gives
    each sample's gradient in one call. Where ``output_padding ≥ s`` (allowed when ``d >
    output_padding``) that convolution would have more positions than ``x``: ``g`` is then
    padded and cropped to the positions the input reaches (:func:`_output_grad_and_padding`).

    Parameters
    ----------
    module : nn.ConvTranspose1d or nn.ConvTranspose2d
    layer_input : Tensor of shape (N, C_in, *L_in)
    output_grad : Tensor of shape (N, C_out, *L_out)
        Gradients with respect to the layer's output, of its input's dtype.
    bias : bool
        Append the bias gradients ``Σ_t g_t`` as a last column.
    name : str
        The layer's name, for error messages.

    Returns
    -------
    Tensor of shape (N, C_out, d_in [+ 1]), or (g, N, C_out / g, d_in / g [+ 1]) for
    ``groups = g > 1``, with ``d_in = C_in · Π kernel``.

    Raises
    ------
    TypeError
        If ``module`` is not a transposed convolution.
    ValueError
        If ``layer_input`` is not a batched input of the layer (:func:`check_layer_input`) or
        ``output_grad`` not of the shape of its output.
    """
    _check_transposed_gradients(module, layer_input, output_grad, name)
    samples, groups = layer_input.shape[0], module.groups
    shape = (samples * module.weight.shape[0], *module.weight.shape[1:])
    trimmed, padding = _output_grad_and_padding(module, output_grad)
    _, weight_grads, _ = torch.ops.aten.convolution_backward(
        layer_input.reshape(1, -1, *layer_input.shape[2:]),
        trimmed.reshape(1, -1, *trimmed.shape[2:]),
        layer_input.new_empty(()).expand(shape),
        None,
        module.stride,
        padding,
        module.dilation,
        False,
        [0] * len(module.stride),
        samples * groups,
        (False, True, False),
    )  # (N C_in, C_out / g, *kernel)
    grouped = weight_grads.unflatten(0, (samples, groups, -1))  # (N, g, C_in / g, C_out / g, ...)
    flipped = grouped.flip(tuple(range(4, grouped.ndim))).transpose(2, 3)
    matrices = flipped.reshape(samples, groups, flipped.shape[2], -1)
    if bias:
        sums = output_grad.flatten(2).sum(dim=2).reshape(samples, groups, -1, 1)
        matrices = torch.cat([matrices, sums], dim=3)
    if groups == 1:
        return matrices[:, 0]
    return matrices.transpose(0, 1)


def _check_transposed_gradients(
    module: nn.Module, layer_input: Tensor, output_grad: Tensor, name: str
) -> None:
    """The errors of :func:`transposed_per_sample_gradients`."""
    if not isinstance(module, CONV_TRANSPOSE_TYPES):
        raise TypeError(
            f"layer {name!r}: expected an nn.ConvTranspose1d or nn.ConvTranspose2d, got "
            f"{type(module).__name__}"
        )
    check_layer_input(module, layer_input, name)
    expected = (layer_input.shape[0], module.out_channels)
    if output_grad.ndim != layer_input.ndim or tuple(output_grad.shape[:2]) != expected:
        raise ValueError(
            f"layer {name!r}: expected output gradients of shape ({expected[0]}, {expected[1]}, "
            f"...) like the input's, got shape {tuple(output_grad.shape)}"
        )
    check_layer_output(module, layer_input, output_grad, name)


def _output_grad_and_padding(module: nn.Module, output_grad: Tensor) -> tuple[Tensor, list[int]]:
    """A transposed convolution's output gradients ``(N, C_out, *L_out)`` and the padding with
    which a convolution of them (stride ``s``, dilation ``d``) has exactly the input's
    ``L_in`` positions along each axis: ``p``, unless ``output_padding ≥ s`` (with ``d >
    output_padding``), where the output's last ``output_padding`` positions would give it
    more: there the gradients are padded by ``p`` before and ``p − output_padding`` after
    (cropped where negative, positions no input entry reaches) and the padding is 0."""
    padding = list(module.padding)
    pads = []
    for axis in reversed(range(len(padding))):
        extra = module.output_padding[axis]
        before, after = 0, 0
        if extra >= module.stride[axis]:
            before, after, padding[axis] = padding[axis], padding[axis] - extra, 0
        pads += [before, after]
    if not any(pads):
        return output_grad, padding
    return functional.pad(output_grad, pads), padding


def _add_phase_gram(
    total: Tensor,
    padded: Tensor,
    row: _Phase,
    column: _Phase,
    shifted: tuple[int, int],
    kernel: tuple[int, int],
    bias: bool,
) -> None:
    """Add one phase's patches' Gram matrix (and, with a ``bias``, their sums and count) to
    ``total`` ``(g, d [+ 1], d [+ 1])`` at its offsets' rows and columns; ``padded`` is the
    ``(C, N, H, W)`` input with ``shifted`` zeros before its rows and columns."""
    groups, features = total.shape[0], total.shape[1] - int(bias)
    samples = padded.shape[1]
    if bias:
        total[:, features, features] += samples * row.count * column.count
    if not (row.count and column.count and row.reads and column.reads):
        return
    offsets = [
        padded[
            :,
            :,
            shifted[0] + start_h : shifted[0] + start_h + row.count,
            shifted[1] + start_w : shifted[1] + start_w + column.count,
        ]
        for _, start_h in row.reads
        for _, start_w in column.reads
    ]
    patches = torch.stack(offsets, dim=1).reshape(groups, -1, samples * row.count * column.count)
    kept = [a * kernel[1] + b for a, _ in row.reads for b, _ in column.reads]
    channels = torch.arange(padded.shape[0] // groups, device=padded.device)
    kept_offsets = torch.tensor(kept, device=padded.device)
    index = (channels.unsqueeze(1) * (kernel[0] * kernel[1]) + kept_offsets).reshape(-1)
    total[:, index.unsqueeze(1), index] += add_column_gram(None, patches, ones=False, fresh=True)
    if bias:
        sums = patches.sum(dim=-1)
        total[:, index, features] += sums
        total[:, features, index] += sums


def input_features(layer: KroneckerLayer, layer_input: Tensor) -> Tensor:
    """Input features ``a``, shape ``(N, T, d_in [+ 1])`` (a trailing 1 for a bias).

    ``nn.Conv2d`` inputs ``(N, C, H, W)`` become their ``T = H_out · W_out`` patches of
    ``C · k_h · k_w`` features (:func:`patch_features`, a non-contiguous view), ``nn.Conv1d``
    inputs ``(N, C, L)`` their ``T = L_out`` patches of ``C · k`` (a transposed convolution's:
    those of its expanded input, :func:`conv_patches`); a grouped convolution's are per group,
    ``(g, N, T, d_in / g [+ 1])``.
    """
    module = layer.module
    if isinstance(module, CONV_TYPES):
        patches = conv_patches(module, layer_input, layer.name)
        return patch_features(patches, layer.has_bias, layer.groups)
    check_layer_input(module, layer_input, layer.name)
    features = layer_input.reshape(layer_input.shape[0], -1, layer_input.shape[-1])
    if layer.has_bias:
        features = torch.cat([features, features.new_ones(*features.shape[:2], 1)], dim=2)
    return features


def _check_groups(size: int, groups: int) -> None:
    if groups < 1 or size % groups:
        raise ValueError(f"{size} features do not split into groups={groups}")


def patch_features(patches: Tensor, bias: bool, groups: int = 1) -> Tensor:
    """Input features ``(N, T, d_in [+ 1])`` from feature-major :func:`conv_patches`
    ``(d_in, N, T)``: a row of ones appended for a bias (a contiguous copy), then a permuted
    view. With ``groups = g > 1`` (a grouped convolution) each group's features,
    ``(g, N, T, d_in / g [+ 1])``.

    Raises
    ------
    ValueError
        If ``patches`` is not 3-D, or its rows do not split into ``groups``.
    """
    if patches.ndim != 3:
        raise ValueError(f"expected patches of shape (d_in, N, T), got {tuple(patches.shape)}")
    _check_groups(patches.shape[0], groups)
    if groups > 1:
        grouped = patches.reshape(groups, -1, *patches.shape[1:])
        if bias:
            ones = grouped.new_ones(groups, 1, *patches.shape[1:])
            grouped = torch.cat([grouped, ones], dim=1)
        return grouped.permute(0, 2, 3, 1)
    if bias:
        patches = torch.cat([patches, patches.new_ones(1, *patches.shape[1:])])
    return patches.permute(1, 2, 0)


def output_features(layer: KroneckerLayer, output_grad: Tensor) -> Tensor:
    """Gradients w.r.t. the layer output (pre-activation), shape ``(N, T, d_out)``."""
    if isinstance(layer.module, CONV_TYPES):
        return output_grad.flatten(2).transpose(1, 2)
    return output_grad.reshape(output_grad.shape[0], -1, output_grad.shape[-1])


def add_column_gram(total: Tensor | None, columns: Tensor, ones: bool, fresh: bool) -> Tensor:
    """``total + X Xᵀ`` in place for feature-major ``columns`` ``(d, n)`` (e.g. conv patches),
    where ``X`` is ``columns`` with, if ``ones``, a row of ones appended (a bias): the Gram
    matrix of ``columns`` into the leading block, their row sums and ``n`` into the last row and
    column, so no row of ones is copied in. ``fresh`` ignores the old contents of ``total``
    (allocated when ``None``); shape ``(d [+ 1], d [+ 1])``. Columns ``(g, d, n)`` (the groups
    of a grouped convolution) give ``g`` Gram matrices, ``(g, d [+ 1], d [+ 1])``."""
    *groups, features, count = columns.shape
    size = features + int(ones)
    if total is None:
        total = columns.new_empty((*groups, size, size))
    block = total[..., :features, :features]
    add_product = block.baddbmm_ if groups else block.addmm_
    add_product(columns, columns.mT, beta=0.0 if fresh else 1.0)
    if not ones:
        return total
    sums = columns.sum(dim=-1)
    if fresh:
        total[..., :features, features] = sums
        total[..., features, :features] = sums
        total[..., features, features] = count
    else:
        total[..., :features, features] += sums
        total[..., features, :features] += sums
        total[..., features, features] += count
    return total


def reduced_input_features(features: Tensor) -> Tensor:
    """K-FAC-reduce's input features ``ā_n = 1/T Σ_t a_nt``: shape ``(N, 1, d)`` from
    ``(N, T, d)``."""
    return features.mean(dim=1, keepdim=True)


def reduced_output_features(features: Tensor) -> Tensor:
    """K-FAC-reduce's output gradients ``ĝ_n = Σ_t g_nt``: shape ``(N, 1, d)`` from
    ``(N, T, d)``."""
    return features.sum(dim=1, keepdim=True)


def input_factor(features: Tensor) -> Tensor:
    """``A = 1/(N T) Σ_n Σ_t a aᵀ`` from features of shape ``(N, T, d)``; shape ``(d, d)``."""
    flat = features.reshape(-1, features.shape[-1])
    return flat.mT @ flat / flat.shape[0]


def output_factor(features: Tensor) -> Tensor:
    """``G = 1/N Σ_n Σ_t g gᵀ`` from features of shape ``(N, T, d)``; shape ``(d, d)``; from
    grouped features ``(g, N, T, d)`` (:func:`grouped_output_features`) one per group,
    ``(g, d, d)``."""
    flat = features.reshape(*features.shape[:-3], -1, features.shape[-1])
    return flat.mT @ flat / features.shape[-3]


def grouped_output_features(features: Tensor, groups: int) -> Tensor:
    """Output gradients ``(N, T, d_out)`` of a grouped convolution as each group's,
    ``(g, N, T, d_out / g)`` (a permuted view).

    Raises
    ------
    ValueError
        If ``features`` is not 3-D or ``d_out`` does not split into ``groups``.
    """
    if features.ndim != 3:
        raise ValueError(f"expected features of shape (N, T, d_out), got {tuple(features.shape)}")
    _check_groups(features.shape[-1], groups)
    samples, locations, outputs = features.shape
    return features.reshape(samples, locations, groups, outputs // groups).permute(2, 0, 1, 3)


def check_backward_vectors(vectors: Tensor, outputs: Tensor) -> None:
    """Backward vectors ``(K, N, D)`` for model outputs ``(N, D)`` (flattened per sample).

    Raises
    ------
    ValueError
        Naming both shapes, if ``vectors`` is not ``(K, N, D)``.
    """
    if not isinstance(vectors, Tensor) or vectors.ndim != 3 or vectors.shape[1:] != outputs.shape:
        shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
        samples, size = outputs.shape
        raise ValueError(
            f"backward vectors must have shape (K, N, D) = (K, {samples}, {size}) for the "
            f"model's {samples} samples of {size} outputs each, got {shape}"
        )


def join_calls(features: Sequence[Tensor]) -> Tensor:
    """Features ``(..., N, T_i, d)`` of a layer's calls in one forward pass joined along the
    locations, ``(..., N, Σ T_i, d)`` (one call's unchanged): the calls' locations pooled as
    one call's."""
    return features[0] if len(features) == 1 else torch.cat(list(features), dim=-2)


def per_sample_gradients(inputs: Tensor, output_grads: Tensor) -> Tensor:
    """Per-sample weight-matrix gradients ``Σ_t g_t a_tᵀ``, shape ``(..., N, d_out, d_in)``
    from inputs ``(..., N, T, d_in)`` and output gradients ``(..., N, T, d_out)`` (leading
    dimensions: e.g. the groups of a grouped convolution)."""
    return torch.einsum("...nto,...nti->...noi", output_grads, inputs)


def backward_vectors(
    outputs: Tensor,
    likelihood: Likelihood,
    kind: str,
    targets: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Vectors ``v_kn`` to back-propagate from the outputs, shape ``(K, N, C)``.

    The Fisher is ``1/N Σ_n Σ_k J_nᵀ v_kn v_knᵀ J_n`` with ``J_n`` the Jacobian of output ``n``:

    - ``"exact"``: ``K = C`` columns of ``S_n`` with ``S_n S_nᵀ = ∇²A(f_n)``;
    - ``"mc"``: ``K = mc_samples`` gradients ``∇_f nll(f_n, y)`` at ``y ~ p(y | f_n)``, scaled by
      ``1/√K``;
    - ``"empirical"``: ``K = 1`` gradient ``∇_f nll(f_n, y_n)`` at the observed ``targets``.
    """
    matrix = as_matrix(outputs).detach()
    if kind == "exact":
        return likelihood.natural_hessian_sqrt(matrix).permute(2, 0, 1)
    if kind == "empirical":
        likelihood.check_observed(matrix, targets)
        return _nll_gradient(likelihood, matrix, targets).unsqueeze(0)
    scale = mc_samples**-0.5
    samples = [
        _nll_gradient(likelihood, matrix, likelihood.sample(matrix, generator)) * scale
        for _ in range(mc_samples)
    ]
    return torch.stack(samples)


def _nll_gradient(likelihood: Likelihood, outputs: Tensor, targets: Tensor) -> Tensor:
    with torch.enable_grad():
        leaf = outputs.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(likelihood.nll(leaf, targets).sum(), leaf)
    return gradient


def check_fisher_kind(
    kind: str, targets: Tensor | None, mc_samples: int, allowed: Sequence[str] = FISHER_KINDS
) -> None:
    """Validate ``kind``, ``targets`` and ``mc_samples`` at a public boundary."""
    if kind not in allowed:
        raise ValueError(f"kind must be one of {list(allowed)}, got {kind!r}")
    if kind == "empirical" and targets is None:
        raise ValueError("kind='empirical' needs the observed targets (targets=...)")
    if kind == "mc" and (isinstance(mc_samples, bool) or not isinstance(mc_samples, int)):
        raise TypeError(f"mc_samples must be an int, got {type(mc_samples).__name__}")
    if kind == "mc" and mc_samples < 1:
        raise ValueError(f"mc_samples must be at least 1, got {mc_samples}")


class ForwardCapture:
    """Context manager recording each layer's inputs and outputs during one forward pass.

    Attributes
    ----------
    calls : dict[str, list[tuple[Tensor, Tensor]]]
        Layer name → ``(input, output)`` of each of its calls, in order: the input detached,
        the output attached to the graph (for back-propagating vectors).
    """

    def __init__(self, layers: Sequence[KroneckerLayer]) -> None:
        self.layers = list(layers)
        self.calls: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._exit_stack = contextlib.ExitStack()

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
            check_layer_output(module, args[0], output, name)
            self.calls.setdefault(name, []).append((args[0].detach(), output))
            # Pass a copy on: an in-place op downstream (ReLU(inplace=True)) would otherwise
            # rewrite the recorded output and its place in the graph.
            return output.clone()

        return record

    @staticmethod
    def _token_check(name: str):
        def check(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            check_tokens(module, args[0], name)

        return check

    def __enter__(self) -> ForwardCapture:
        """Attach the hooks (an embedding's tokens are checked before it runs:
        :func:`check_tokens`); the model runs inside count as a curvature evaluation
        (:mod:`~natgrad.curvature.evaluation_scope`): preconditioners record none of them."""
        self._exit_stack.enter_context(curvature_evaluation())
        for layer in self.layers:
            if layer.is_embedding:
                handle = layer.module.register_forward_pre_hook(self._token_check(layer.name))
                self._exit_stack.callback(handle.remove)
            handle = layer.module.register_forward_hook(self._hook(layer.name))
            self._exit_stack.callback(handle.remove)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._exit_stack.close()

    def check_all_called(self) -> None:
        """Raise ``ValueError`` naming any layer that the forward pass did not call."""
        missing = [layer.name for layer in self.layers if layer.name not in self.calls]
        if missing:
            raise ValueError(f"layer(s) {missing} were not called in the forward pass")
