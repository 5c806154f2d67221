"""Throughput against workers, model size and bandwidth: DDP, the single parameter server and a sharded one.

    python benchmarks/scaling_model.py                                  # 25M parameters, 10 Gb/s, 100 ms steps
    python benchmarks/scaling_model.py --params 1e8 --gbits 100 --compute-ms 250
    python benchmarks/throughput.py --json t.json && python benchmarks/scaling_model.py --check t.json

An analytic model of one step with equal workers (one per node), no overlap of communication with
compute, full-duplex links of ``B`` bytes/s per node, model ``M`` bytes, compute ``c`` per step and a
server update (optimizer step over the whole model) of ``u``:

* DDP, ring all-reduce:   t = c + 2 (N-1)/N M/B + u
* single server, K = N:    t = c + (N-1) M/B  [all gradients into rank 0]  + u + (N-1) M/B  [parameters out]
* single server, K = 1:    each worker t = c + 2 M/B + u, but the server takes at most min(B/M, 1/u) pushes/s
* sharded server, K = N:  t = c + 2 (N-1)/N M/B + u/N   (every rank serves 1/N of the model)
* sharded server, K = 1:  each worker t = c + 2 (N-1)/N M/B + u/N, at most N min(B/M, 1/u) pushes/s

``--check`` compares the model with the ratios ``throughput.py`` measured: compute ``c`` from the
one-process run (scaled by N / cores when N processes share this machine's cores), ``B`` from the
loopback ping-pong, ``u`` from the server's time per update.

``--fit-cluster docs/cluster.json`` (rows of ``cluster.py``, links shaped to a rate) fits, per model, ``c`` and
the link's efficiency ``eta`` (``B`` = ``eta`` times the shaped rate) on the two 2-node DDP rows (two rates: two
equations), with ``u`` = 0, and predicts every other row from them: the hybrid rows at 2 nodes and every row at
4 nodes (``c`` scaled by N / cores), none of which the fit saw.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path


def steps_per_second(design: str, n: int, model_bytes: float, bandwidth: float, compute: float, update: float) -> float:
    """All workers' steps per second under the model above."""
    transfer = model_bytes / bandwidth
    updates = 1 / update if update > 0 else math.inf  # the server's updates per second at most
    if design == "ddp":
        return n / (compute + 2 * (n - 1) / n * transfer + update)
    if design == "single K=N":
        return n / (compute + 2 * (n - 1) * transfer + update)
    if design == "single K=1":
        return min(n / (compute + 2 * transfer + update), 1 / transfer, updates)
    if design == "sharded K=N":
        return n / (compute + 2 * (n - 1) / n * transfer + update / n)
    if design == "sharded K=1":
        return min(n / (compute + 2 * (n - 1) / n * transfer + update / n), n / transfer, n * updates)
    raise ValueError(f"unknown design {design!r}")


DESIGNS = ["single K=N", "single K=1", "sharded K=N", "sharded K=1"]


def cluster_table(args: argparse.Namespace) -> None:
    model_bytes = 4 * args.params
    bandwidth = args.gbits * 1e9 / 8
    update = model_bytes * args.update_passes / (args.update_gbs * 1e9)
    compute = args.compute_ms / 1000
    print(
        f"{args.params:,.0f} parameters ({model_bytes / 2**20:.0f} MiB), {args.gbits:g} Gb/s per node, "
        f"{args.compute_ms:g} ms compute per step, server update {1000 * update:.2f} ms; throughput vs DDP"
    )
    print(f"{'workers':>7} {'DDP steps/s':>12} " + " ".join(f"{d:>12}" for d in DESIGNS))
    for n in args.workers:
        ddp = steps_per_second("ddp", n, model_bytes, bandwidth, compute, update)
        ratios = [steps_per_second(d, n, model_bytes, bandwidth, compute, update) / ddp for d in DESIGNS]
        print(f"{n:>7} {ddp:>12.1f} " + " ".join(f"{r:>11.2f}x" for r in ratios))


