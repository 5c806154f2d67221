"""A W&B workspace for the hybrid's telemetry, built with wandb's own workspaces API.

    python -m lightning_hybrid.app.dashboard --entity ENTITY --project PROJECT

creates (online) a saved view with the threshold, version, update size, staleness and per-worker panels that
``ThresholdScheduler`` logs. Offline (``WANDB_MODE=offline``) it builds the same workspace and prints
what it would create.
"""

from __future__ import annotations

import argparse
import os

THRESHOLD_PANELS = ["hybrid/threshold", "hybrid/version", "hybrid/gradients_per_update", "hybrid/rejected"]
UPDATE_PANELS = ["hybrid/step_scale", "hybrid/momentum", "hybrid/dropped"]
STALENESS_PANELS = ["hybrid/staleness_mean", "hybrid/staleness_max", "hybrid/staleness_p50", "hybrid/staleness_p95"]
WORKER_METRICS = ["steps", "wait_fraction", "samples_per_s"]


def build_workspace(entity: str, project: str, name: str = "hybrid_sgd telemetry"):  # -> wandb_workspaces Workspace
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as err:
        raise ImportError(
            "the dashboard needs wandb's workspaces API: pip install 'lightning-hybrid[dashboard]'"
        ) from err

    def line(metric: str) -> wr.LinePlot:
        return wr.LinePlot(title=metric, x="trainer/global_step", y=[metric])

    return ws.Workspace(
        name=name,
        entity=entity,
        project=project,
        sections=[
            ws.Section(name="threshold", panels=[line(m) for m in THRESHOLD_PANELS], is_open=True),
            ws.Section(name="updates", panels=[line(m) for m in UPDATE_PANELS], is_open=True),
            ws.Section(name="staleness", panels=[line(m) for m in STALENESS_PANELS], is_open=True),
            ws.Section(
                name="workers",
                panels=[
                    wr.LinePlot(title=m, x="trainer/global_step", metric_regex=f"hybrid/worker\\d+/{m}")
                    for m in WORKER_METRICS
                ],
                is_open=True,
            ),
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entity", required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--name", default="hybrid_sgd telemetry")
    args = parser.parse_args()
    workspace = build_workspace(args.entity, args.project, args.name)
    panels = sum(len(section.panels) for section in workspace.sections)
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled"):
        print(
            f"offline: built workspace {args.name!r} with {panels} panels for {args.entity}/{args.project}; not saved"
        )
        return
    workspace.save()
    print(f"saved workspace {args.name!r} with {panels} panels: {workspace.url}")


if __name__ == "__main__":
    main()
