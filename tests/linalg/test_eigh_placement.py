"""``natgrad.linalg.eigh.eigh``: ``torch.linalg.eigh`` with small CUDA matrices decomposed on
the CPU, checked against the float64 decomposition on the CPU."""

import pytest
import torch

from devices import DEVICES
from natgrad.linalg.eigh import CPU_EIGH_MAX_SIZE, eigh


def spd_stack(count: int, size: int, device: str) -> torch.Tensor:
    """``count`` float32 Gram matrices of ``2 size`` Gaussian samples (an activation
    covariance's spectrum), on ``device``."""
    generator = torch.Generator().manual_seed(size)
    samples = torch.randn(count, 2 * size, size, generator=generator)
    return (samples.mT @ samples / (2 * size)).to(device)


def relative_residuals(matrices, values, vectors) -> torch.Tensor:
    """``‖A V − V Λ‖ / ‖A‖`` per matrix of the stack, in float64 on the CPU."""
    matrices, values, vectors = (t.detach().cpu().double() for t in (matrices, values, vectors))
    error = matrices @ vectors - vectors * values.unsqueeze(-2)
    return error.flatten(1).norm(dim=1) / matrices.flatten(1).norm(dim=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [9, 33, 129, 257, 385, CPU_EIGH_MAX_SIZE, CPU_EIGH_MAX_SIZE + 1])
def test_eigh_is_accurate_and_stays_on_the_device(device: str, size: int) -> None:
    """Residuals at float32 round-off (torch's CUDA Jacobi method left 5e-6 to 9e-5 at sizes
    33 to 257 on an H100), eigenvalues equal to float64's, results on the input's device."""
    matrices = spd_stack(2, size, device)
    values, vectors = eigh(matrices)
    assert values.device == matrices.device and vectors.device == matrices.device
    assert values.dtype == vectors.dtype == torch.float32
    assert bool((relative_residuals(matrices, values, vectors) < 3e-6).all())
    expected = torch.linalg.eigvalsh(matrices.cpu().double())
    scale = expected[..., -1:]
    torch.testing.assert_close(values.cpu().double() / scale, expected / scale, rtol=0, atol=2e-6)
    identity = torch.eye(size, dtype=torch.float64)
    gram = vectors.cpu().double().mT @ vectors.cpu().double()
    torch.testing.assert_close(gram, identity.expand_as(gram), rtol=0, atol=2e-5)


def test_eigh_of_a_cpu_matrix_is_torchs() -> None:
    matrices = spd_stack(3, 20, "cpu")
    for got, expected in zip(eigh(matrices), torch.linalg.eigh(matrices), strict=True):
        assert torch.equal(got, expected)
