"""PNMF at scale: a 20,000 × 2,000 sparse count matrix (5 % non-zeros) fitted by minibatch SVI.

The counts are generated from a 10-component Poisson NMF model at ~5 % of the positions
(uniform, duplicates merged) and kept as a SciPy CSR matrix; the fit works on the non-zeros only
(``(E, nnz_batch, L)`` gathers; the rate sum in closed form), never on a dense
``(E, N, D)`` tensor (which would take E·N·D·4 bytes = 1.6 GB in float32 at E = 10).

Reports wall time per epoch, the ELBO per epoch, and the process's peak resident memory
(``ru_maxrss``) before and after the fit. Writes ``benchmarks/results/pnmf_scale.json``.

Usage: ``python benchmarks/pnmf_scale.py [--epochs 3] [--modes lower-bound,expanded]
[--device cuda]`` (a device other than the CPU writes ``pnmf_scale_<device>.json``).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from natgrad.models import PNMF


def generate_counts(n_samples: int, n_features: int, density: float, seed: int) -> sp.csr_matrix:
    """Sparse counts ``1 + Poisson(rate)`` at ``density`` of each row's positions (uniform
    without replacement), rate from a 10-component model; generated 1000 rows at a time."""
    rng = np.random.default_rng(seed)
    per_row = round(density * n_features)
    loadings = rng.gamma(1.0, 0.3, (n_features, 10))
    blocks = []
    for start in range(0, n_samples, 1000):
        size = min(1000, n_samples - start)
        cols = np.argpartition(rng.random((size, n_features)), per_row, axis=1)[:, :per_row]
        activations = np.exp(rng.normal(0.0, 0.5, (size, 10)))
        rate = np.einsum("rl,rkl->rk", activations, loadings[cols])
        values = (1.0 + rng.poisson(rate)).astype(np.float32)
        indptr = np.arange(0, size * per_row + 1, per_row)
        block = sp.csr_matrix((values.ravel(), cols.ravel(), indptr), shape=(size, n_features))
        blocks.append(block)
    return sp.vstack(blocks, format="csr")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--features", type=int, default=2_000)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--components", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--modes", default="lower-bound,expanded")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="PNMF's device (default cpu; e.g. cuda)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    counts = generate_counts(args.samples, args.features, args.density, seed=0)
    generated_peak = peak_rss_mib()
    data_mib = (counts.data.nbytes + counts.indices.nbytes + counts.indptr.nbytes) / 2**20
    dense_mib = 10 * args.samples * args.features * 4 / 2**20
    print(
        f"counts: {counts.shape[0]} x {counts.shape[1]}, {counts.nnz} non-zeros "
        f"({counts.nnz / np.prod(counts.shape):.2%}), CSR {data_mib:.0f} MiB; "
        f"a dense (E=10, N, D) float32 tensor would be {dense_mib:.0f} MiB"
    )
    print(f"peak RSS after generating the data: {generated_peak:.0f} MiB")
    results = {
        "shape": list(counts.shape),
        "nnz": int(counts.nnz),
        "device": args.device,
        "peak_rss_mib_after_generation": generated_peak,
        "runs": [],
    }
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        before = peak_rss_mib()
        epoch_times: list[float] = []
        start = time.perf_counter()

        def record(iteration, value, state, start=start, epoch_times=epoch_times):
            epoch_times.append(time.perf_counter() - start)

        model = PNMF(
            n_components=args.components,
            training_mode="natural",
            mode=mode,
            batch_size=args.batch_size,
            max_iter=args.epochs,
            tol=0.0,
            random_state=0,
            device=args.device,
        )
        model.fit(counts, callback=record)
        seconds = time.perf_counter() - start
        run = {
            "mode": mode,
            "epochs": model.n_iter_,
            "batch_size": args.batch_size,
            "seconds": seconds,
            "seconds_per_epoch": float(np.diff([0.0, *epoch_times]).mean()),
            "elbo_per_epoch": model.elbo_history_.tolist(),
            "final_elbo": model.elbo_,
            "peak_rss_mib_before_fit": before,
            "peak_rss_mib_after_fit": peak_rss_mib(),
        }
        results["runs"].append(run)
        print(
            f"natural, {mode:<12} {run['epochs']} epochs of batch {args.batch_size}: "
            f"{seconds:.1f} s ({run['seconds_per_epoch']:.1f} s/epoch), "
            f"ELBO per epoch {[round(v) for v in run['elbo_per_epoch']]}, final {model.elbo_:.0f}; "
            f"peak RSS {before:.0f} -> {run['peak_rss_mib_after_fit']:.0f} MiB"
        )
    suffix = "" if args.device == "cpu" else "_" + args.device.replace(":", "")
    path = args.out / f"pnmf_scale{suffix}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
