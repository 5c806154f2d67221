"""Throughput on an emulated cluster: Lightning DDP against hybrid_sgd's single and sharded server, on links
shaped like a cluster's, where the link and not this machine's cores is the bottleneck. Needs root and iproute2.

    sudo .venv/bin/python benchmarks/cluster.py --out docs/cluster.json   # the whole table: about an hour, 2 cores
    sudo .venv/bin/python benchmarks/cluster.py --quick       # 2 nodes, 1M parameters, one rate: about a minute

Every node is a network namespace on one bridge, its veth shaped to the rate in both directions with tc's tbf
(``netns_cluster.py``), with 9000-byte frames where the slowest link is below about 270 Mbit/s and the veths'
64 KiB GSO packets elsewhere (``netns_cluster.frames_for``: below that rate tbf would split every GSO packet
into 1500-byte frames on the cores; ``--frame-bytes``); one torchrun node of one process per namespace, gloo bound to
the node's interface. Each configuration is a real run of ``throughput.py --configuration`` (its MLPs, batch 64),
one epoch of ``steps * nodes`` batches; ``steps`` per node is sized per configuration by a rough model of its rate
(compute on the shared cores, model sizes through the links; with one server and K = 1 the server's own worker,
which reaches it in memory, at compute speed) so that its timed window takes about ``--window`` seconds, at least
``--min-steps`` per node. The script prints its expected time first (74 runs by default, each with 8-20 s of
start-up: every process imports torch and Lightning). Measured in one run, side by side, per configuration:

* samples/s of all nodes together: every step end of every rank on one clock (CLOCK_MONOTONIC), from the moment
  the last rank finished its first step (the warm-up) to the last step end; and the ratio to DDP's on the same
  cluster, model and rate;
* bytes each node sent and received per step of its own, read from its interface's counters (frames, as tbf
  counts them) at its step ends, in model sizes (float32): DDP's ring and the sharded server should move
  2(N-1)/N each way, a remote worker of one server 1 each way and the server's node N-1;
* the busiest link's use: the highest of all nodes' sent or received bits per second against its shaped rate;
* CPU per node: the rank's CPU seconds per second over its timed window (``time.process_time``: all its
  threads); the JSON also has each namespace's processes' CPU over the whole run (``/proc/PID/stat``, the
  torchrun agent and start-up included) and the interfaces' counters over the whole run.

Then one node on a link ``--slow-factor`` times slower (a communication straggler): DDP against the hybrid
(K = N/2) and async (K = 1) with pulled work, one server, sharded, and sharded with each node's share of the
model in proportion to its link's rate (``shard_weights``), with the slow link on an ordinary worker (the last
node) and, separately, on node 0 (one server's rank; with a sharded server shard 0, which also decides each
update's group). Before each cluster's runs a 1 s TCP stream between two namespaces measures the link
(the saturation check).

All nodes share this machine's cores. Where a link is the bottleneck ("busiest link" near 100 %) the nodes mostly
wait and the sharing matters little; where "CPU all" nears the core count the row measured the cores, not the
links. With more nodes than cores the sharing hurts configurations whose nodes compute at the same moment (DDP
and K = N: lockstep, every node's backward at once on a fraction of a core) more than those whose nodes compute
at different moments (pulled work with K < N: one node computes while others wait for their links), so it
flatters the asynchronous rows against DDP; and it hurts one server's node most, whose rank also applies every
update. With one server and K = 1, node 0's own worker trains most batches (see "batches per node"): it reaches
the server in memory, on a real cluster too.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, Optional

from netns_cluster import (
    FRAME_BYTES_RANGE,
    ClusterUnavailable,
    CpuMeter,
    EmulatedCluster,
    checked_frame_bytes,
    frames_in_words,
    run_torchrun,
)
from throughput import BATCH, MODELS, BenchmarkMLP

from lightning_hybrid.launcher import environment_for_a_new_launch

THROUGHPUT = str(Path(__file__).with_name("throughput.py"))
WARMUP = 1  # steps per rank before the window opens
CORES = os.cpu_count() or 1
QUEUE_MS = 5.0  # tbf's latency: how long a packet may wait in a link end's queue (a switch's buffer)
COMPUTE_MS_PER_MPARAM = 6.5  # one step of batch 64 per million parameters on one core (throughput.py's one process)


def strategies(
    nodes: int, overlap: bool = False, only: Optional[list[str]] = None, pipelined: bool = False, bf16: bool = False
) -> list[tuple[str, str]]:
    """The table's rows at ``nodes`` nodes (flag for throughput.py, label); ``only``: the labels to keep."""
    rows = [
        ("ddp", "ddp"),
        (f"K={nodes}", "one server, K=N"),
        ("K=1", "one server, K=1, pulled"),
        (f"K={nodes}/sharded", "sharded, K=N"),
        ("K=1/sharded", "sharded, K=1, pulled"),
    ]
    rows += [(f"K={nodes}/sharded/overlap", "sharded, K=N, overlap_push")] * overlap
    rows += [(f"K={nodes}/sharded/overlap/answers", "sharded, K=N, overlap_answers")] * overlap
    rows += [(f"K={nodes}/sharded/pipelined", "sharded, K=N, pipelined")] * pipelined
    return with_bf16([row for row in rows if only is None or row[1] in only], bf16)


