"""The paper's comparison in a fixed wall-clock budget: sync, async, the hybrid schedules and prior art.

    python benchmarks/experiment.py                                   # digits, 4 workers, rank 3 slowed 3x
    python benchmarks/experiment.py --lr 0.02 0.05 0.1 --rules step momentum none
    python benchmarks/experiment.py --data mnist --root ../shared/data/mnist --slowed 2 --delay pareto

Every (method, learning rate, seed) is one run of the Hydra app (``examples/train.py``) with
``trainer.max_time`` as the budget and its own worker processes. With several learning rates the
script reports two protocols: every method at the learning rate that is best for sync (what users
do), and every method at its own best learning rate from the grid ("best" = lowest mean final
validation loss over the seeds). Each table gives final loss and accuracy, updates, mean staleness and
seconds to the target accuracy, per seed and mean ± std; a PNG plots accuracy and loss against
wall-clock time for both protocols. Time and curves come from rank 0's probe of its current model on 2,000
validation samples every ``--probe-every`` seconds (validation at epoch ends is too coarse: a synchronous
epoch can take the whole budget); final loss and accuracy from Lightning's validation at the end. Finished runs are
reused when the script is run again with the same settings and ``--out``, so an interrupted grid picks up where it
stopped.

``--rules`` names the update rules that every method whose gradients can be stale runs with (one row per
method and rule, e.g. ``hybrid linear [step]``): how an update is sized to its group (``group_scaling``),
alone or with the staleness-aware weighting or a staleness bound. Sync and DDP have no stale gradients and run
once. Threshold schedules count progress in percent of the time budget (``threshold.progress=time``): a ramp
spans the whole budget and the switch happens half-way, whatever the speed of the method.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from lightning_hybrid.launcher import environment_for_a_new_launch

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "train.py"
SYNC = "sync (K=N)"
OVER_THE_BUDGET = ["threshold.progress=time"]  # a named ramp without a length spans max_time (ThresholdScheduler)

# method -> app overrides; K for "backup" is N - 1 (one backup worker), set from --workers
METHODS: dict[str, list[str]] = {
    "ddp": ["strategy=ddp"],
    SYNC: ["strategy=sync"],
    "async (K=1)": ["strategy=async"],
    "hybrid K=50% (default)": ["strategy=hybrid", "strategy.scheduled=false", "strategy.threshold=50%"],
    "hybrid linear": ["strategy=hybrid", "threshold=linear", *OVER_THE_BUDGET],
    "hybrid exponential": ["strategy=hybrid", "threshold=exponential", *OVER_THE_BUDGET],
    "hybrid cosine": ["strategy=hybrid", "threshold=cosine", *OVER_THE_BUDGET],
    "hybrid cosine from 50%": ["strategy=hybrid", "threshold=cosine_from_half", *OVER_THE_BUDGET],
    "hybrid step": ["strategy=hybrid", "threshold=step", *OVER_THE_BUDGET],
    "backup workers (K=N-1)": ["strategy=sync"],
    "AdaSync": ["strategy=hybrid", "threshold=adasync"],
    "sync-first switch": ["strategy=hybrid", "threshold=switch", "threshold.progress=time", "threshold.options.at=50"],
}
# methods whose gradients can be stale, so the update rules change them
STALE = [method for method in METHODS if method not in ("ddp", SYNC)]
# update rules; "{bound}" is --max-staleness
RULES: dict[str, list[str]] = {
    "default": [],  # HybridSGDStrategy's defaults: group_scaling=step with staleness_scaling on
    "default+pipelined": ["strategy.pipeline_pushes=true"],  # the defaults, a gradient one update staler
    "default+bf16": ["strategy.answer_dtype=bfloat16"],  # the defaults, workers compute on bfloat16 weights
    "default+pipelined+bf16": ["strategy.pipeline_pushes=true", "strategy.answer_dtype=bfloat16"],
    # and the server steps on bfloat16 gradients
    "default+bf16both": ["strategy.answer_dtype=bfloat16", "strategy.push_dtype=bfloat16"],
    "auto": ["strategy.group_scaling=auto", "strategy.staleness_scaling=false"],
    "auto+weighted": ["strategy.group_scaling=auto", "strategy.staleness_scaling=true"],
    "auto+bound": ["strategy.group_scaling=auto", "strategy.staleness_scaling=false", "strategy.max_staleness={bound}"],
    "none": ["strategy.group_scaling=none", "strategy.staleness_scaling=false"],
    "step": ["strategy.group_scaling=step", "strategy.staleness_scaling=false"],
    "sqrt": ["strategy.group_scaling=sqrt_step", "strategy.staleness_scaling=false"],
    "momentum": ["strategy.group_scaling=momentum", "strategy.staleness_scaling=false"],
    "none+weighted": ["strategy.group_scaling=none", "strategy.staleness_scaling=true"],
    "step+weighted": ["strategy.group_scaling=step", "strategy.staleness_scaling=true"],
    "momentum+weighted": ["strategy.group_scaling=momentum", "strategy.staleness_scaling=true"],
    "step+bound": ["strategy.group_scaling=step", "strategy.staleness_scaling=false", "strategy.max_staleness={bound}"],
    "momentum+bound": [
        "strategy.group_scaling=momentum",
        "strategy.staleness_scaling=false",
        "strategy.max_staleness={bound}",
    ],
}


def split_row(row: str) -> tuple[str, Optional[str]]:
    """``"hybrid linear [step]"`` -> ``("hybrid linear", "step")``; sync and DDP rows have no rule."""
    method, _, rule = row.partition(" [")
    return method, rule.removesuffix("]") or None


Runs = dict[tuple[str, float], list[dict[str, Any]]]


def overrides_for(row: str, lr: float, seed: int, args: argparse.Namespace, job: Path) -> list[str]:
    base, rule = split_row(row)
    overrides = [
        *METHODS[base],
        *(override.format(bound=args.max_staleness) for override in RULES.get(rule or "", [])),
        f"seed={seed}",
        f"trainer.devices={args.workers}",
        f"trainer.max_time=00:00:00:{args.budget:02d}",
        "trainer.max_epochs=1000",
        "logger=csv",  # the table reads result.json; W&B's start-up would only cost time
        f"data={args.data}",
        f"model.lr={lr}",
        f"model.optimizer={args.optimizer}",
        f"model.name={args.model}",
        f"delays.ranks=[{','.join(str(rank) for rank in slowed_ranks(args))}]",
        f"delays.slowdown={args.slowdown}",
        f"delays.extra.kind={args.delay}",
        f"delays.extra.scale={args.compute}",
        f"hydra.run.dir={job}",
        f"probe_every={args.probe_every}",
    ]
    if base.startswith("backup"):
        overrides.append(f"strategy.threshold={args.workers - 1}")
    if args.root:
        overrides.append(f"data.root={Path(args.root).resolve()}")
    return overrides


def slowed_ranks(args: argparse.Namespace) -> list[int]:
    return list(range(args.workers - args.slowed, args.workers))


def run(method: str, lr: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One app run, or its saved result when the same overrides already ran into the same folder."""
    name = method
    for character in " ()=+[]":
        name = name.replace(character, "_" if character in " [" else "")
    job = args.out / f"{name}-lr{lr:g}-seed{seed}"
    overrides = overrides_for(method, lr, seed, args, job)
    saved, result = job / "overrides.json", job / "result.json"
    if result.exists() and saved.exists() and json.loads(saved.read_text()) == overrides:
        return json.loads(result.read_text())
    env = environment_for_a_new_launch()
    env.setdefault("WANDB_MODE", "offline")
    finished = subprocess.run([sys.executable, str(TRAIN), *overrides], env=env, capture_output=True, text=True)
    if finished.returncode != 0:
        print(f"{method}, lr {lr:g}, seed {seed} failed:\n{finished.stderr[-2000:]}", file=sys.stderr)
        return {"failed": True, "val_loss": math.nan, "val_acc": math.nan, "curve": []}
    saved.write_text(json.dumps(overrides))
    return json.loads(result.read_text())


