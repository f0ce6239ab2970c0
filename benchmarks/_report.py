"""Shared reporting for the benchmark scripts: markdown tables, JSON results and plots.

Every benchmark writes ``benchmarks/results/<name>.json`` (rows plus the environment they were
measured in) and ``benchmarks/results/<name>.png``, and prints its tables as markdown so they
can be pasted into BENCHMARKS.md unchanged.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

RESULTS_DIR = Path(__file__).parent / "results"


def environment(**settings: Any) -> dict[str, Any]:
    """Versions and machine the results were measured on, plus the script's ``settings``."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        **settings,
    }


def format_value(value: Any) -> str:
    """A table cell: floats in 4 significant digits (scientific when tiny or huge)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` (dicts) as a markdown table with the given ``columns``, in that order."""
    header = "| " + " | ".join(columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(format_value(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Print ``title`` and the markdown table of ``rows``."""
    print(f"\n### {title}\n")
    print(markdown_table(rows, columns), flush=True)


def save_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``benchmarks/results/<name>.json`` and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_json_default))
    print(f"wrote {path}")
    return path


def save_figure(figure: Figure, name: str) -> Path:
    """Save ``figure`` (a pyplot-free :class:`~matplotlib.figure.Figure`) as ``<name>.png``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.png"
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