def straggler_strategies(
    rates_mbit: list[float],
    only: Optional[list[str]] = None,
    pipelined: bool = False,
    slow_share: float = 0.0,
    bf16: bool = False,
) -> list[tuple[str, str]]:
    """The straggler table's rows on links of ``rates_mbit``: the sharded server also with each node's share of
    the model in proportion to its link's rate (``shard_weights``), so that the slow link carries a smaller slice;
    ``slow_share``: also with that share for the slow nodes (1 for the others); ``pipelined``: each hybrid and
    async row also with ``pipeline_pushes``; ``bf16``: see :func:`with_bf16`."""
    half = max(1, len(rates_mbit) // 2)
    shares = ":".join(f"{rate / max(rates_mbit):.4g}" for rate in rates_mbit)
    rows = [("ddp", "ddp")]
    servers = [("", "one server"), ("/sharded", "sharded"), (f"/sharded={shares}", "sharded, shares by link")]
    if slow_share:
        given = ":".join("1" if rate == max(rates_mbit) else f"{slow_share:g}" for rate in rates_mbit)
        servers.append((f"/sharded={given}", f"sharded, slow share {slow_share:g}"))
    for suffix, server in servers:
        if half > 1:
            rows.append((f"K={half}{suffix}", f"{server}, hybrid K=N/2, pulled"))
        rows.append((f"K=1{suffix}", f"{server}, async K=1, pulled"))
    if pipelined:
        rows += [(f"{flag}/pipelined", f"{label}, pipelined") for flag, label in rows[1:]]
    return with_bf16([row for row in rows if only is None or row[1] in only], bf16)


def with_bf16(rows: list[tuple[str, str]], bf16: bool) -> list[tuple[str, str]]:
    """``rows`` and, with ``bf16``, each again in bfloat16: a hybrid row with ``answer_dtype="bfloat16"`` and
    with ``push_dtype`` too, DDP with its gradients all-reduced in bfloat16 (``bf16_compress_hook``), which is what
    DDP can narrow on its wire: DDP's and the hybrid's "bf16 gradients" rows move the same bytes per sample."""
    if not bf16:
        return rows
    narrowed = []
    for flag, label in rows:
        if flag == "ddp":
            narrowed.append(("ddp/bf16", "ddp, bf16 gradients"))
        else:
            narrowed.append((f"{flag}/bf16", f"{label}, bf16 answers"))
            narrowed.append((f"{flag}/bf16/bf16push", f"{label}, bf16 answers and gradients"))
    return rows + narrowed


def setup_seconds(nodes: int) -> float:
    """A configuration's start-up and exit on this machine (torchrun, imports, rendezvous, first step): about
    8 s with 2 nodes and 19 s with 4 (2 cores; every process imports torch and Lightning)."""
    return max(5.0, 5.5 * nodes - 3.0)


def predicted_rate(flag: str, numel: int, nodes: int, rates_mbit: list[float], batch: int) -> float:
    """Batches per second of all nodes together by a rough model (no overlap of compute and communication;
    node i's link at ``rates_mbit[i]``). It only sizes the runs: each should last about ``--window`` s."""
    flag = (
        flag.removesuffix("/bf16push").removesuffix("/bf16").removesuffix("/pipelined")
    )  # sized as the same row unpipelined, in float32
    bits, links = numel * 32, [rate * 1e6 for rate in rates_mbit]
    alone = COMPUTE_MS_PER_MPARAM / 1000 * numel / 1e6 * batch / 64
    shared = alone * max(1.0, nodes / CORES)
    if nodes == 1:
        return 1 / alone
    if flag == "ddp" or "/sharded" in flag:  # a ring, or shards: 2(N-1)/N model sizes each way, both at once
        return nodes / (shared + 2 * (nodes - 1) / nodes * bits / min(links))
    if flag == "K=1":  # the server's own worker reaches it in memory; the others through the server's link
        remote = sum(1 / (shared + 2 * bits / min(link, links[0])) for link in links[1:])
        return 1 / alone + min(remote, links[0] / bits)
    # one server: N-1 gradients in, then N-1 answers out through its link, and one of each through the slowest
    return nodes / (shared + 2 * max((nodes - 1) * bits / links[0], bits / min(links)))


def steps_for(flag: str, numel: int, rates_mbit: list[float], args: argparse.Namespace) -> tuple[int, float]:
    """Steps per node (the epoch has ``steps * nodes`` batches) for a window of about ``--window`` s, and the
    configuration's expected seconds."""
    nodes = len(rates_mbit)
    rate = predicted_rate(flag, numel, nodes, rates_mbit, args.batch)
    steps = max(args.min_steps, min(args.max_steps, math.ceil(args.window * rate / nodes) + WARMUP))
    return steps, setup_seconds(nodes) + (steps + 2) * nodes / rate  # + the first broadcast and the warm-up


def summarise(ranks: list[dict[str, Any]], nodes: list[Any], numel: int, batch: int) -> dict[str, Any]:
    """One configuration's measurements from what its ranks wrote (rank r ran on node r)."""
    size = numel * 4
    opened = max(rank["step_ends"][WARMUP - 1] for rank in ranks)
    closed = max(rank["step_ends"][-1] for rank in ranks)
    timed = sum(1 for rank in ranks for end in rank["step_ends"] if end > opened)
    per_node = []
    for rank, node in zip(ranks, nodes):
        ends = rank["step_ends"]
        first = WARMUP - 1 if len(ends) > WARMUP else 0
        steps, seconds = len(ends) - 1 - first, ends[-1] - ends[first]
        sent = rank["tx_bytes"][-1] - rank["tx_bytes"][first]
        received = rank["rx_bytes"][-1] - rank["rx_bytes"][first]
        entry: dict[str, Any] = {"batches": len(ends), "timed_steps": steps, "seconds": seconds}
        if steps > 0 and seconds > 0:
            entry.update(
                sent_sizes_per_step=sent / steps / size,
                received_sizes_per_step=received / steps / size,
                sent_link_use=sent * 8 / seconds / (node.rate_mbit * 1e6),
                received_link_use=received * 8 / seconds / (node.rate_mbit * 1e6),
                cpu=(rank["cpu_seconds"][-1] - rank["cpu_seconds"][first]) / seconds,
                waiting=(rank["wait_seconds"][-1] - rank["wait_seconds"][first]) / seconds,
            )
        per_node.append(entry)
    return {
        "samples_per_s": timed * batch / (closed - opened) if closed > opened else None,
        "window_s": closed - opened,
        "per_node": per_node,
    }


class Report:
    """Prints lines as they come and keeps them for the text file beside the JSON."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


def run(
    cluster: EmulatedCluster,
    flag: str,
    model: str,
    steps: int,
    args: argparse.Namespace,
    folder: Path,
    port: int,
    timeout: float,
) -> dict[str, Any]:
    """One configuration on ``cluster``; a failed one is returned with its exit codes and the tail of its logs."""
    n = len(cluster.nodes)
    script = [THROUGHPUT, "--configuration", "--out", str(folder), "--workers", str(n), "--num-nodes", str(n)]
    script += ["--strategy", flag, "--models", model, "--steps", str(steps), "--warmup", str(WARMUP)]
    script += ["--batch", str(args.batch), "--net-device", cluster.nodes[0].device, "--whole-epoch"]
    folder.mkdir(parents=True, exist_ok=True)
    before = [cluster.counters(i) for i in range(n)]
    started = time.monotonic()
    with CpuMeter(cluster) as meter:
        finished = run_torchrun(
            cluster, script, port=port, timeout=timeout, env=environment_for_a_new_launch(), logs=folder / "logs"
        )
    after = [cluster.counters(i) for i in range(n)]
    whole_run = {
        "wall_s": time.monotonic() - started,
        "namespace_cpu_s": meter.cpu_seconds(),
        "tx_bytes": [a["tx_bytes"] - b["tx_bytes"] for a, b in zip(after, before)],
        "rx_bytes": [a["rx_bytes"] - b["rx_bytes"] for a, b in zip(after, before)],
    }
    paths = [folder / f"rank{r}.json" for r in range(n)]
    if any(code != 0 for code, _ in finished) or not all(path.exists() for path in paths):
        tails = [output[-3000:] for _, output in finished]
        return {"failed": [code for code, _ in finished], "log_tails": tails, "whole_run": whole_run}
    ranks = [json.loads(path.read_text()) for path in paths]
    numel = sum(p.numel() for p in BenchmarkMLP(MODELS[model]).parameters())
    return {**summarise(ranks, cluster.nodes, numel, args.batch), "whole_run": whole_run}


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def columns(result: dict[str, Any], slow: int | None) -> dict[str, str]:
    """A row's columns: model sizes sent/received per step of node 0 and of the other nodes (mean), CPU per node,
    the busiest link's use (or the slow link's), the batches each node trained and the share of its time each
    node's worker spent in its exchange with the server: sending, waiting, receiving (hybrid_sgd only)."""
    nodes = result["per_node"]
    timed = [entry if "cpu" in entry else None for entry in nodes]

    def sizes(entries: list[dict[str, Any] | None]) -> str:
        entries = [entry for entry in entries if entry]
        sent = mean([entry["sent_sizes_per_step"] for entry in entries])
        received = mean([entry["received_sizes_per_step"] for entry in entries])
        return "-" if sent is None else f"{sent:.2f}/{received:.2f}"

    def use(entry: dict[str, Any] | None) -> float | None:
        return max(entry["sent_link_use"], entry["received_link_use"]) if entry else None

    uses = [use(entry) for entry in timed if entry]
    link = use(timed[slow]) if slow is not None else max(uses, default=None)
    return {
        "node0": sizes(timed[:1]),
        "others": sizes(timed[1:]),
        "cpu0": fmt(timed[0] and timed[0]["cpu"], ".2f"),
        "cpus": fmt(mean([entry["cpu"] for entry in timed[1:] if entry]), ".2f"),
        "cpu_all": f"{sum(entry['cpu'] for entry in timed if entry):.2f}",
        "link": fmt(link and 100 * link, ".0f") + "%",
        "batches": "/".join(str(entry["batches"]) for entry in nodes),
        "waiting": "/".join(fmt(entry and 100 * entry["waiting"], ".0f") for entry in timed)
        if any(entry and entry["waiting"] for entry in timed)
        else "-",
    }


