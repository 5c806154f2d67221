"""The paper's comparison in a fixed wall-clock budget: sync, async, the hybrid schedules and prior art.

    python benchmarks/experiment.py                                   # digits, 4 workers, rank 3 slowed 3x
    python benchmarks/experiment.py --data mnist --root ../shared/data/mnist --seeds 1 2 --budget 60

Every (method, seed) is one run of the Hydra app (``examples/train.py``) with ``trainer.max_time`` as
the budget, its own worker processes and an offline W&B run. The script prints a table (final loss
and accuracy, updates, mean staleness, seconds to the target accuracy; per seed, then mean ± std over
seeds) and writes a PNG of validation accuracy and loss against wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from lightning_hybrid.launcher import environment_for_a_new_launch

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "train.py"

# method -> app overrides; K for "backup" is N - 1 (one backup worker), set from --workers
METHODS: dict[str, list[str]] = {
    "ddp": ["strategy=ddp"],
    "sync (K=N)": ["strategy=sync"],
    "async (K=1)": ["strategy=async"],
    "hybrid linear": ["strategy=hybrid", "threshold=linear"],
    "hybrid exponential": ["strategy=hybrid", "threshold=exponential"],
    "hybrid cosine": ["strategy=hybrid", "threshold=cosine"],
    "hybrid step": ["strategy=hybrid", "threshold=step"],
    "backup workers (K=N-1)": ["strategy=sync"],
    "AdaSync": ["strategy=hybrid", "threshold=adasync"],
    "sync-first switch": ["strategy=hybrid", "threshold=switch"],
}


def run(method: str, seed: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    job = out / f"{method.replace(' ', '_').replace('(', '').replace(')', '').replace('=', '')}-seed{seed}"
    overrides = [
        *METHODS[method],
        f"seed={seed}",
        f"trainer.devices={args.workers}",
        f"trainer.max_time=00:00:00:{args.budget:02d}",
        "trainer.max_epochs=1000",
        f"data={args.data}",
        f"model.lr={args.lr}",
        f"delays.ranks=[{args.workers - 1}]",
        f"delays.slowdown={args.slowdown}",
        f"delays.extra.scale={args.compute}",
        f"hydra.run.dir={job}",
    ]
    if args.staleness_scaling and not method.startswith("ddp"):
        overrides.append("strategy.staleness_scaling=true")
    if method.startswith("backup"):
        overrides.append(f"strategy.threshold={args.workers - 1}")
    if args.root:
        overrides.append(f"data.root={Path(args.root).resolve()}")
    env = environment_for_a_new_launch()
    env.setdefault("WANDB_MODE", "offline")
    subprocess.run([sys.executable, str(TRAIN), *overrides], check=True, env=env, capture_output=True, text=True)
    return json.loads((job / "result.json").read_text())


def seconds_to(curve: list[dict[str, float]], target: float) -> Optional[float]:
    return next((point["seconds"] for point in curve if point.get("val_acc", 0.0) >= target), None)


def summary(values: list[Optional[float]], digits: int) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    if len(known) == 1:
        return f"{known[0]:.{digits}f}" + ("" if len(known) == len(values) else " (1 seed)")
    text = f"{statistics.mean(known):.{digits}f} ± {statistics.stdev(known):.{digits}f}"
    return text if len(known) == len(values) else f"{text} ({len(known)}/{len(values)} seeds)"


def plot(results: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy, loss) = plt.subplots(1, 2, figsize=(13, 5))
    for index, (method, runs) in enumerate(results.items()):
        color = f"C{index % 10}"
        for number, result in enumerate(runs):
            seconds = [p["seconds"] for p in result["curve"]]
            label = method if number == 0 else None
            style = "--" if method in ("ddp", "sync (K=N)", "async (K=1)") else "-"
            accuracy.plot(seconds, [p["val_acc"] for p in result["curve"]], style, color=color, label=label, alpha=0.8)
            loss.plot(seconds, [p["val_loss"] for p in result["curve"]], style, color=color, alpha=0.8)
    accuracy.set(xlabel="wall-clock seconds", ylabel="validation accuracy", title=title)
    loss.set(xlabel="wall-clock seconds", ylabel="validation loss", yscale="log")
    accuracy.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits", choices=["digits", "mnist", "cifar10"])
    parser.add_argument("--root", default=None, help="folder of the MNIST/CIFAR-10 files")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--slowdown", type=float, default=3.0, help="the last rank is this many times slower")
    parser.add_argument("--compute", type=float, default=0.02, help="simulated compute seconds per step, every rank")
    parser.add_argument("--budget", type=int, default=20, help="wall-clock seconds of training per run (< 60)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--lr", type=float, default=0.05, help="one learning rate for every method")
    parser.add_argument("--staleness-scaling", action="store_true", help="weigh gradients by 1/(1+staleness)")
    parser.add_argument("--target", type=float, default=0.9, help="accuracy for the time-to-target column")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--out", type=Path, default=Path("experiment_runs"))
    args = parser.parse_args()
    if not 0 < args.budget < 60:
        parser.error("--budget is in seconds and must lie in (0, 60)")

    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    for method in args.methods:
        results[method] = [run(method, seed, args, args.out) for seed in args.seeds]

    print(
        f"{args.data}, {args.workers} CPU workers, {args.compute * 1000:g} ms simulated compute per step, "
        f"rank {args.workers - 1} {args.slowdown:g}x slower, "
        f"{args.budget} s budget, lr {args.lr}, seeds {args.seeds}, staleness scaling "
        f"{'on' if args.staleness_scaling else 'off'}, {os.cpu_count()} CPU cores"
    )
    header = f"{'method':<24} {'seed':>4} {'val loss':>16} {'val acc':>16} {'updates':>12} {'staleness':>12} {'s to ' + str(args.target):>16}"
    print(header)
    print("-" * len(header))
    for method, runs in results.items():
        for seed, result in zip(args.seeds, runs):
            reach = seconds_to(result["curve"], args.target)
            print(
                f"{method:<24} {seed:>4} {result['val_loss']:>16.4f} {result['val_acc']:>16.4f} "
                f"{result.get('version', 0):>12} {result.get('staleness_mean', 0.0):>12.2f} "
                f"{'-' if reach is None else f'{reach:.1f}':>16}"
            )
        print(
            f"{method:<24} {'all':>4} {summary([r['val_loss'] for r in runs], 4):>16} "
            f"{summary([r['val_acc'] for r in runs], 4):>16} {summary([r.get('version', 0) for r in runs], 0):>12} "
            f"{summary([r.get('staleness_mean', 0.0) for r in runs], 2):>12} "
            f"{summary([seconds_to(r['curve'], args.target) for r in runs], 1):>16}"
        )
    figure = args.out / f"experiment-{args.data}.png"
    plot(results, figure, f"{args.data}: {args.workers} workers, rank {args.workers - 1} {args.slowdown:g}x slower")
    (args.out / f"experiment-{args.data}.json").write_text(json.dumps(results))
    print(f"plot: {figure}")


if __name__ == "__main__":
    main()
