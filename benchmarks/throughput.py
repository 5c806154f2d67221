"""Throughput of hybrid_sgd (K = N and K = 1, with one server on rank 0 and sharded over all ranks) against
Lightning's DDP with equal workers, side by side.

    python benchmarks/throughput.py                                  # 2 and 4 CPU workers, 1M and 10M models
    python benchmarks/throughput.py --workers 2 --models 1m --steps 100 --overlap

Every configuration is a real multi-process Lightning run (this script relaunched with ``--run``).
Each rank times its steps after a warm-up. The table shows samples/s of all workers together and the
ratio to DDP with the same workers and model; on the server's rank (rank 0) the time per update
(finiteness checks, gradient sum, optimizer step, parameter snapshot; with a sharded server rank 0's shard) and peak RSS
against DDP's rank 0; the bytes a remote worker moves per step; and the loopback bandwidth of a gloo send measured first
in the same run.

Its ``--run`` mode (one configuration; each rank writes its measurement) also serves ``gpu_throughput.py``, as
``--configuration`` under torchrun: two "nodes" of one process on one GPU (``--accelerator gpu --num-nodes 2
--process-group-backend gloo``), and ``cluster.py``, one torchrun node per network namespace (``--net-device``:
each step end's byte counters of that interface and CPU seconds of the rank; ``--whole-epoch``: no per-rank step
limit, so that pulled work shares out all ``steps * workers`` batches).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from launch import run_configuration, write_result
from pytorch_lightning.strategies import DDPStrategy
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader, TensorDataset

import lightning_hybrid

BATCH, CLASSES = 64, 10
# name -> layer widths: 1m = 1,058,058, 10m = 9,985,290, 50m = 50,366,474 and 100m = 100,728,842 parameters
# (50m: for the emulated cluster, cluster.py; 100m: for GPUs)
MODELS = {
    "1m": [256, 1024, 768, CLASSES],
    "10m": [1024, 2048, 2048, 1792, CLASSES],
    "50m": [2048, 4096, 4096, 4096, 2048, CLASSES],
    "100m": [4096] * 7 + [CLASSES],
}


class BenchmarkMLP(pl.LightningModule):
    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths, widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class StepTimer(pl.Callback):
    """This rank's training steps per second after ``warmup`` steps: from the end of the last warm-up step to
    the end of the last step. On a GPU the ends are CUDA events, read after a synchronisation: the window
    closes when the GPU has finished the last step's work, without a stall per step."""

    def __init__(self, warmup: int, net_device: str | None = None) -> None:
        self.warmup = warmup
        self.times: list[Any] = []  # perf_counter() per step end; on a GPU a CUDA event
        # with net_device (cluster.py): per step end, that interface's byte counters, this process's CPU seconds
        # and the seconds hybrid_sgd's worker has spent in its exchanges with the server so far (0 under DDP)
        self.net_device = net_device
        self.trace: dict[str, list[float]] = {"tx_bytes": [], "rx_bytes": [], "cpu_seconds": [], "wait_seconds": []}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.strategy.root_device.type == "cuda":
            self.times.append(torch.cuda.Event(enable_timing=True))
            self.times[-1].record()
        else:
            self.times.append(time.perf_counter())
        if self.net_device is not None:
            for counter in ("tx_bytes", "rx_bytes"):
                path = Path("/sys/class/net", self.net_device, "statistics", counter)
                self.trace[counter].append(int(path.read_text()))
            self.trace["cpu_seconds"].append(time.process_time())
            self.trace["wait_seconds"].append(getattr(trainer.strategy, "wait_seconds", 0.0))

    @property
    def steps(self) -> int:
        return len(self.times)

    def rate(self) -> float | None:
        """Steps per second; None if this rank trained fewer than two steps after the warm-up."""
        timed = self.times[self.warmup :]
        if len(timed) < 2:
            return None
        if isinstance(timed[0], float):
            return (len(timed) - 1) / (timed[-1] - timed[0])
        torch.cuda.synchronize()
        return (len(timed) - 1) / (timed[0].elapsed_time(timed[-1]) / 1000)


