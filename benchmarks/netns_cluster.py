"""An emulated cluster on one Linux machine: N "nodes" as network namespaces, each joined to a switch (a bridge
in a namespace of its own) by a veth pair whose two ends are shaped with Linux traffic control (``tbf``: it
shapes what leaves an interface, so the node's end limits what the node sends and the switch's end what it
receives). The root namespace is left alone: everything lives in namespaces named ``lhc-<pid>-<tag>-...``
(``pid``: the process that made them), which are deleted, with every process still in them, when the cluster
closes, even after an exception. A later cluster removes what a crashed one (whose process is gone) left.

    with EmulatedCluster(4, rate_mbit=250, slow={3: 3.0}) as cluster:    # node 3 on a 3x slower link
        cluster.blast(3, 0)                                              # measured Mbit/s of that link
        processes = cluster.popen(0, ["python", "-c", "..."])           # in node 0's namespace
        cluster.counters(0)                                              # {"tx_bytes": ..., "rx_bytes": ...}

Nodes have the addresses 10.78.0.1, 10.78.0.2, ... on their interface ``eth0``. Needs root and iproute2 (``ip``,
``tc``) with the ``tbf`` qdisc; :class:`ClusterUnavailable` says why where they are missing. Standard library
only: ``python netns_cluster.py receive|send`` are the two ends of :meth:`EmulatedCluster.blast`, run inside the
namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

PREFIX = "lhc"
SUBNET = "10.78.0"
DEVICE = "eth0"  # every node's interface, inside its own namespace
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ClusterUnavailable(RuntimeError):
    """Namespaces, veth pairs or tbf cannot be made here (not root, no iproute2, a kernel without them)."""


def _ip(*words: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *words], capture_output=True, text=True, check=check)


def namespaces() -> list[str]:
    listing = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in listing.splitlines() if line.strip()]


def namespace_pids(namespace: str) -> list[int]:
    return [int(pid) for pid in _ip("netns", "pids", namespace, check=False).stdout.split()]


def remove_namespace(namespace: str, wait: float = 10.0) -> None:
    """SIGKILL every process in ``namespace``, then delete it (with it go its ends of the veth pairs, and so
    the pairs)."""
    deadline = time.monotonic() + wait
    while pids := namespace_pids(namespace):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    _ip("netns", "del", namespace, check=False)


def remove_stale(prefix: str = PREFIX) -> list[str]:
    """Delete the namespaces of clusters whose making process is gone (a crash, a SIGKILL); returns their names.
    A live process's clusters are left alone, so that clusters of parallel runs do not collide."""
    removed = []
    for namespace in namespaces():
        parts = namespace.split("-")
        if parts[0] != prefix or len(parts) < 3 or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # its maker still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        remove_namespace(namespace)
        removed.append(namespace)
    return removed


JUMBO_FRAME_BYTES = 9000  # a data-centre link's MTU
FRAME_BYTES_RANGE = (576, 16384)  # IPv4's least MTU; tbf drops a frame larger than its bucket (64 KiB at least)
GSO_PACKET_ON_TBF = 67 * 1024  # a veth's 64 KiB GSO packet as tbf counts it: with every 1500-byte segment's headers


def bucket_bytes(rate_mbit: float) -> int:
    """tbf's bucket on a link of ``rate_mbit``: 2 ms at the rate, at least 64 KiB."""
    return max(64 * 1024, int(rate_mbit * 1e6 / 8 * 0.002))


def tbf_options(rate_mbit: float, latency_ms: float) -> list[str]:
    """``tc ... tbf`` options for ``rate_mbit``: the bucket of :func:`bucket_bytes` and a queue of ``latency_ms``."""
    burst = bucket_bytes(rate_mbit)
    return ["rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", f"{latency_ms:g}ms"]


def frames_for(slowest_mbit: float) -> int | None:
    """The links' frames where none are asked for, judged by the cluster's slowest link (every link gets the same
    frames): ``None`` (the veths' MTU of 1500 with 64 KiB GSO packets, as a NIC's segmentation offload takes
    them) wherever tbf's bucket holds a GSO packet, else 9000-byte jumbo frames. Below about 270 Mbit/s a GSO
    packet exceeds the bucket and tbf splits it into 1500-byte frames in software, work a cluster's NICs do in
    hardware: at 4 nodes and 250 Mbit/s it took DDP 1.3 of the 2 cores, and 9000-byte frames half that. A larger
    bucket would pass GSO packets whole, but then the link serializes 64 KiB units (2 ms each at 250 Mbit/s; a
    switch port sends one frame at a time); 9000-byte frames at 1 Gbit/s made the 2 cores, not the link, the
    bottleneck (README, *Frames on the emulated links*)."""
    return JUMBO_FRAME_BYTES if bucket_bytes(slowest_mbit) < GSO_PACKET_ON_TBF else None