def mean_loss(runs: list[dict[str, Any]]) -> float:
    """Mean final validation loss; a failed or diverged run makes the setting lose every comparison."""
    losses = [run["val_loss"] for run in runs]
    return math.inf if any(not math.isfinite(loss) for loss in losses) else statistics.mean(losses)


def best_lr(results: Runs, method: str, lrs: list[float]) -> float:
    return min(lrs, key=lambda lr: mean_loss(results[method, lr]))


def trajectory(result: dict[str, Any]) -> list[tuple[float, float, float]]:
    """(seconds, accuracy, loss) over the run: rank 0's probes (every ``--probe-every`` s) where the run has
    them, else its validations (at epoch ends only)."""
    if result.get("probes"):
        return [(p["seconds"], p["probe_acc"], p["probe_loss"]) for p in result["probes"]]
    return [(p["seconds"], p.get("val_acc", 0.0), p.get("val_loss", math.nan)) for p in result["curve"]]


def seconds_to(result: dict[str, Any], target: float) -> Optional[float]:
    return next((seconds for seconds, accuracy, _ in trajectory(result) if accuracy >= target), None)


def summary(values: list[Optional[float]], digits: int) -> str:
    known = [v for v in values if v is not None and math.isfinite(v)]
    if not known:
        return "-"
    if len(known) == 1:
        return f"{known[0]:.{digits}f}" + ("" if len(known) == len(values) else " (1 seed)")
    text = f"{statistics.mean(known):.{digits}f} ± {statistics.stdev(known):.{digits}f}"
    return text if len(known) == len(values) else f"{text} ({len(known)}/{len(values)} seeds)"


