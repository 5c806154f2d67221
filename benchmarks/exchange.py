"""How well gloo fills shaped links, by traffic pattern: the transport under the sharded server, measured alone.
Needs root and iproute2 (the emulated cluster of ``netns_cluster.py``).

    sudo .venv/bin/python benchmarks/exchange.py            # 4 nodes, 250 Mbit/s and 1 Gbit/s: about 2 minutes

Every node sends each other node a slice of a model (``--numel`` float32 split in N, in 1 MiB messages, one gloo
group per ordered pair, as ``session.Channels``) and receives one from each, i.e. (N-1)/N model sizes each way:
one phase of a sharded step (the pushes, or the answers). Four patterns, each timed over ``--repeats`` rounds,
twice, side by side:

* ``all at once``: every slice posted at once (N-1 TCP flows each way through every link end);
* ``in rotation``: N-1 rounds; in round k node r sends to r+k and receives from r-k (one flow each way), as a
  sharded worker that reads shard r+1's answer, then r+2's...;
* ``one receive at a time``: in rotation, but each message's receive posted only once the previous one arrived
  (gloo sends a message's bytes only once its receive is posted: one round trip per message);
* ``ring all-reduce``: gloo's ``all_reduce`` of the whole model (DDP's traffic: 2(N-1)/N model sizes each way).

The column is the share of the link's rate that the payload reached: 1.00 would be a link that never idled.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lightning_hybrid.flat import CHUNK_BYTES

CHUNK = CHUNK_BYTES // 4  # float32 elements per message: as the gradients' chunks


def exchange(numel: int, repeats: int) -> dict[str, list[float]]:
    """On every rank of a torchrun job: seconds per round of each pattern (rank 0's clock, after a barrier)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    groups = {(s, w): dist.new_group([s, w], backend="gloo") for s in range(n) for w in range(n) if s != w}
    peers = [p for p in range(n) if p != rank]
    outgoing = {p: torch.randn(numel // n) for p in peers}
    incoming = {p: torch.empty(numel // n) for p in peers}
    model = torch.randn(numel)

    def messages(tensor: torch.Tensor) -> list[torch.Tensor]:
        return list(tensor.split(CHUNK))

    def receive(peer: int) -> list[dist.Work]:
        return [dist.irecv(m, src=peer, group=groups[(rank, peer)]) for m in messages(incoming[peer])]

    def send(peer: int) -> list[dist.Work]:
        return [dist.isend(m, dst=peer, group=groups[(peer, rank)]) for m in messages(outgoing[peer])]

    def all_at_once() -> None:
        works = [w for p in peers for w in receive(p)] + [w for p in peers for w in send(p)]
        for work in works:
            work.wait()

    def in_rotation() -> None:
        for k in range(1, n):
            for work in receive((rank - k) % n) + send((rank + k) % n):
                work.wait()

    def in_rotation_one_receive_at_a_time() -> None:
        for k in range(1, n):
            sends = send((rank + k) % n)
            peer = (rank - k) % n
            for message in messages(incoming[peer]):
                dist.recv(message, src=peer, group=groups[(rank, peer)])
            for work in sends:
                work.wait()

    patterns = {
        "all at once": all_at_once,
        "in rotation": in_rotation,
        "one receive at a time": in_rotation_one_receive_at_a_time,
        "ring all-reduce": lambda: dist.all_reduce(model),
    }
    seconds: dict[str, list[float]] = {name: [] for name in patterns}
    for _ in range(2):  # two sittings, interleaved, against drift
        for name, pattern in patterns.items():
            dist.barrier()
            pattern()  # warm-up: connections and buffers
            dist.barrier()
            started = time.perf_counter()
            for _ in range(repeats):
                pattern()
            dist.barrier()
            seconds[name].append((time.perf_counter() - started) / repeats)
    return seconds


def worker(numel: int, repeats: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    seconds = exchange(numel, repeats)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(seconds))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rates", type=float, nargs="+", default=[250.0, 1000.0], help="Mbit/s of every link")
    parser.add_argument("--numel", type=int, default=10_000_000, help="the model's float32 elements")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # a torchrun rank writes here
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.numel, args.repeats, args.worker)
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from netns_cluster import ClusterUnavailable, EmulatedCluster, run_torchrun

    n = args.nodes
    print(f"{n} nodes, {args.numel:,} float32 ({args.numel * 4 / 2**20:.0f} MiB); share of the link's rate reached")
    names = ["all at once", "in rotation", "one receive at a time", "ring all-reduce"]
    print("  " + f"{'link':>12}" + "".join(f"{name:>24}" for name in names))
    try:
        for index, rate in enumerate(args.rates):
            with EmulatedCluster(n, rate) as cluster, tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "seconds.json"
                script = [__file__, "--worker", str(out), "--numel", str(args.numel), "--repeats", str(args.repeats)]
                finished = run_torchrun(cluster, script, port=29400 + index, timeout=600, logs=Path(tmp))
                if not out.exists():
                    print(f"  {rate:>5g} Mbit/s failed, exit codes {[code for code, _ in finished]}")
                    continue
                seconds = json.loads(out.read_text())
                bits = args.numel * 32 * (n - 1) / n  # each way, per node and phase
                shares = {  # the ring moves twice the bits of one phase
                    name: " / ".join(f"{(2 if 'ring' in name else 1) * bits / (rate * 1e6) / s:.2f}" for s in values)
                    for name, values in seconds.items()
                }
                print("  " + f"{rate:>5g} Mbit/s" + "".join(f"{shares[name]:>24}" for name in names))
    except ClusterUnavailable as err:
        print(f"exchange.py: skipped, no emulated cluster here: {err}")


if __name__ == "__main__":
    main()
