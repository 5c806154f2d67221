"""Throughput on one GPU, two ranks: Lightning DDP against hybrid_sgd with one server (on rank 0) and with the
sharded server, K = N and K = 1, side by side in one run; a 10M and a ~100M-parameter MLP (fp32).

    PYTHONPATH=$PWD python benchmarks/gpu_throughput.py --out OUT             # the GPU table, within --budget s
    PYTHONPATH=$PWD python benchmarks/gpu_throughput.py --out OUT --cpu       # small models on CPU: checks this script

Both ranks share the one GPU: two torchrun "nodes" of one process each on 127.0.0.1 (``devices=1,
num_nodes=2``: Lightning refuses ``devices=2`` on one GPU), Lightning's default group on gloo (NCCL refuses two
ranks on one device); the server's traffic is gloo as always. Every configuration is a real run of
``throughput.py --run`` (its model and step timer). Each rank times its steps after a warm-up, the GPU's
work included (CUDA events, read after a synchronisation). The table shows rank 0's steps/s and samples/s,
both ranks' samples/s together, each against DDP's; rank 0's steps (K = 1 pulls work: ranks train different
numbers of batches), the server's time per update on rank 0, and rank 0's time per step from backward's end to
the answer loaded (push, wait, load: all after backward, while DDP's all-reduce overlaps it). Rows go to
OUT/throughput.txt and OUT/throughput.json as they are measured (a run stopped by its time limit keeps them); the
runs' output to OUT/throughput.log. A configuration that does not fit in what is left of ``--budget`` is skipped,
and says so.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from launch import run_on_nodes
from throughput import MODELS, BenchmarkMLP

THROUGHPUT = str(Path(__file__).with_name("throughput.py"))
RANKS = 2
CONFIGURATIONS = [
    ("ddp", "ddp"),
    (f"K={RANKS}", f"hybrid K=N={RANKS}"),
    ("K=1", "hybrid K=1"),
    (f"K={RANKS}/sharded", f"hybrid K=N={RANKS} sharded"),
    ("K=1/sharded", "hybrid K=1 sharded"),
]
# Run only when named in --strategies: the gradient streamed during backward (overlap_push), as DDP's buckets.
OVERLAP_CONFIGURATIONS = [
    (f"K={RANKS}/overlap", f"hybrid K=N={RANKS} overlap"),
    (f"K={RANKS}/sharded/overlap", f"hybrid K=N={RANKS} sharded overlap"),
]
# per model: (warm-up steps, steps per rank, seconds one configuration may take at most)
GPU_PLAN = {"10m": (10, 70, 90), "100m": (5, 35, 150)}
CPU_PLAN = {"1m": (5, 40, 90), "10m": (3, 15, 120)}
MIN_SECONDS = 30  # a configuration is not started with less left of the budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu", action="store_true", help="small models on CPU (a check of this script)")
    parser.add_argument("--models", nargs="+", default=None, choices=list(MODELS))
    parser.add_argument("--budget", type=float, default=330.0, help="seconds for the whole table")
    parser.add_argument("--batch", type=int, default=None, help="per rank (default: 256 on GPU, 64 on CPU)")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=None,
        choices=[flag for flag, _ in CONFIGURATIONS + OVERLAP_CONFIGURATIONS],
        help="these configurations, in the table's order (default: all but the overlap ones; without ddp the "
        "ratios show '-')",
    )
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget
    accelerator = "cpu" if args.cpu else "gpu"
    if accelerator == "gpu" and not torch.cuda.is_available():
        print("gpu_throughput.py: skipped, CUDA is absent (--cpu runs the same table on CPU)")
        return
    plan = CPU_PLAN if args.cpu else GPU_PLAN
    models = args.models or list(plan)
    batch = args.batch or (64 if args.cpu else 256)
    args.out.mkdir(parents=True, exist_ok=True)
    table, rows_file, log = args.out / "throughput.txt", args.out / "throughput.json", args.out / "throughput.log"
    device = torch.cuda.get_device_name(0) if accelerator == "gpu" else "CPU"
    lines: list[str] = []

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)
        table.write_text("\n".join(lines) + "\n")

    emit(
        f"throughput, {RANKS} ranks as two torchrun nodes on 127.0.0.1 (devices=1, num_nodes=2, default group "
        f"gloo), {time.strftime('%Y-%m-%d %H:%M')}: {device}, torch {torch.__version__}, pytorch-lightning "
        f"{pl.__version__}, float32, batch {batch} per rank"
    )
    header = (
        f"{'model':>5}  {'strategy':<30} {'r0 steps/s':>10} {'vs DDP':>7} {'r0 samples/s':>12} "
        f"{'all samples/s':>13} {'vs DDP':>7} {'r0 steps':>8} {'server ms/update':>16} {'r0 exchange ms/step':>19}"
    )
    rows: list[dict[str, Any]] = []
    chosen = (
        [c for c in CONFIGURATIONS + OVERLAP_CONFIGURATIONS if c[0] in args.strategies]
        if args.strategies
        else CONFIGURATIONS
    )
    work = tempfile.TemporaryDirectory()  # each run's rank{r}.json (their content goes to throughput.json)
    for model in models:
        warmup, steps, cap = plan.get(model, (5, 30, 150))
        numel = sum(p.numel() for p in BenchmarkMLP(MODELS[model]).parameters())
        emit(
            f"\n{model}: {numel:,} parameters ({numel * 4 / 2**20:.0f} MiB float32); {steps} steps per rank, "
            f"the first {warmup} untimed"
        )
        emit(header)
        emit("-" * len(header))
        ddp: dict[str, Any] | None = None
        for flag, name in chosen:
            left = deadline - time.monotonic()
            row: dict[str, Any] = {"model": model, "numel": numel, "strategy": flag, "batch": batch}
            if left < MIN_SECONDS:
                emit(f"{model:>5}  {name:<30} skipped: {left:.0f} s left of the {args.budget:.0f} s budget")
                rows.append({**row, "error": "skipped: time budget"})
                rows_file.write_text(json.dumps(rows, indent=1))
                continue
            started = time.monotonic()
            folder = Path(work.name, f"{model}-{flag.replace('/', '-').replace('=', '')}")
            ranks = run_on_nodes(
                THROUGHPUT,
                folder,
                RANKS,
                *("--strategy", flag, "--models", model, "--steps", str(steps), "--warmup", str(warmup)),
                *("--batch", str(batch), "--accelerator", accelerator, "--process-group-backend", "gloo"),
                timeout=min(cap, left),
                log=log,
            )
            seconds = time.monotonic() - started
            if any(rank is None or rank["rate"] is None for rank in ranks):
                why = "timed out" if seconds >= min(cap, left) - 1 else "failed"
                emit(f"{model:>5}  {name:<30} {why} after {seconds:.0f} s (see throughput.log)")
                rows.append({**row, "error": why, "ranks": ranks})
                rows_file.write_text(json.dumps(rows, indent=1))
                continue
            rate = ranks[0]["rate"]
            samples = batch * sum(rank["rate"] for rank in ranks)
            if flag == "ddp":
                ddp = {"rate": rate, "samples": samples}
            vs_rate = f"{rate / ddp['rate']:.2f}x" if ddp else "-"
            vs_samples = f"{samples / ddp['samples']:.2f}x" if ddp else "-"
            update_ms = f"{ranks[0]['update_ms']:.2f}" if "update_ms" in ranks[0] else "-"
            exchange_ms = f"{ranks[0]['exchange_ms']:.1f}" if "exchange_ms" in ranks[0] else "-"
            emit(
                f"{model:>5}  {name:<30} {rate:>10.2f} {vs_rate:>7} {batch * rate:>12.0f} {samples:>13.0f} "
                f"{vs_samples:>7} {ranks[0]['steps']:>8} {update_ms:>16} {exchange_ms:>19}"
            )
            rows.append(
                {
                    **row,
                    "rank0_steps_per_s": rate,
                    "rank0_samples_per_s": batch * rate,
                    "samples_per_s": samples,
                    "rank0_vs_ddp": rate / ddp["rate"] if ddp else None,
                    "samples_vs_ddp": samples / ddp["samples"] if ddp else None,
                    "seconds": seconds,
                    "ranks": ranks,
                }
            )
            rows_file.write_text(json.dumps(rows, indent=1))
    work.cleanup()
    emit(
        "\nr0: rank 0, which also hosts the single server (and shard 0); all samples/s: both ranks' own rates "
        "times the batch, summed. Both ranks share one device: read the ratios, not the absolute rates."
    )


if __name__ == "__main__":
    main()