def print_table(title: str, chosen: dict[str, float], results: Runs, args: argparse.Namespace) -> None:
    print(f"\n{title}")
    header = (
        f"{'method':<44} {'lr':>6} {'seed':>4} {'val loss':>16} {'val acc':>16} {'updates':>12} "
        f"{'staleness':>12} {'s to ' + str(args.target):>14}"
    )
    print(header)
    print("-" * len(header))
    for method, lr in chosen.items():
        runs = results[method, lr]
        for seed, result in zip(args.seeds, runs):
            if result.get("failed"):
                print(f"{method:<44} {lr:>6g} {seed:>4} {'failed':>16}")
                continue
            reach = seconds_to(result, args.target)
            print(
                f"{method:<44} {lr:>6g} {seed:>4} {result['val_loss']:>16.4f} {result['val_acc']:>16.4f} "
                f"{result.get('version', 0):>12} {result.get('staleness_mean', 0.0):>12.2f} "
                f"{'-' if reach is None else f'{reach:.1f}':>14}"
            )
        print(
            f"{method:<44} {lr:>6g} {'all':>4} {summary([r['val_loss'] for r in runs], 4):>16} "
            f"{summary([r['val_acc'] for r in runs], 4):>16} {summary([r.get('version') for r in runs], 0):>12} "
            f"{summary([r.get('staleness_mean') for r in runs], 2):>12} "
            f"{summary([seconds_to(r, args.target) for r in runs], 1):>14}"
        )


