"""The ``natgrad`` command and the README's quick start."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import natgrad
from natgrad.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_info_prints_the_version_and_every_component(capsys: pytest.CaptureFixture) -> None:
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    assert f"natgrad {natgrad.__version__}" in printed
    components = ("expfam", "curvature", "linalg", "optim", "models", "distributed", "rl", "es")
    for component in components:
        assert component in printed
    assert "unavailable" not in printed


def test_unknown_benchmark_is_refused_with_the_known_names() -> None:
    with pytest.raises(SystemExit, match="pnmf"):
        main(["bench", "no-such-benchmark"])


def test_bench_pnmf_help_exits_cleanly() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "pnmf", "--help"])
    assert exit_info.value.code == 0


def test_readme_quick_start_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README has no python code block"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert [d.shape for d in namespace["direction"]] == [
        p.shape for p in namespace["model"].parameters()
    ]


def test_readme_names_the_commands_that_ci_runs() -> None:
    ci_command = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in README.read_text()