def frames_in_words(frame_bytes: int | Literal["auto"] | None) -> str:
    """The links' frames in words, for reports."""
    if frame_bytes == "auto":
        return "9000-byte frames where the slowest link is below about 270 Mbit/s, else 64 KiB GSO packets"
    return "MTU 1500, 64 KiB GSO packets" if frame_bytes is None else f"{frame_bytes}-byte frames"


def checked_frame_bytes(frame_bytes: int | Literal["auto"] | None) -> int | Literal["auto"] | None:
    """``frame_bytes`` as :class:`EmulatedCluster` takes it, or a ValueError that says what it takes."""
    if frame_bytes is None or frame_bytes == "auto":
        return frame_bytes
    least, most = FRAME_BYTES_RANGE
    if isinstance(frame_bytes, int) and least <= frame_bytes <= most:
        return frame_bytes
    raise ValueError(
        f"frame_bytes is a link's MTU, {least} to {most} (e.g. 1500, or 9000 for jumbo frames), None (MTU 1500 "
        f"with 64 KiB GSO packets) or 'auto', got {frame_bytes!r}"
    )


@dataclass(frozen=True)
class Node:
    index: int
    namespace: str
    address: str  # on DEVICE, /24
    rate_mbit: float  # both directions
    port: str  # the veth's other end, on the switch

    device: str = DEVICE


