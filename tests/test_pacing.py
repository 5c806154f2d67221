"""Per-step LR schedules paced by the server's progress (the multi-process fits: test_pulled_work.py)."""

from types import SimpleNamespace

import torch
from pytorch_lightning.utilities.types import LRSchedulerConfig

from lightning_hybrid.pacing import ServerPacedScheduler, pace_step_schedulers


def one_cycle(total: int = 20) -> torch.optim.lr_scheduler.OneCycleLR:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=total)
    optimizer.step()  # as training does before a scheduler steps (no gradient: nothing changes)
    return scheduler


def test_each_step_catches_up_with_the_servers_progress_in_ddp_steps() -> None:
    progress = iter([0.5, 1.0, 1.0, 3.5, 7.0, 6.0])  # a slow rank's step may see several DDP steps go by
    paced, reference = ServerPacedScheduler(one_cycle(), lambda: next(progress)), one_cycle()
    for due in [0, 1, 1, 3, 7, 7]:  # never back: an answer never says less than an earlier one
        paced.step()
        assert paced.last_epoch == due
        while reference.last_epoch < due:
            reference.step()
        assert paced.get_last_lr() == reference.get_last_lr()
        assert paced.optimizer.param_groups[0]["momentum"] == reference.optimizer.param_groups[0]["momentum"]


def test_a_frequency_steps_once_per_that_many_ddp_steps_and_the_state_is_the_schedulers() -> None:
    progress = iter([1.0, 2.0, 5.9, 6.0])
    paced = ServerPacedScheduler(one_cycle(), lambda: next(progress), frequency=2)
    for due in [0, 1, 2, 3]:
        paced.step()
        assert paced.last_epoch == due
    assert paced.state_dict() == paced.scheduler.state_dict()
    paced.load_state_dict(one_cycle().state_dict())
    assert paced.scheduler.last_epoch == 0


def test_only_per_step_schedules_are_paced_and_the_users_come_back() -> None:
    step, epoch = one_cycle(), one_cycle()
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(step.optimizer)
    configs = [
        LRSchedulerConfig(step, interval="step", frequency=3),
        LRSchedulerConfig(epoch, interval="epoch"),
        LRSchedulerConfig(plateau, interval="step", reduce_on_plateau=True, monitor="loss"),
    ]
    restore = pace_step_schedulers(SimpleNamespace(lr_scheduler_configs=configs), lambda: 6.0)
    assert isinstance(configs[0].scheduler, ServerPacedScheduler) and configs[0].scheduler.scheduler is step
    assert configs[0].frequency == 1  # Lightning asks after every step; the pacer counts the 3 in DDP steps
    assert [config.scheduler for config in configs[1:]] == [epoch, plateau]  # a metric, not steps, moves a plateau
    configs[0].scheduler.step()
    assert step.last_epoch == 2  # 6 DDP steps at a frequency of 3
    restore()
    assert [config.scheduler for config in configs] == [step, epoch, plateau]
    assert configs[0].frequency == 3
