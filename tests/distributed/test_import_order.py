"""natgrad.distributed imports torch.distributed.nn before any process group exists (see
:mod:`natgrad.distributed.reduce`), in a fresh interpreter."""

import subprocess
import sys


def test_natgrad_distributed_binds_torch_distributed_nn_before_any_group() -> None:
    code = (
        "import sys, natgrad.distributed, torch.distributed as dist; "
        "assert 'torch.distributed.nn' in sys.modules; assert not dist.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_kfac_preconditioner_import_brings_it_too() -> None:
    code = "import sys, natgrad.optim; assert 'torch.distributed.nn' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
