"""A subprocess launcher whose children run exactly their parent's Hydra job, also under ``--multirun``.

Lightning's launcher starts ranks 1..n-1 by re-running the parent's command line. Under Hydra it
appends ``hydra.run.dir=...`` to the parent's ``sys.argv``, so in a ``--multirun`` sweep a child either
re-runs the whole sweep or fails on the sweep syntax. Here a child gets the job's own overrides
(``HydraConfig.get().overrides.task``, e.g. ``strategy=sync seed=1``) and the job's output directory,
and runs that one job.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from typing_extensions import override

from .lightning_api import _SubprocessScriptLauncher
from .lockstep import children_command

# What Lightning's launcher (or torchrun) sets to tell a process which rank it is and where to connect.
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def environment_for_a_new_launch() -> dict[str, str]:
    """This process's environment without :data:`LAUNCH_VARIABLES`, so that a script started with it
    launches and connects ranks of its own."""
    return {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}


def hydra_job_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command and working directory that run the current Hydra job (one job) as rank ``local_rank``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    config = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += ["--config-name", config.job.config_name, *config.overrides.task]
    command += [
        f"hydra.run.dir={config.runtime.output_dir}",
        f"hydra.job.name={config.job.name}_rank{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


class HydraJobLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher, with children started by :func:`hydra_job_command` under Hydra."""

    @override
    def _call_children_scripts(self) -> None:
        with children_command(hydra_job_command):
            super()._call_children_scripts()
