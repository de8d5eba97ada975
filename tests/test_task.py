"""The runner-task contract (chemscale.task): every registered task keeps it; the base module's state is compatible."""

import pytest
import torch

from chemscale import run_config, task, train
from chemscale.config import ConfigError


@pytest.mark.parametrize("name", sorted(run_config.TASKS))
def test_every_task_declares_what_the_runner_reads(name):
    kind = run_config.task_kind(name)
    assert set(kind.SECTIONS) == {"model", "data"} and all(isinstance(c, type) for c in kind.SECTIONS.values())
    assert isinstance(kind.EXTRA_COLUMNS, tuple) and not set(kind.EXTRA_COLUMNS) & set(train.METRIC_COLUMNS)
    assert callable(kind.build) and callable(kind.validate)
    modules = [v for v in vars(kind).values() if isinstance(v, type) and issubclass(v, task.TaskModule)
               and v is not task.TaskModule]
    assert len(modules) == 1, f"{name}: one TaskModule subclass, found {modules}"
    for method in ("step_loss", "val_sums"):  # what a task must supply
        assert getattr(modules[0], method) is not getattr(task.TaskModule, method), f"{name} lacks {method}"


def test_an_unknown_task_is_named_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"x.json: key 'task' = 'xyz'; known tasks: \['chemgpt', 'ff'\]"):
        run_config.task_kind("xyz", "x.json")
    with pytest.raises(ConfigError, match=r"key 'task' = 'chemgtp' \(did you mean 'chemgpt'\?\); known tasks"):
        run_config.task_kind("chemgtp", "x.json")


def _module():
    return task.TaskModule(torch.nn.Linear(2, 1), run_config.TrainConfig())


def test_checkpoint_state_round_trips_and_older_checkpoints_load():
    saved = _module()
    saved.samples_seen, saved.samples_at_best, saved.best_val_metrics = 1200, 800, {"energy_mae_mev": 3.5}
    checkpoint = {}
    saved.on_save_checkpoint(checkpoint)
    loaded = _module()
    loaded.on_load_checkpoint(checkpoint)
    assert (loaded.samples_seen, loaded.samples_at_best, loaded.best_val_metrics) == (1200, 800, {"energy_mae_mev": 3.5})
    older = _module()  # a checkpoint written before the counters were called samples
    older.on_load_checkpoint({"chemscale": {"tokens_seen": 640, "tokens_at_best": 320}})
    assert (older.samples_seen, older.samples_at_best) == (640, 320)


def test_schedule_is_the_base_modules():
    module = _module()
    module.lr, module.warmup_steps, module.max_steps = 1e-2, 4, 20
    opt_and_sched = module.configure_optimizers()
    opt, sched = opt_and_sched["optimizer"], opt_and_sched["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW) and opt_and_sched["lr_scheduler"]["interval"] == "step"
    rates = []
    for _ in range(20):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])  # linear warm-up
    assert rates[-1] == pytest.approx(1e-2 * task.lr_lambda(4, 20)(19)) and 1e-3 < rates[-1] < 1.1e-3  # cosine to 10%


def test_metrics_of_a_run_from_before_the_samples_column_resume(tmp_path):
    path = tmp_path / "metrics.csv"
    old = ("step,epoch,tokens,flops,train_loss,val_loss,current_lr\n1,0,,,2.5,,0.001\n2,0,,,2.25,,0.001\n"
           "2,0,512,1000.0,,2.4,\n3,0,,,2.0,,0.001\n")
    path.write_text(old)
    log = train.MetricsLog(path)
    assert log.truncate_after(2) == 1  # the row past the checkpoint goes
    assert path.read_text() == ("step,epoch,samples,flops,train_loss,val_loss,current_lr\n1,0,,,2.5,,0.001\n"
                                "2,0,,,2.25,,0.001\n2,0,512,1000.0,,2.4,\n")
    path.write_text(old.replace("tokens", "atoms"))
    with pytest.raises(train.BadMetrics, match="metrics.csv: starts with the header step,epoch,atoms,flops,.*, not "
                                               "step,epoch,samples,flops"):
        train.MetricsLog(path).truncate_after(2)


def _two_ranks(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        module = _module()
        module.log = lambda *a, **k: None  # no trainer here: what the base logs is checked through its sums
        for step in range(3):  # rank 0 counts 5 samples a step, rank 1 counts 7
            module._samples = module._samples + (5 if rank == 0 else 7)
        module.on_validation_epoch_start()
        module.val_sums = lambda batch: torch.tensor([2.0 * batch, batch], dtype=torch.float64)  # loss 2 each
        module.val_metrics = lambda sums: {"count": float(sums[1])}
        for batch in ([1.0, 3.0] if rank == 0 else [4.0]):
            module.validation_step(batch, 0)
        module.on_validation_epoch_end()
        out.put((rank, module.samples_seen, module.samples_this_process, module.extra_val))
    finally:
        dist.destroy_process_group()


def test_samples_and_validation_sums_are_summed_over_ranks():
    """Under DDP every rank ends a validation with the run's totals (2 CPU processes, gloo)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_two_ranks, args=(rank, port, out)) for rank in (0, 1)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == [(0, 36, 36, {"count": 8.0}), (1, 36, 36, {"count": 8.0})]


@pytest.mark.parametrize("rel,threshold", [(0.0, 1e-4), (0.02, 0.02)])
def test_the_plateau_schedule_counts_improvement_as_early_stopping_does(rel, threshold):
    """A validation that early stopping would not count as a gain does not count for the plateau either."""
    from chemscale.run_config import TrainConfig
    from chemscale.task import TaskModule

    tcfg = TrainConfig(schedule="plateau", min_rel_improvement=rel, plateau_patience=0, patience=0, lr=1.0,
                       warmup_steps=0)
    module = TaskModule(torch.nn.Linear(2, 1), tcfg)
    opt = module.configure_optimizers()["optimizer"]
    assert module.plateau.threshold == threshold and module.plateau.threshold_mode == "rel"
    module.plateau.step(1.0)
    module.plateau.step(1.0 - 0.5 * threshold)  # a gain below the threshold: the rate is halved (patience 0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_throughput_of_a_process_that_trained_nothing_is_none_not_zero():
    """A run resumed after its last step (killed before result.json) trains nothing in that process."""
    assert task.throughput(0, 0.0) is None and task.throughput(0, 2.5) is None
    assert task.throughput(1000, 2.0) == 500.0
