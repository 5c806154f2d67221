"""The emulated cluster of ``benchmarks/cluster.py`` (``benchmarks/netns_cluster.py``): shaped links measure near
their rate in both directions, links of a chosen MTU carry frames no larger, nothing is left behind (also after an
exception inside the cluster), and one tiny training configuration runs through the harness with the bytes a single
server's nodes should move.

Needs root, iproute2 and tc's tbf (CI runs as root); skipped, saying why, where a cluster cannot be made."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time

import pytest
from conftest import BENCHMARKS, benchmark

pytestmark = pytest.mark.multiprocess
netns_cluster = benchmark("netns_cluster")


def root_links() -> set[str]:
    listing = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip() for line in listing.splitlines()}


@pytest.fixture
def make_cluster():
    """``make_cluster(nodes, rate_mbit, slow, frame_bytes)`` starts a cluster (or skips the test, saying why);
    all are closed at the end."""
    made = []

    def make(
        nodes: int, rate_mbit: float, slow: dict[int, float] | None = None, frame_bytes: int | str | None = "auto"
    ):
        cluster = netns_cluster.EmulatedCluster(nodes, rate_mbit, slow, frame_bytes=frame_bytes)
        try:
            cluster.start()
        except netns_cluster.ClusterUnavailable as err:
            pytest.skip(f"no emulated cluster here: {err}")
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()


def test_shaped_links_measure_near_their_rate_in_both_directions(make_cluster) -> None:
    before = root_links()
    cluster = make_cluster(3, 200, slow={2: 2.0})  # node 2's link: 100 Mbit/s each way
    measured = {
        "a full-rate link": cluster.blast(0, 1),
        "the slow node's sending end": cluster.blast(2, 0, port=5202),
        "the slow node's receiving end": cluster.blast(0, 2, port=5203),
    }
    for what, blast in measured.items():
        assert 0.70 <= blast["fraction"] <= 1.05, (what, blast)
    assert (
        measured["a full-rate link"]["shaped_mbit"] == 200
        and measured["the slow node's sending end"]["shaped_mbit"] == 100
    )
    cluster.close()
    assert cluster.leftovers() == [] and root_links() == before


def link_details(namespace: str, device: str) -> str:
    return subprocess.run(
        ["ip", "-d", "-n", namespace, "link", "show", device], capture_output=True, text=True, check=True
    ).stdout


def test_frames_of_a_chosen_size_are_all_the_wire_carries(make_cluster) -> None:
    """With ``frame_bytes`` both ends of every link have that MTU and segment every packet to it (the bridge
    follows its ports), and the link still reaches its rate; with ``None`` the veths keep MTU 1500 and pass GSO
    packets of many segments; by default a link slower than about 270 Mbit/s gets 9000-byte frames."""
    cluster = make_cluster(2, 200, frame_bytes=4000)
    node = cluster.nodes[0]
    for namespace, device in ((node.namespace, node.device), (cluster.switch, node.port)):
        details = link_details(namespace, device)
        assert " mtu 4000 " in details and "gso_max_segs 1 " in details, details
    assert " mtu 4000 " in link_details(cluster.switch, "br0")
    assert 0.70 <= cluster.blast(0, 1)["fraction"] <= 1.05
    gso = make_cluster(1, 200, frame_bytes=None).nodes[0]
    details = link_details(gso.namespace, gso.device)
    assert " mtu 1500 " in details and "gso_max_segs 1 " not in details, details
    by_default = make_cluster(1, 200).nodes[0]
    details = link_details(by_default.namespace, by_default.device)
    assert " mtu 9000 " in details and "gso_max_segs 1 " in details, details


def test_links_get_jumbo_frames_where_tbf_would_split_gso_packets() -> None:
    """``frames_for``: 9000-byte frames wherever a 64 KiB GSO packet (about 67 KiB with its segments' headers)
    exceeds tbf's bucket of 2 ms at the rate, chosen by the slowest link of the cluster."""
    assert netns_cluster.frames_for(250) == 9000 and netns_cluster.frames_for(270) == 9000
    assert netns_cluster.frames_for(280) is None and netns_cluster.frames_for(1000) is None
    assert netns_cluster.EmulatedCluster(4, 1000, {3: 3.0}).frame_bytes is None  # 333 Mbit/s
    assert netns_cluster.EmulatedCluster(4, 1000, {3: 10.0}).frame_bytes == 9000  # 100 Mbit/s
    assert netns_cluster.EmulatedCluster(2, 100, frame_bytes=None).frame_bytes is None


def test_a_frame_larger_than_a_link_carries_is_refused(monkeypatch) -> None:
    with pytest.raises(ValueError, match="jumbo frames"):
        netns_cluster.EmulatedCluster(2, 200, frame_bytes=100_000)
    with pytest.raises(ValueError, match="'auto'"):
        netns_cluster.EmulatedCluster(2, 200, frame_bytes="jumbo")
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # cluster.py imports throughput.py, which imports launch.py
    frames_argument = importlib.import_module("cluster").frames_argument
    assert frames_argument("GSO") is None and frames_argument("auto") == "auto" and frames_argument("9000") == 9000
    for wrong in ("100000", "0", "jumbo"):
        with pytest.raises(argparse.ArgumentTypeError, match="576 to 16384"):
            frames_argument(wrong)


def test_nothing_is_left_behind_after_an_exception_inside_the_cluster(make_cluster) -> None:
    make_cluster(1, 100)  # skips here if no cluster can be made
    before = root_links()
    cluster = netns_cluster.EmulatedCluster(2, 100)
    with pytest.raises(RuntimeError, match="a failed run"):
        with cluster:
            sleeper = cluster.popen(1, ["sleep", "600"])
            deadline = time.monotonic() + 10  # `ip netns exec` joins the namespace, then execs: not at once
            while cluster.pids(1) != [sleeper.pid] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert cluster.pids(1) == [sleeper.pid]
            raise RuntimeError("a failed run")
    assert sleeper.wait(timeout=10) == -9  # killed with its namespace
    assert cluster.leftovers() == [] and root_links() == before
    assert not any(name.startswith(cluster.tag) for name in netns_cluster.namespaces())


def test_one_training_configuration_runs_through_the_harness(make_cluster, tmp_path, monkeypatch) -> None:
    """One server, K = N = 2, 1M parameters: each node sends and receives about one model size per step (the
    worker its gradient and the answer; the server's node the same, the other way), read from the counters."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # cluster.py imports throughput.py, which imports launch.py
    cluster_py = importlib.import_module("cluster")
    cluster = make_cluster(2, 1000)
    args = argparse.Namespace(batch=32)
    result = cluster_py.run(cluster, "K=2", "1m", 6, args, tmp_path / "run", port=29511, timeout=120)
    assert "failed" not in result, "\n-----\n".join(result["log_tails"])
    assert result["samples_per_s"] > 0
    for node in result["per_node"]:
        assert node["batches"] == 6
        assert 0.95 <= node["sent_sizes_per_step"] <= 1.3, result["per_node"]
        assert 0.95 <= node["received_sizes_per_step"] <= 1.3, result["per_node"]
        assert 0 < node["cpu"] <= 2.5
        assert 0 < node["waiting"] < 1  # the share of its time in its exchange with the server: not all of it
    assert all(sent > 6 * 4 * 1_058_058 for sent in result["whole_run"]["tx_bytes"])
    assert cluster.pids(0) == [] and cluster.pids(1) == []  # the run's processes are gone


def test_the_exchange_benchmark_measures_every_pattern_on_shaped_links(make_cluster) -> None:
    """``benchmarks/exchange.py`` (gloo's traffic patterns, 2 nodes, a small model): every pattern's share of the
    link's rate is a plausible fraction, in both sittings."""
    make_cluster(1, 100)  # skips here if no cluster can be made
    command = [sys.executable, str(BENCHMARKS / "exchange.py"), "--nodes", "2", "--rates", "200"]
    finished = subprocess.run(
        [*command, "--numel", "2000000", "--repeats", "1"], capture_output=True, text=True, timeout=300
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    (row,) = [line for line in finished.stdout.splitlines() if "Mbit/s" in line and "share" not in line]
    shares = [float(value) for value in row.split("Mbit/s")[1].replace("/", " ").split()]
    assert len(shares) == 8 and all(0.2 < share <= 1.1 for share in shares), finished.stdout
