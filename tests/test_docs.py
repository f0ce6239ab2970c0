"""The user guide pages under ``docs/``: every Python block runs, in order, in one namespace
per page (the blocks carry their own checks, e.g. that a resumed run equals the original), and
the K-FAC guide's data-parallel example gives on two processes what it gives on one (to
float32 round-off; ``tests/distributed/test_kfac_ddp.py`` checks float64 runs to 1e-5)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from distributed_helpers import run_on_processes

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(page for page in DOCS.glob("*.md") if "```python" in page.read_text())


def run_page(page: Path) -> dict:
    """Execute the page's Python blocks in order; the namespace they leave."""
    namespace: dict = {"__name__": f"docs.{page.stem}"}
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    for number, block in enumerate(blocks, start=1):
        exec(compile(block, f"{page.name}, block {number}", "exec"), namespace)
    return namespace


def test_the_kfac_guide_is_among_the_pages() -> None:
    assert DOCS / "kfac.md" in PAGES


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_python_blocks_run(page: Path) -> None:
    run_page(page)


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the page's function reaches the workers only by fork, which torch refuses after a "
    "backward pass where CUDA is available (autograd's device threads)",
)
def test_kfac_guide_data_parallel_example_equals_one_process(tmp_path: Path) -> None:
    namespace = run_page(DOCS / "kfac.md")
    generator = torch.Generator().manual_seed(0)
    batches = torch.randperm(len(namespace["inputs"]), generator=generator).split(64)[:10]
    for size in (1, 2):
        (tmp_path / str(size)).mkdir()
    runs = {
        size: run_on_processes(
            namespace["train"],
            (batches,),
            workdir=tmp_path / str(size),
            world_size=size,
            start_method="fork",  # the function lives in this process only
        )
        for size in (1, 2)
    }
    (single,), (first, second) = runs[1], runs[2]
    for reference, one, other in zip(single, first, second, strict=True):
        assert torch.equal(one, other)  # DDP keeps the replicas identical
        # float32 round-off of the all-reduced sums, amplified by the damped inverses
        assert (one - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert not torch.equal(single[0], namespace["model"][0].weight.detach()), "trained"