def check(path: Path, cores: int) -> None:
    """Predicted against measured ratios to DDP, for the rows of ``throughput.py --json``."""
    rows = json.loads(path.read_text())
    print(f"{'model':>5} {'workers':>7} {'strategy':<14} {'measured':>9} {'predicted':>9}")
    for row in rows:
        if row["strategy"] == "ddp" or row["update_ms"] is None:
            continue
        n = row["workers"]
        compute = row["alone_ms_per_step"] / 1000 * max(1.0, n / cores)
        model_bytes, update = 4 * row["numel"], row["update_ms"] / 1000
        threshold, _, variant = row["strategy"].partition("/")
        design = ("sharded" if variant == "sharded" else "single") + (" K=1" if threshold == "K=1" else " K=N")
        if variant == "sharded":
            update *= n  # rank 0 timed its own shard's updates: 1/N of the model
        predicted = steps_per_second(design, n, model_bytes, row["bandwidth"], compute, update) / steps_per_second(
            "ddp", n, model_bytes, row["bandwidth"], compute, update
        )
        print(f"{row['model']:>5} {n:>7} {row['strategy']:<14} {row['vs_ddp']:>8.2f}x {predicted:>8.2f}x")


def fit_cluster(path: Path, cores: int) -> None:
    """Fit ``c`` and ``eta`` per model on the 2-node DDP rows of ``cluster.py``'s JSON; predict the other rows."""
    data = json.loads(path.read_text())
    batch = int(data["settings"]["batch"])
    rows = [r for r in data["rows"] if r.get("samples_per_s")]
    print(f"{'model':>5} {'nodes':>5} {'Mbit/s':>6} {'strategy':<14} {'samples/s':>9} {'predicted':>9} {'error':>6}")
    for model in sorted({r["model"] for r in rows}):
        fitted = sorted((r for r in rows if (r["model"], r["nodes"], r["strategy"]) == (model, 2, "ddp")), key=rate)
        if len({rate(r) for r in fitted}) < 2:
            continue
        (x1, t1), (x2, t2) = [(4 * r["numel"] / rate(r), 2 * batch / r["samples_per_s"]) for r in fitted[:2]]
        slope = (t1 - t2) / (x1 - x2)  # t = c + M / (eta B) at N = 2
        compute, eta = t1 - slope * x1, 1 / slope
        print(f"{model}: fitted on the 2-node DDP rows: c = {1000 * compute:.1f} ms per step, eta = {eta:.2f}")
        for row in (r for r in rows if r["model"] == model):
            n, threshold, _, variant = row["nodes"], *row["strategy"].partition("/")
            if threshold == "ddp":
                design = "ddp"
            else:
                design = ("sharded" if variant == "sharded" else "single") + (" K=1" if threshold == "K=1" else " K=N")
            steps = steps_per_second(design, n, 4 * row["numel"], eta * rate(row), compute * max(1.0, n / cores), 0.0)
            predicted = steps * batch
            error = predicted / row["samples_per_s"] - 1
            seen = " (fitted)" if design == "ddp" and n == 2 else ""
            print(
                f"{model:>5} {n:>5} {row['rate_mbit']:>6.0f} {row['strategy']:<14} {row['samples_per_s']:>9.0f} "
                f"{predicted:>9.0f} {100 * error:>+5.0f}%{seen}"
            )


def rate(row: dict) -> float:
    """A cluster row's shaped link rate, bytes/s."""
    return row["rate_mbit"] * 1e6 / 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=25e6, help="model parameters (float32)")
    parser.add_argument("--gbits", type=float, default=10.0, help="link bandwidth per node, Gb/s")
    parser.add_argument("--compute-ms", type=float, default=100.0, help="forward + backward per step")
    parser.add_argument("--update-gbs", type=float, default=1000.0, help="server memory bandwidth, GB/s (GPU)")
    parser.add_argument("--update-passes", type=float, default=6.0, help="model-sized memory passes per update")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--check", type=Path, default=None, help="rows written by throughput.py --json")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="cores the measured processes shared")
    parser.add_argument("--fit-cluster", type=Path, default=None, help="rows written by cluster.py --out")
    args = parser.parse_args()
    if args.fit_cluster:
        fit_cluster(args.fit_cluster, args.cores)
    elif args.check:
        check(args.check, args.cores)
    else:
        cluster_table(args)


if __name__ == "__main__":
    main()