def header(link: str) -> str:
    return (
        f"  {'strategy':<31} {'samples/s':>9} {'vs DDP':>7} {link:>12} {'batches per node':>16} "
        f"{'node 0 sent/recv':>16} {'others sent/recv':>16} {'CPU node 0':>10} {'CPU others':>10} {'CPU all':>7} "
        f"{'waiting %':>12}"
    )


PORTS = itertools.count(29501)  # torchrun's rendezvous port on node 0: a new one per run


def measure(
    cluster: EmulatedCluster,
    model: str,
    configurations: list[tuple[str, str]],
    args: argparse.Namespace,
    report: Report,
    logs: Path,
    slow: int | None = None,
) -> list[dict[str, Any]]:
    """Every configuration on ``cluster``, one after another, printed as a table with ratios to the first (DDP)."""
    n = len(cluster.nodes)
    numel = sum(p.numel() for p in BenchmarkMLP(MODELS[model]).parameters())
    rates = [node.rate_mbit for node in cluster.nodes]
    title = header("slow link" if slow is not None else "busiest link")
    report(title)
    report("  " + "-" * (len(title) - 2))
    rows, ddp = [], None
    for flag, label in configurations:
        steps, expected = steps_for(flag, numel, rates, args)
        folder = logs / "-".join(str(part) for part in (cluster.rate_mbit, n, model, slow, flag.replace("/", "-")))
        result = run(cluster, flag, model, steps, args, folder, next(PORTS), timeout=120 + 5 * expected)
        row = {"rate_mbit": cluster.rate_mbit, "nodes": n, "model": model, "numel": numel, "slow_node": slow}
        row.update(strategy=flag, label=label, steps=steps, expected_s=expected, **result)
        if "failed" in result:
            report(f"  {label:<31} failed, exit codes {result['failed']} (the logs' ends are in the JSON)")
        else:
            samples = result["samples_per_s"]
            ddp = samples if flag == "ddp" else ddp
            row["vs_ddp"] = samples / ddp if ddp and samples else None
            c = columns(result, slow)
            report(
                f"  {label:<31} {fmt(samples, '9.0f')} {fmt(row['vs_ddp'], '6.2f')}x {c['link']:>12} "
                f"{c['batches']:>16} {c['node0']:>16} {c['others']:>16} {c['cpu0']:>10} {c['cpus']:>10} "
                f"{c['cpu_all']:>7} {c['waiting']:>12}"
            )
        rows.append(row)
    return rows