def plot(protocols: dict[str, dict[str, float]], results: Runs, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(protocols), 2, figsize=(14, 5 * len(protocols)), squeeze=False)
    for (protocol, chosen), (accuracy, loss) in zip(protocols.items(), axes):
        for index, (method, lr) in enumerate(chosen.items()):
            color = f"C{index % 10}"
            rule = split_row(method)[1]
            style = "--" if method in ("ddp", SYNC) else ":" if rule and rule != "step" else "-"
            for number, result in enumerate(results[method, lr]):
                seconds, accuracies, losses = zip(*trajectory(result)) if trajectory(result) else ((), (), ())
                label = f"{method} (lr {lr:g})" if number == 0 else None
                accuracy.plot(seconds, accuracies, style, color=color, label=label)
                loss.plot(seconds, losses, style, color=color, alpha=0.8)
        accuracy.set(xlabel="wall-clock seconds", ylabel="validation accuracy", title=f"{title}: {protocol}")
        loss.set(xlabel="wall-clock seconds", ylabel="validation loss", yscale="log")
        accuracy.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits", choices=["digits", "mnist", "cifar10"])
    parser.add_argument("--root", default=None, help="folder of the MNIST/CIFAR-10 files")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--slowed", type=int, default=1, help="how many ranks (the last ones) are slowed")
    parser.add_argument("--slowdown", type=float, default=3.0, help="slowed ranks are this many times slower")
    parser.add_argument("--compute", type=float, default=0.02, help="simulated compute seconds per step, every rank")
    parser.add_argument("--delay", default="fixed", choices=["fixed", "uniform", "pareto"], help="compute's law")
    parser.add_argument("--budget", type=int, default=20, help="wall-clock seconds of training per run (< 60)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--lr", type=float, nargs="+", default=[0.05], help="learning rate grid")
    parser.add_argument(
        "--optimizer", default="sgd", choices=["sgd", "adam", "adamw", "rmsprop"], help="sgd has momentum 0.9"
    )
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    parser.add_argument(
        "--rules", nargs="+", default=["default"], choices=list(RULES), help="update rules of the stale methods"
    )
    parser.add_argument("--max-staleness", type=int, default=None, help="the bound of the +bound rules (default 2N)")
    parser.add_argument("--target", type=float, default=0.9, help="accuracy for the time-to-target column")
    parser.add_argument("--probe-every", type=float, default=1.0, help="seconds between rank 0's accuracy probes")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--out", type=Path, default=Path("experiment_runs"))
    args = parser.parse_args()
    if not 0 < args.budget < 60:
        parser.error("--budget is in seconds and must lie in (0, 60)")
    if not 0 <= args.slowed < args.workers:
        parser.error(f"--slowed must lie in [0, --workers - 1 = {args.workers - 1}]")
    if len(args.lr) > 1 and SYNC not in args.methods:
        parser.error(f"a learning rate grid needs {SYNC!r} among --methods: its best rate is the shared one")

    args.max_staleness = args.max_staleness or 2 * args.workers
    methods = [m for m in args.methods if m not in STALE]
    methods += [f"{m} [{rule}]" for m in args.methods if m in STALE for rule in args.rules]
    args.out.mkdir(parents=True, exist_ok=True)
    results: Runs = {}
    for method in methods:
        for lr in args.lr:
            results[method, lr] = [run(method, lr, seed, args) for seed in args.seeds]
            (args.out / f"experiment-{args.data}.json").write_text(
                json.dumps([{"method": m, "lr": r, "runs": runs} for (m, r), runs in results.items()])
            )

    print(
        f"{args.data}, {args.workers} CPU workers, {args.compute * 1000:g} ms simulated compute per step "
        f"({args.delay}), ranks {slowed_ranks(args)} {args.slowdown:g}x slower, {args.budget} s budget, "
        f"{args.model}, {args.optimizer}, lr grid {args.lr}, seeds {args.seeds}, {os.cpu_count()} CPU cores, "
        f"rules {args.rules} (bound {args.max_staleness})"
    )
    if len(args.lr) == 1:
        protocols = {f"lr {args.lr[0]:g}": {method: args.lr[0] for method in methods}}
    else:
        shared = best_lr(results, SYNC, args.lr)
        protocols = {
            f"shared lr {shared:g} (sync's best)": {method: shared for method in methods},
            "each method's best lr": {method: best_lr(results, method, args.lr) for method in methods},
        }
    for protocol, chosen in protocols.items():
        print_table(protocol, chosen, results, args)
    figure = args.out / f"experiment-{args.data}.png"
    slowed = f"{args.slowed} of {args.workers} workers {args.slowdown:g}x slower"
    plot(protocols, results, figure, f"{args.data}, {slowed}")
    print(f"\nplot: {figure}")


if __name__ == "__main__":
    main()
