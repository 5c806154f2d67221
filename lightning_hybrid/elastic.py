"""Restarts under TorchElastic (``torchrun --max-restarts R``): each restart round forms its groups afresh.

The torchrun agent (torch 2.13 here) shares its rendezvous TCPStore with the workers
(``TORCHELASTIC_USE_AGENT_STORE=True``; opt out with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``), and torch's env://
rendezvous then uses that store without a per-round prefix. The same store outlives a failed round, so the
restarted workers read the dead round's gloo addresses and fail with "Connection refused" (torch issues
"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0 is not compatible with torchelastic restarts"). Here the default process
group, and with it every channel and the pulled-work counters, lives under a prefix named by the rendezvous round.

With ``--nnodes MIN:MAX`` the node count may change between rounds: a node that dies ends the round (a restart,
counted) and the survivors go on alone; a node that joins makes the agents start a new round without counting a
restart. So a round is named by its restart count and its world size together: within one restart count the
rounds are joins, each with more workers than the last.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch.distributed as dist


def restart_round() -> int:
    """TorchElastic's restart count: 0 for the first round and outside torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def restart_round_store(world_size: int, timeout: timedelta) -> Optional[dist.Store]:
    """The agent's shared store, namespaced by the restart round; ``None`` where torchrun does not share its store
    (then torch's own env:// rendezvous is right)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"hybrid_sgd/round{restart_round()}-of-{world_size}", agent_store)


def restarts_allowed() -> bool:
    """Launched by ``torchrun --max-restarts R`` with R > 0: the agent restarts the workers after a failure."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0


def nodes_in_this_round() -> Optional[int]:
    """The nodes torchrun formed for this round (its world size over the processes per node), or ``None`` outside
    torchrun. Under ``--nnodes MIN:MAX`` it can differ from round to round."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "LOCAL_WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"])