def saturation(cluster: EmulatedCluster, source: int, destination: int, report: Report) -> dict[str, Any]:
    measured = cluster.blast(source, destination, seconds=1.0)
    report(
        f"  link check, node {source} -> node {destination}, 1 s of TCP: {measured['counter_mbit']:.1f} Mbit/s on the "
        f"interface ({measured['payload_mbit']:.1f} of payload) against {measured['shaped_mbit']:.1f} shaped: "
        f"{100 * measured['fraction']:.0f} %"
    )
    return {"source": source, "destination": destination, "frame_bytes": cluster.frame_bytes, **measured}


def frames_argument(value: str) -> int | Literal["auto"] | None:
    """``--frame-bytes``: "auto", "gso" (None: the veths' own GSO packets) or an MTU."""
    word = value.lower()
    if word in ("auto", "gso"):
        return None if word == "gso" else "auto"
    try:
        return checked_frame_bytes(int(value))
    except ValueError:
        least, most = FRAME_BYTES_RANGE
        raise argparse.ArgumentTypeError(
            f"expected auto, gso or an MTU of {least} to {most} bytes, got {value!r}"
        ) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="*", default=[2, 4], help="none: only the straggler table")
    parser.add_argument("--models", nargs="+", default=["1m", "10m", "50m"], choices=list(MODELS))
    parser.add_argument("--rates", type=float, nargs="+", default=[250.0, 1000.0], help="Mbit/s of every link")
    parser.add_argument("--window", type=float, default=5.0, help="seconds a configuration's timed window should take")
    parser.add_argument("--min-steps", type=int, default=4, help="per node, the warm-up step included")
    parser.add_argument("--max-steps", type=int, default=400, help="per node")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--straggler-nodes", type=int, default=4, help="0: no straggler table")
    parser.add_argument("--straggler-model", default="10m", choices=list(MODELS))
    parser.add_argument("--straggler-rate", type=float, default=None, help="Mbit/s (default: the highest of --rates)")
    parser.add_argument("--slow-factor", type=float, default=3.0)
    parser.add_argument("--queue-ms", type=float, default=QUEUE_MS, help="tbf's queue on each link end, in ms")
    parser.add_argument(
        "--frame-bytes",
        type=frames_argument,
        default="auto",
        help="the links' MTU, every packet segmented to it (e.g. 9000, jumbo frames); 'gso': MTU 1500 with 64 KiB "
        "GSO packets; default 'auto': 9000 where the slowest link is below about 270 Mbit/s (tbf would split GSO "
        "packets there), else 'gso' "
        "(netns_cluster.frames_for)",
    )
    parser.add_argument(
        "--overlap",
        action="store_true",
        help="also the sharded server at K = N with overlap_push, and with overlap_answers",
    )
    parser.add_argument(
        "--slow-share", type=float, default=0.0, help="also the sharded rows with this share for the slow node"
    )
    parser.add_argument(
        "--pipelined", action="store_true", help="also the sharded K = N and every straggler row with pipeline_pushes"
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="also every row in bfloat16: hybrid rows with answer_dtype (and again with push_dtype too), DDP with "
        "bf16_compress_hook",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="LABEL",
        help='rows to run (of both tables), e.g. "ddp" "sharded, K=N"',
    )
    parser.add_argument("--quick", action="store_true", help="2 nodes, 1M parameters, 250 Mbit/s, few steps")
    parser.add_argument("--out", type=Path, default=None, help="write the rows here (JSON) and the table beside (.txt)")
    parser.add_argument("--keep-logs", type=Path, default=None, help="keep every run's output in this folder")
    args = parser.parse_args()
    # SIGTERM (e.g. from timeout) unwinds like Ctrl-C: every namespace made so far is deleted on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if args.quick:
        args.nodes, args.models, args.rates, args.window, args.straggler_nodes = [2], ["1m"], [250.0], 1.5, 0
    args.straggler_rate = args.straggler_rate or max(args.rates)

    used = {*args.models, args.straggler_model}
    numels = {m: sum(p.numel() for p in BenchmarkMLP(MODELS[m]).parameters()) for m in used}
    expected = sum(
        steps_for(flag, numels[m], [rate] * n, args)[1]
        for rate in args.rates
        for n in args.nodes
        for m in args.models
        for flag, _ in strategies(n, args.overlap, args.only, args.pipelined, args.bf16)
    )
    n, f = args.straggler_nodes, args.slow_factor
    for slow in (n - 1, 0) if n else ():
        rates = [args.straggler_rate / (f if i == slow else 1) for i in range(n)]
        expected += sum(
            steps_for(flag, numels[args.straggler_model], rates, args)[1]
            for flag, _ in straggler_strategies(rates, args.only, args.pipelined, args.slow_share, args.bf16)
        )
    report = Report()
    report(
        f"hybrid_sgd on an emulated cluster, {datetime.date.today()}: {CORES} CPU cores shared by all nodes, "
        f"Linux {platform.release()}, Python {platform.python_version()}; batch {args.batch} per node; about "
        f"{args.window:g} s timed per configuration; links: {frames_in_words(args.frame_bytes)}; tbf queues of "
        f"{args.queue_ms:g} ms; expected to take about {expected / 60:.0f} min"
    )
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    results: dict[str, Any] = {"date": str(datetime.date.today()), "cpus": CORES, "settings": settings}
    results.update(expected_s=expected, link_checks=[], rows=[], straggler_rows=[])
    began = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            logs = args.keep_logs or Path(tmp)
            for rate in args.rates:
                for n in args.nodes:
                    with EmulatedCluster(n, rate, None, args.queue_ms, args.frame_bytes) as cluster:
                        report(f"\n{n} nodes, every link {rate:g} Mbit/s each way, {cluster.frames}")
                        results["link_checks"].append({"nodes": n, **saturation(cluster, 1, 0, report)})
                        for model in args.models:
                            numel = numels[model]
                            report(
                                f"\n  {model}: {numel:,} parameters ({numel * 4 / 2**20:.1f} MiB float32); model sizes "
                                f"each way per step of a node should be: DDP and sharded {2 * (n - 1) / n:.2f}, one "
                                f"server's worker 1.00, the server's node {n - 1:.2f} (at K = N)"
                            )
                            rows = strategies(n, args.overlap, args.only, args.pipelined, args.bf16)
                            results["rows"] += measure(cluster, model, rows, args, report, logs)
            n, rate, model, f = args.straggler_nodes, args.straggler_rate, args.straggler_model, args.slow_factor
            if n:
                report(
                    f"\nOne communication straggler: {n} nodes, {model} ({numels[model]:,} parameters), links of "
                    f"{rate:g} Mbit/s but one of {rate / f:.1f} ({f:g}x slower); pulled work shares the batches out"
                )
                for slow, place in ((n - 1, f"node {n - 1} (a worker)"), (0, "node 0 (one server's rank; shard 0)")):
                    with EmulatedCluster(n, rate, {slow: f}, args.queue_ms, args.frame_bytes) as cluster:
                        report(f"\n  slow link on {place}, {cluster.frames}")
                        check = saturation(cluster, slow, 1 if slow == 0 else 0, report)
                        results["link_checks"].append({"nodes": n, "slow": slow, **check})
                        rates = [node.rate_mbit for node in cluster.nodes]
                        configurations = straggler_strategies(
                            rates, args.only, args.pipelined, args.slow_share, args.bf16
                        )
                        results["straggler_rows"] += measure(cluster, model, configurations, args, report, logs, slow)
    except ClusterUnavailable as err:
        report(f"cluster.py: skipped, no emulated cluster here: {err}")
    finally:
        results["seconds"] = time.monotonic() - began
        report(f"\ntook {results['seconds'] / 60:.1f} min")
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
            args.out.with_suffix(".txt").write_text("\n".join(report.lines) + "\n")


if __name__ == "__main__":
    main()
