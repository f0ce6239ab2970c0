"""The devices a device-parametrised test runs on: the CPU always, CUDA where available."""

import pytest
import torch

CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_ONLY)]