class EmulatedCluster:
    """``nodes`` namespaces on one switch, each link shaped to ``rate_mbit`` in both directions, or to
    ``rate_mbit / factor`` for a node in ``slow`` (``{node: factor}``). A context manager: made on entry
    (:class:`ClusterUnavailable` if it cannot be), removed with every process in it on exit."""

    def __init__(
        self,
        nodes: int,
        rate_mbit: float,
        slow: dict[int, float] | None = None,
        latency_ms: float = 5.0,
        frame_bytes: int | Literal["auto"] | None = "auto",
    ) -> None:
        """``frame_bytes``: the links' MTU (e.g. 9000, a cluster's jumbo frames): every veth end gets it (the
        bridge follows its ports), and every packet is segmented to it (``gso_max_segs 1``). ``None``: the veths
        keep an MTU of 1500 and TCP hands them 64 KiB GSO packets. ``"auto"``: :func:`frames_for` the slowest
        link, for every link (a slow link below about 270 Mbit/s gives 1 Gbit/s links jumbo frames too, which cost
        this machine's cores at that rate)."""
        if not 1 <= nodes <= 200:
            raise ValueError(f"nodes must be 1 to 200, got {nodes}")
        self.rate_mbit, self.slow, self.latency_ms = rate_mbit, dict(slow or {}), latency_ms
        self.tag = f"{PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.switch = f"{self.tag}-sw"
        self.nodes = [
            Node(i, f"{self.tag}-n{i}", f"{SUBNET}.{i + 1}", rate_mbit / self.slow.get(i, 1.0), f"p{i}")
            for i in range(nodes)
        ]
        if checked_frame_bytes(frame_bytes) == "auto":
            frame_bytes = frames_for(min(node.rate_mbit for node in self.nodes))
        self.frame_bytes: int | None = frame_bytes
        self._made: list[str] = []

    # ------------------------------------------------------------------ making and removing
    def __enter__(self) -> EmulatedCluster:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        if os.geteuid() != 0:
            raise ClusterUnavailable("network namespaces need root")
        missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
        if missing:
            raise ClusterUnavailable(f"{' and '.join(missing)} not found (install iproute2)")
        remove_stale()
        try:
            self._make()
        except BaseException:
            self.close()
            raise

    def _make(self) -> None:
        for namespace in [self.switch] + [node.namespace for node in self.nodes]:
            try:
                _ip("netns", "add", namespace)
            except subprocess.CalledProcessError as err:
                raise ClusterUnavailable(f"cannot make a network namespace: {err.stderr.strip()}") from err
            self._made.append(namespace)
        sw = self.switch
        try:
            _ip("-n", sw, "link", "add", "br0", "type", "bridge")
            _ip("-n", sw, "link", "set", "br0", "up")
            _ip("-n", sw, "link", "set", "lo", "up")
            for node in self.nodes:
                ns = node.namespace
                _ip("-n", sw, "link", "add", node.port, "type", "veth", "peer", "name", node.device, "netns", ns)
                _ip("-n", sw, "link", "set", node.port, "master", "br0")
                _ip("-n", sw, "link", "set", node.port, "up")
                _ip("-n", ns, "addr", "add", f"{node.address}/24", "dev", node.device)
                _ip("-n", ns, "link", "set", node.device, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                if self.frame_bytes is not None:
                    for namespace, device in ((ns, node.device), (sw, node.port)):
                        frames = ("mtu", str(self.frame_bytes), "gso_max_segs", "1")
                        _ip("-n", namespace, "link", "set", "dev", device, *frames)
        except subprocess.CalledProcessError as err:
            raise ClusterUnavailable(f"cannot make the bridge and veth pairs: {err.stderr.strip()}") from err
        for node in self.nodes:
            for ns, device in ((node.namespace, node.device), (sw, node.port)):
                command = ["tc", "-n", ns, "qdisc", "add", "dev", device, "root", "tbf"]
                command += tbf_options(node.rate_mbit, self.latency_ms)
                shaped = subprocess.run(command, capture_output=True, text=True)
                if shaped.returncode != 0:
                    raise ClusterUnavailable(f"cannot shape a link with tc tbf: {shaped.stderr.strip()}")

    def close(self) -> None:
        """Kill every process in the cluster's namespaces and delete them (and so every link). Idempotent."""
        for namespace in reversed(self._made):
            remove_namespace(namespace)
        self._made.clear()

    def leftovers(self) -> list[str]:
        """This cluster's namespaces that still exist (none after :meth:`close`)."""
        return [namespace for namespace in namespaces() if namespace.startswith(self.tag)]

    @property
    def frames(self) -> str:
        return frames_in_words(self.frame_bytes)

    # ------------------------------------------------------------------ using it
    def command(self, node: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.nodes[node].namespace, *argv]

    def popen(self, node: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """``argv`` in node ``node``'s namespace (``ip netns exec`` execs it: the Popen's pid is the process)."""
        return subprocess.Popen(self.command(node, argv), **kwargs)

    def set_link(self, node: int, up: bool) -> None:
        """Take node ``node``'s interface down (a cut link: its packets go nowhere) or up again."""
        _ip("-n", self.nodes[node].namespace, "link", "set", DEVICE, "up" if up else "down")

    def pids(self, node: int) -> list[int]:
        return namespace_pids(self.nodes[node].namespace)

    def kill_processes(self) -> None:
        for node in self.nodes:
            for pid in namespace_pids(node.namespace):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def counters(self, node: int) -> dict[str, int]:
        """The node's interface counters (bytes sent and received, frames included), read inside its namespace."""
        paths = [f"/sys/class/net/{DEVICE}/statistics/{name}" for name in ("tx_bytes", "rx_bytes")]
        read = subprocess.run(self.command(node, ["cat", *paths]), capture_output=True, text=True, check=True)
        tx, rx = (int(word) for word in read.stdout.split())
        return {"tx_bytes": tx, "rx_bytes": rx}

    def blast(self, source: int, destination: int, seconds: float = 1.0, port: int = 5201) -> dict[str, float]:
        """A plain TCP stream from ``source`` to ``destination`` for ``seconds`` (after 0.25 s of start-up):
        the link's measured Mbit/s, by the receiver's interface counter (frames, what tbf counts) and by the
        payload it read, against the rate the slower of the two links was shaped to."""
        me = [sys.executable, str(Path(__file__).resolve())]
        receiver = self.popen(destination, [*me, "receive", "--port", str(port)], stdout=subprocess.PIPE, text=True)
        sender = self.popen(
            source,
            [*me, "send", "--to", self.nodes[destination].address, "--port", str(port), "--seconds", str(seconds)],
            stdout=subprocess.DEVNULL,
        )
        try:
            output, _ = receiver.communicate(timeout=seconds + 30)
            sender.wait(timeout=30)
        finally:
            for process in (receiver, sender):
                if process.poll() is None:
                    process.kill()
                    process.wait()
        measured = json.loads(output)
        measured["shaped_mbit"] = min(self.nodes[source].rate_mbit, self.nodes[destination].rate_mbit)
        measured["fraction"] = measured["counter_mbit"] / measured["shaped_mbit"]
        return measured


def run_torchrun(
    cluster: EmulatedCluster,
    script_and_args: Sequence[str],
    *,
    port: int = 29500,
    timeout: float,
    env: dict[str, str] | None = None,
    logs: Path,
) -> list[tuple[int | None, str]]:
    """One torchrun node of one process in every namespace (node 0 hosts the rendezvous), gloo bound to the
    node's interface; returns each node's exit code (None: killed after ``timeout`` s) and output (also in
    ``logs/node{i}.log``). Every process left in the namespaces is killed before it returns."""
    logs.mkdir(parents=True, exist_ok=True)
    n = len(cluster.nodes)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(n), "--nproc-per-node", "1"]
    torchrun += ["--master-addr", cluster.nodes[0].address, "--master-port", str(port)]
    # OMP_NUM_THREADS: torchrun sets it only for several processes per node (see launch.py)
    environment = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"}
    environment.update(GLOO_SOCKET_IFNAME=DEVICE, TP_SOCKET_IFNAME=DEVICE, PYTHONUNBUFFERED="1")
    files = [(logs / f"node{i}.log").open("w") for i in range(n)]
    processes = []
    try:
        for i in range(n):
            argv = [*torchrun, "--node-rank", str(i), *script_and_args]
            processes.append(cluster.popen(i, argv, env=environment, stdout=files[i], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for process in processes:
            try:
                codes.append(process.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
    finally:
        cluster.kill_processes()  # what a failed or stopped run left
        for process in processes:
            process.wait()
        for file in files:
            file.close()
    return [(code, (logs / f"node{i}.log").read_text(errors="replace")) for i, code in enumerate(codes)]


class CpuMeter:
    """CPU seconds (user + system) of each node's processes while it runs: every ``interval`` s it reads
    /proc/PID/stat of the namespace's processes (``ip netns pids``) and keeps each process's last reading, so a
    process that exits between two readings loses at most ``interval`` s of CPU."""

    def __init__(self, cluster: EmulatedCluster, interval: float = 1.0) -> None:
        self.cluster, self.interval = cluster, interval
        self._last: list[dict[tuple[int, int], float]] = [{} for _ in cluster.nodes]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuMeter:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.monotonic() - self.started

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.interval):
                return

    def _sample(self) -> None:
        for node, last in zip(self.cluster.nodes, self._last):
            for pid in namespace_pids(node.namespace):
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                except OSError:
                    continue
                fields = stat.rpartition(")")[2].split()  # fields from the 3rd (state) on
                utime, stime, started = int(fields[11]), int(fields[12]), int(fields[19])
                last[(pid, started)] = (utime + stime) / CLOCK_TICKS

    def cpu_seconds(self) -> list[float]:
        return [sum(last.values()) for last in self._last]


# ---------------------------------------------------------------------- the two ends of a blast
def _receive(port: int, warmup: float = 0.25) -> None:
    counter = Path(f"/sys/class/net/{DEVICE}/statistics/rx_bytes")
    with socket.create_server(("0.0.0.0", port)) as server:
        connection, _ = server.accept()
    buffer = memoryview(bytearray(1 << 20))
    total, first, start, end = 0, None, None, None  # start, end: (time, payload bytes, counter bytes)
    with connection:
        while read := connection.recv_into(buffer):
            total += read
            now = time.perf_counter()
            first = now if first is None else first
            if start is None and now - first >= warmup:
                start = (now, total, int(counter.read_text()))
            elif start is not None:
                end = (now, total, int(counter.read_text()))
    if start is None or end is None:
        raise SystemExit("the stream ended within its warm-up")
    seconds = end[0] - start[0]
    mbit = {key: (end[i] - start[i]) * 8 / seconds / 1e6 for i, key in ((1, "payload_mbit"), (2, "counter_mbit"))}
    print(json.dumps({"seconds": seconds, **mbit}))


def _send(address: str, port: int, seconds: float) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            connection = socket.create_connection((address, port))
            break
        except ConnectionRefusedError:  # the receiver is not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    chunk = bytes(1 << 20)
    with connection:
        end = time.monotonic() + seconds + 0.25
        while time.monotonic() < end:
            connection.sendall(chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description="The two ends of EmulatedCluster.blast.")
    parser.add_argument("end", choices=["receive", "send"])
    parser.add_argument("--port", type=int, default=5201)
    parser.add_argument("--to", default=None)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    _receive(args.port) if args.end == "receive" else _send(args.to, args.port, args.seconds)


if __name__ == "__main__":
    main()
