"""A prototype, not the library: would a sharded server at K = N keep up with DDP on a cluster's links if each
shard answered a chunk as soon as every worker's gradient of that chunk is in, and if the chunks were striped
over the shards? Measured on the emulated cluster (``netns_cluster.py``; needs root), in plain torch.distributed
with gloo, without Lightning, so that only the exchange differs between the rows:

* ``ddp``: torch's DistributedDataParallel (25 MiB buckets, its ring all-reduce overlapping backward), then SGD;
* the exchange: each rank is a worker and one shard. A post-accumulate-grad hook packs each gradient into a flat
  buffer and sends each chunk to the shard that owns it once backward has produced all of it; a thread per rank
  steps each of its chunks once all N gradients of it are in (SGD on the mean) and sends it to every worker at
  once, or with ``--answer-at-end`` only after its last chunk. ``--chunk-mb 0``: one chunk per shard, the
  shards' contiguous slices (the library's :class:`ShardPlan`, with ``overlap_push``); ``--stripe``: chunk ``c``
  belongs to shard ``c mod N``, so that the chunks backward produces at one moment go to every shard's link,
  not all to the last shard's. ``--answers all`` posts the receives of every answer at the start of the step,
  ``rotate`` takes shard r+1's, then r+2's, ... (as the library's worker does).

Plain SGD without momentum, one batch of 64 per rank reused, K = N only; no NaN verdict, unused parameters or
clipping (``docs/cluster-chunkwise-prototype.txt`` lists what the library would need). Each row prints the sum
of the final parameters; ``tests/test_cluster.py`` checks on 2 nodes that every exchange ends every rank with
DDP's parameters.

    sudo .venv/bin/python benchmarks/chunkwise_prototype.py --nodes 4 --model 10m --rate 250 --reps 2 \\
        --configs "--chunk-mb 0 --answers all" "--stripe --chunk-mb 1 --answers all"
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from netns_cluster import EmulatedCluster, run_torchrun
from throughput import BATCH, CLASSES, MODELS, BenchmarkMLP
from torch import nn

ANSWER_TAG = 1 << 20  # answers' tags: this plus the chunk's number (a push's tag is the chunk's number)
LR = 0.01


def chunk_plan(total: int, ranks: int, chunk_elements: int, stripe: bool) -> list[tuple[int, int, int]]:
    """(owning shard, first element, end) of every chunk of a flat buffer of ``total`` elements."""
    if stripe:
        starts = range(0, total, chunk_elements)
        return [(c % ranks, a, min(a + chunk_elements, total)) for c, a in enumerate(starts)]
    chunks = []
    for shard in range(ranks):
        start, end = total * shard // ranks, total * (shard + 1) // ranks
        step = chunk_elements if chunk_elements > 0 else end - start
        chunks += [(shard, a, min(a + step, end)) for a in range(start, end, step)]
    return chunks


class ChunkwiseExchange:
    """This rank's worker and shard: pushes chunks as backward produces them, steps and answers its own."""

    def __init__(self, model: nn.Module, args: argparse.Namespace) -> None:
        self.rank, self.ranks = dist.get_rank(), dist.get_world_size()
        self.params = list(model.parameters())
        self.offsets = [sum(p.numel() for p in self.params[:i]) for i in range(len(self.params))]
        total = sum(p.numel() for p in self.params)
        self.flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        for p, offset in zip(self.params, self.offsets):
            p.data = self.flat[offset : offset + p.numel()].view_as(p)
        self.grad, self.answers = torch.zeros(total), torch.zeros(total)
        self.chunks = chunk_plan(total, self.ranks, int(args.chunk_mb * 2**20 / 4), args.stripe)
        self.answer_at_end, self.answer_all = args.answer_at_end, args.answers == "all"
        self.tensors_of = [
            [i for i, (p, o) in enumerate(zip(self.params, self.offsets)) if o < end and o + p.numel() > start]
            for _, start, end in self.chunks
        ]
        self.chunks_of = [[c for c, ts in enumerate(self.tensors_of) if i in ts] for i in range(len(self.params))]
        self.mine = [c for c, (shard, _, _) in enumerate(self.chunks) if shard == self.rank]
        self.remote = [(self.rank + k) % self.ranks for k in range(1, self.ranks)]
        self.received = {
            w: {c: torch.zeros(self.chunks[c][2] - self.chunks[c][1]) for c in self.mine} for w in self.remote
        }
        self.sends: list[dist.Work] = []
        self.missing: list[int] = []
        self.local_ready: dict[int, threading.Event] = {}
        for i, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(lambda p, i=i: self._packed(i, p))

    def _packed(self, index: int, param: torch.Tensor) -> None:
        offset = self.offsets[index]
        self.grad[offset : offset + param.numel()].copy_(param.grad.reshape(-1))
        param.grad = None
        for c in self.chunks_of[index]:
            self.missing[c] -= 1
            if self.missing[c] == 0:
                shard, start, end = self.chunks[c]
                if shard == self.rank:
                    self.local_ready[c].set()
                else:
                    self.sends.append(dist.isend(self.grad[start:end], dst=shard, tag=c))

    def _serve(self, pushes: dict[int, dict[int, dist.Work]], answers: list[dist.Work]) -> None:
        for c in reversed(self.mine):  # in the order backward produces them: last parameters first
            self.local_ready[c].wait()
            _, start, end = self.chunks[c]
            mean = self.grad[start:end].clone()
            for worker in self.remote:
                pushes[worker][c].wait()
                mean += self.received[worker][c]
            self.flat[start:end].sub_(mean, alpha=LR / self.ranks)
            if not self.answer_at_end:
                answers += self._answer(c, self.remote)
        if self.answer_at_end:
            for worker in self.remote:
                for c in reversed(self.mine):
                    answers += self._answer(c, [worker])

    def _answer(self, chunk: int, workers: list[int]) -> list[dist.Work]:
        """Send this shard's chunk ``chunk`` of the parameters to ``workers``."""
        _, start, end = self.chunks[chunk]
        return [dist.isend(self.flat[start:end], dst=w, tag=ANSWER_TAG + chunk) for w in workers]

    def _receive_answers(self, shards: list[int]) -> list[dist.Work]:
        return [
            dist.irecv(self.answers[start:end], src=shard, tag=ANSWER_TAG + c)
            for c, (shard, start, end) in enumerate(self.chunks)
            if shard in shards
        ]

    def step(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` with the exchange; returns with every rank's parameters updated alike."""
        self.sends, self.missing = [], [len(ts) for ts in self.tensors_of]
        self.local_ready = {c: threading.Event() for c in self.mine}
        pushes = {w: {c: dist.irecv(self.received[w][c], src=w, tag=c) for c in self.mine} for w in self.remote}
        answer_sends: list[dist.Work] = []
        server = threading.Thread(target=self._serve, args=(pushes, answer_sends))
        server.start()
        if self.answer_all:
            answers, taker = self._receive_answers(self.remote), None
        else:
            answers = []
            taker = threading.Thread(target=lambda: [w.wait() for s in self.remote for w in self._receive_answers([s])])
            taker.start()
        loss.backward()
        server.join()
        for work in answers:
            work.wait()
        if taker is not None:
            taker.join()
        for shard, start, end in self.chunks:
            if shard != self.rank:
                self.flat[start:end].copy_(self.answers[start:end])
        for work in self.sends + answer_sends:
            work.wait()


def worker(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    widths = MODELS[args.model]
    model = BenchmarkMLP(widths).net
    x, y = torch.randn(BATCH, widths[0]), torch.randint(0, CLASSES, (BATCH,))
    times = []
    if args.mode == "ddp":
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
        for _ in range(args.steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            optimizer.step()
            times.append(time.monotonic())
    else:
        exchange = ChunkwiseExchange(model, args)
        for _ in range(args.steps):
            exchange.step(nn.functional.cross_entropy(model(x), y))
            times.append(time.monotonic())
    final = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    if args.save:
        torch.save(final, f"{args.save}-rank{dist.get_rank()}.pt")
    check = float(final.double().sum())
    print("RESULT " + json.dumps({"rank": dist.get_rank(), "times": times, "check": check}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def samples_per_second(outputs: list[tuple[int | None, str]], args: argparse.Namespace) -> tuple[float, float]:
    """All ranks' samples/s from the end of the last rank's warm-up to the last step end, and rank 0's check."""
    results: list[dict[str, Any]] = []
    for node, (code, text) in enumerate(outputs):
        lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
        if code != 0 or not lines:
            raise RuntimeError(f"node {node} failed (exit code {code}):\n{text[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    start = max(r["times"][args.warmup - 1] for r in results)
    end = max(r["times"][-1] for r in results)
    return BATCH * args.nodes * (args.steps - args.warmup) / (end - start), results[0]["check"]


def driver(args: argparse.Namespace) -> None:
    configs = [["--mode", "ddp"]] + [["--mode", "exchange", *config.split()] for config in args.configs]
    rows: dict[str, list[float]] = {}
    with EmulatedCluster(args.nodes, args.rate) as cluster:
        for rep in range(args.reps):
            for config in configs:
                name = " ".join(config)
                with tempfile.TemporaryDirectory() as logs:
                    command = [__file__, "--worker", "--model", args.model, "--steps", str(args.steps), *config]
                    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.getcwd()])}
                    outputs = run_torchrun(cluster, command, timeout=600, logs=Path(logs), env=env)
                rate, check = samples_per_second(outputs, args)
                rows.setdefault(name, []).append(rate)
                print(f"sitting {rep + 1}  {name:55s} {rate:7.1f} samples/s  parameters' sum {check:.6f}", flush=True)
    ddp = sum(rows["--mode ddp"]) / len(rows["--mode ddp"])
    print(f"\n{args.nodes} nodes, {args.model}, {args.rate:g} Mbit/s links; samples/s per sitting, mean, ratio to DDP")
    for name, rates in rows.items():
        mean = sum(rates) / len(rates)
        print(f"{name:55s} {' '.join(f'{r:6.1f}' for r in rates)}  mean {mean:6.1f}  {mean / ddp:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help="(internal) run as one rank under torchrun")
    parser.add_argument("--mode", choices=["ddp", "exchange"], default="exchange")
    parser.add_argument("--chunk-mb", type=float, default=0.0, help="MiB per chunk; 0: one per shard (contiguous)")
    parser.add_argument("--stripe", action="store_true", help="chunk c belongs to shard c mod N")
    parser.add_argument("--answer-at-end", action="store_true", help="a shard answers after its last chunk")
    parser.add_argument("--answers", choices=["all", "rotate"], default="all")
    parser.add_argument("--model", default="10m", choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=8, help="per rank, the warm-up included")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rate", type=float, default=250.0, help="Mbit/s of every link")
    parser.add_argument("--reps", type=int, default=1, help="sittings: every configuration once each")
    parser.add_argument("--configs", nargs="+", default=["--chunk-mb 0", "--stripe --chunk-mb 1"])
    parser.add_argument("--save", default=None, help="(with --worker) save the final parameters to SAVE-rankR.pt")
    args = parser.parse_args()
    if args.stripe and args.chunk_mb <= 0:
        parser.error("--stripe needs --chunk-mb > 0")
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