class BF16GradientsDDP(DDPStrategy):
    """Lightning's DDP with its gradients all-reduced in bfloat16, as ``bf16_compress_hook`` does. Lightning
    registers a ``ddp_comm_hook`` on CUDA only, and DDP refuses that hook by name without NCCL, though gloo
    all-reduces bfloat16: here it is registered on any device, under another name."""

    def _register_ddp_hooks(self) -> None:
        self.model.register_comm_hook(None, bf16_gradients)


def bf16_gradients(process_group, bucket):  # type: ignore[no-untyped-def]
    """``bf16_compress_hook`` (see :class:`BF16GradientsDDP`). Unannotated: DDP compares a hook's annotations with
    ``GradBucket`` and ``Future[Tensor]``, and this module's annotations are strings."""
    return default_hooks.bf16_compress_hook(process_group, bucket)


def run_one(args: argparse.Namespace) -> None:
    """One configuration; Lightning's launcher starts the other ranks by re-running this command."""
    torch.set_num_threads(1)
    pl.seed_everything(0)
    widths = MODELS[args.models[0]]
    samples = args.batch * args.steps * args.workers
    data = TensorDataset(torch.randn(samples, widths[0]), torch.randint(0, CLASSES, (samples,)))
    backend = args.process_group_backend
    if args.strategy == "single":
        strategy: Any = "auto"
    elif args.strategy in ("ddp", "ddp/bf16"):  # "/bf16": gradients all-reduced in bfloat16 (DDP's comm hook)
        strategy = (DDPStrategy if args.strategy == "ddp" else BF16GradientsDDP)(process_group_backend=backend)
    else:  # "K=<k>", then "/sharded" (or "/sharded=<share>:<share>:..." with shard_weights), "/overlap", "/answers"
        # (overlap_answers), "/pipelined", "/bf16" (answer_dtype="bfloat16"), "/bf16push" (push_dtype="bfloat16")
        threshold, *variants = args.strategy.removeprefix("K=").split("/")
        shares = next((v.removeprefix("sharded=") for v in variants if v.startswith("sharded=")), None)
        strategy = lightning_hybrid.HybridSGDStrategy(
            threshold=int(threshold),
            overlap_push="overlap" in variants,
            overlap_answers="answers" in variants,
            pipeline_pushes="pipelined" in variants,
            answer_dtype="bfloat16" if "bf16" in variants else None,
            push_dtype="bfloat16" if "bf16push" in variants else None,
            shard_server="sharded" in variants or shares is not None,
            shard_weights=None if shares is None else [float(share) for share in shares.split(":")],
            process_group_backend=backend,
        )
    warmup = min(10, args.steps // 4) if args.warmup is None else args.warmup
    timer = StepTimer(warmup, net_device=args.net_device)
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator=args.accelerator,
        devices=args.workers // args.num_nodes,
        num_nodes=args.num_nodes,
        max_epochs=1,
        # --whole-epoch (cluster.py): steps * workers batches in all, however pulled work shares them out
        limit_train_batches=None if args.whole_epoch else args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(BenchmarkMLP(widths), DataLoader(data, batch_size=args.batch))
    result: dict[str, Any] = {
        "rate": timer.rate(),
        "steps": timer.steps,
        "device": str(trainer.strategy.root_device),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if args.strategy.startswith("K="):  # exchange: from backward's end to the answer loaded, warm-up steps included
        result["exchange_ms"] = 1000 * strategy.wait_seconds / max(strategy.steps, 1)
        if trainer.is_global_zero:
            progress = strategy.progress
            result["update_ms"] = 1000 * progress["update_seconds"] / max(progress["version"], 1)
    if args.net_device is not None:  # perf_counter is CLOCK_MONOTONIC: comparable between this machine's processes
        result.update(step_ends=timer.times, **timer.trace)
    write_result(args.out, trainer.global_rank, result)


def _bandwidth_rank(rank: int, port: int, numel: int, repeats: int, out: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    buffer = torch.zeros(numel)
    for round_ in range(repeats + 1):
        if round_ == 1:
            started = time.perf_counter()
        dist.send(buffer, dst=1) if rank == 0 else dist.recv(buffer, src=0)
        dist.recv(buffer, src=1) if rank == 0 else dist.send(buffer, dst=0)
    if rank == 0:
        out.put(2 * repeats * numel * 4 / (time.perf_counter() - started))
    dist.destroy_process_group()


def loopback_bandwidth(numel: int, repeats: int = 20) -> float:
    """Bytes/s of a gloo send between two processes over 127.0.0.1 (a ping-pong, one direction at a time)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    out = context.Queue()
    processes = [context.Process(target=_bandwidth_rank, args=(r, port, numel, repeats, out)) for r in (0, 1)]
    for process in processes:
        process.start()
    rate = out.get(timeout=300)
    for process in processes:
        process.join()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --run under torchrun reads as an ambiguous abbreviation of its --run-path: there the same as --configuration
    parser.add_argument("--run", "--configuration", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--accelerator", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--num-nodes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--process-group-backend", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    parser.add_argument("--net-device", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--whole-epoch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--models", nargs="+", default=["1m", "10m"], choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=80, help="steps per worker")
    parser.add_argument("--overlap", action="store_true", help="also run K=N with overlap_push (one server, sharded)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here (for scaling_model.py)")
    args = parser.parse_args()
    if args.run:
        args.workers = args.workers[0]
        run_one(args)
        return

    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, batch {BATCH}, {args.steps} steps per worker")
    header = (
        f"{'model':>5} {'workers':>7}  {'strategy':<22} {'samples/s':>9} {'vs DDP':>7} {'server ms/update':>16} "
        f"{'rank-0 peak RSS MiB':>19} {'MiB/step/worker':>15} {'loopback GB/s':>13}"
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            numel = sum(p.numel() for p in BenchmarkMLP(MODELS[model]).parameters())
            bandwidth = loopback_bandwidth(numel)
            (alone,) = run_configuration(
                __file__, Path(tmp, f"{model}-single"), 1, "--strategy", "single", "--models", model
            )
            print(
                f"\n{model}: {numel:,} parameters ({numel * 4 / 2**20:.1f} MiB float32); one process alone "
                f"(no communication): {BATCH * alone['rate']:.0f} samples/s, {1000 / alone['rate']:.2f} ms/step"
            )
            print(header)
            print("-" * len(header))
            for workers in args.workers:
                ddp_samples, ddp_rss = 0.0, 0.0
                configurations = ["ddp", f"K={workers}"] + [f"K={workers}/overlap"] * args.overlap
                configurations += ["K=1", f"K={workers}/sharded"] + [f"K={workers}/sharded/overlap"] * args.overlap
                for flag in configurations + ["K=1/sharded"]:
                    strategy = flag if flag == "ddp" else f"hybrid {flag}"
                    folder = Path(tmp, f"{model}-{workers}-{flag.replace('/', '-')}")
                    flags = ("--strategy", flag, "--steps", str(args.steps), "--models", model)
                    ranks = run_configuration(__file__, folder, workers, *flags)
                    samples, rss = BATCH * sum(r["rate"] for r in ranks), ranks[0]["peak_rss_mib"]
                    if strategy == "ddp":
                        ddp_samples, ddp_rss = samples, rss
                    update_ms = f"{ranks[0]['update_ms']:.2f}" if "update_ms" in ranks[0] else "-"
                    memory = f"{rss:.0f}" if strategy == "ddp" else f"{rss:.0f} ({rss - ddp_rss:+.0f})"
                    # a remote worker sends a gradient and receives parameters: 2 model sizes per step; DDP's
                    # ring all-reduce and a sharded server's worker (N-1 of N slices) move 2 (N-1)/N per rank
                    factor = 2 * (workers - 1) / workers if strategy == "ddp" or "sharded" in flag else 2
                    rows.append(
                        {
                            "model": model,
                            "numel": numel,
                            "workers": workers,
                            "strategy": flag,
                            "samples_per_s": samples,
                            "vs_ddp": samples / ddp_samples,
                            "update_ms": ranks[0].get("update_ms"),
                            "alone_ms_per_step": 1000 / alone["rate"],
                            "bandwidth": bandwidth,
                        }
                    )
                    print(
                        f"{model:>5} {workers:>7}  {strategy:<22} {samples:>9.0f} {samples / ddp_samples:>6.2f}x "
                        f"{update_ms:>16} {memory:>19} {factor * numel * 4 / 2**20:>15.1f} {bandwidth / 1e9:>13.2f}"
                    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
