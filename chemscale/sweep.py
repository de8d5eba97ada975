"""Sweeps: generate run configs from a base and axes, run the unfinished ones, collect results.

    base = sweep.base_config("chemgpt", globals(), model={"depth": 2}, data={"source": "moses"})
    configs = sweep.grid("chemgpt_scaling", base, width=[32, 64], n_train_molecules=[1000, 10000])
    sweep.run(configs, **sweep.run_options(globals()))   # local processes, or Slurm jobs through submitit
    df = sweep.collect("chemgpt_scaling")    # one row per run: config columns + result columns
    fits = scaling.fit_groups(sweep.converged(df), ...)   # converged runs only: a capped loss is the budget's

Run ids are hashes of the config, so re-running a notebook finds the finished runs and skips
them, and an interrupted sweep resumes where it stopped (an unfinished run resumes from its
last checkpoint). Every run is `python -m chemscale.train RUN_DIR` in its own process.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from chemscale import paths, runs
from chemscale.config import ConfigError, atomic_write_json, from_dict

SECTIONS = ("model", "data", "train")
EXIT_MARK = "chemscale.sweep: the run's process exited with code"  # appended to train.log on failure
STOP_MARK = "chemscale.sweep: stopped by the sweep"  # appended to train.log, with when, why and the checkpoint's step
ELSEWHERE_MARK = "chemscale.sweep: left to the other process that trains this run"
PARENT_ENV = "CHEMSCALE_SWEEP_PARENT"  # pid of the sweep; its child dies with it (chemscale.train.die_with_parent)
GRACE_S = 10.0  # seconds an interrupted run gets to exit after SIGTERM before SIGKILL
EXECUTORS = ("local", "slurm", "submitit-local")
MAX_RESUBMITS = 3  # times a failed or timed-out submitit job is submitted again, resuming from its checkpoint
JOB_START_S = 120.0  # estimate of a job's start before its first step: Python, torch, data (a shared file system)
DEFAULT_TIMEOUT_MIN = 24 * 60  # a job's time limit when neither the params nor a measured step time give one
POLL_S = 1.0  # seconds between looks at the submitted jobs
JOB_RECORD = "submitit.json"  # in a run folder: its last submitit job (id, executor, folder), for a restarted sweep
# Slurm states of a job that has not ended: what submitit's own Job.done() waits on, less UNKNOWN (a job that sacct
# cannot tell of any more, or cannot be asked about, is taken as ended). A restarted sweep waits on a recorded job
# in one of these states instead of submitting the run again.
LIVE_STATES = ("READY", "PENDING", "RUNNING", "REQUEUED", "COMPLETING", "PREEMPTED")


class SweepFailed(RuntimeError):
    """No run of a sweep finished; the message lists each run's train.log."""


class Stopped(KeyboardInterrupt):
    """SIGTERM reached a sweep (`kill`, a batch system's time limit, `chemscale.study` stopped): handled as Ctrl-C
    is (the sweep's runs are stopped, its submitit jobs cancelled), then the process ends as SIGTERM ends it."""


def _section_fields(task: str) -> dict[str, set[str]]:
    """Field names of each config section of a task, from its dataclasses."""
    import dataclasses

    from chemscale.run_config import TrainConfig, task_kind

    module = task_kind(task)
    return {"train": {f.name for f in dataclasses.fields(TrainConfig)},
            **{s: {f.name for f in dataclasses.fields(cls)} for s, cls in module.SECTIONS.items()}}


def _set_axis(config: dict, key: str, value) -> None:
    """Set `key` ('width', 'model.width' or a top-level key like 'seed') in a run config."""
    if "." in key:
        section, name = key.split(".", 1)
        config.setdefault(section, {})[name] = value
        return
    if key in ("seed", "task"):
        config[key] = value
        return
    owners = [s for s, names in _section_fields(config.get("task")).items() if key in names]
    if len(owners) != 1:
        where = "no section" if not owners else f"sections {owners}"
        raise ConfigError(f"sweep axis '{key}' is a key of {where} of a {config.get('task')!r} run config"
                          + ("; write it as 'section.key'" if owners else ""))
    config.setdefault(owners[0], {})[key] = value


def validate(config: dict, source: str = "<sweep config>") -> None:
    """Check every section of a run config now, before any run starts."""
    from chemscale.run_config import check_top_level, parse_train_config, task_kind

    task = task_kind(config.get("task"), source)
    check_top_level(config, task, source)
    parse_train_config(config, source)
    task.validate(config, source)


def check_data(configs: list[dict], progress: bool = False) -> None:
    """Refuse training-set sizes that the data cannot give, before any run starts.

    Configs that differ only in their data sizes (the `n_*` keys of `data`) read the same
    data: each such group is checked once, at its largest sizes, by its task's `validate`.
    """
    from chemscale.run_config import task_kind

    largest: dict[str, dict] = {}
    for config in configs:
        data = config.get("data", {})
        sizes = {k: v for k, v in data.items() if k.startswith("n_") and isinstance(v, int)}
        rest = {k: v for k, v in data.items() if k not in sizes}
        key = json.dumps([config.get("task"), rest], sort_keys=True, default=str)
        if key not in largest:
            largest[key] = copy.deepcopy(config)
        kept = largest[key].setdefault("data", {})
        kept.update({k: max(v, kept.get(k, v)) for k, v in sizes.items()})
    for config in largest.values():
        task_kind(config.get("task")).validate(config, f"sweep {config.get('study')}", data=True, progress=progress)


def base_config(task: str, params: Mapping, *, model: dict | None = None, data: dict | None = None) -> dict:
    """A sweep's base run config from a notebook's parameters (`globals()`), for `grid`.

    The train section is every `TrainConfig` field that `params` holds (batch_size, lr,
    precision, accelerator, devices, num_nodes, ...) and nothing else, so a notebook parameter
    named like a run-config key reaches the run without notebook code, and a name that is not
    one never does. `strategy` is "ddp" when a run spans more than one device (devices *
    num_nodes > 1), unless `params` sets it. `seed` is taken when present; `model` and `data`
    are the task's own sections, as the notebook writes them. The train fields are checked here:
    a notebook global that only happens to share a field's name (a module, None, "auto") is
    refused naming its key, not left to fail later in `int()` or a deep copy.
    """
    import dataclasses

    from chemscale.run_config import TrainConfig

    train = {f.name: params[f.name] for f in dataclasses.fields(TrainConfig) if f.name in params}
    from_dict(TrainConfig, train, "notebook parameters (the run config's train section)")
    if "strategy" not in train:
        train["strategy"] = "ddp" if int(train.get("devices", 1)) * int(train.get("num_nodes", 1)) > 1 else "auto"
    seed = {"seed": params["seed"]} if "seed" in params else {}
    return {"task": task, **seed, "model": copy.deepcopy(dict(model or {})),
            "data": copy.deepcopy(dict(data or {})), "train": train}


def run_options(params: Mapping) -> dict:
    """`sweep.run`'s executor, parallel, slurm and max_resubmits options from a notebook's parameters (`globals()`).

    `slurm` is a dict of submitit parameters (checked by `run` before any job); parameters left out get
    `run`'s defaults (local, one run at a time, 3 resubmissions).
    """
    slurm = params.get("slurm", {})
    if not isinstance(slurm, Mapping):
        raise ConfigError(f"notebook parameter 'slurm' must be a mapping of submitit parameters, e.g. "
                          f"{{slurm_partition: gpu, timeout_min: 720}}, got {slurm!r}")
    return {"executor": params.get("executor", "local"), "parallel": params.get("parallel"), "slurm": dict(slurm),
            "max_resubmits": params.get("max_resubmits", MAX_RESUBMITS)}


def grid(study: str, base: dict, **axes) -> list[dict]:
    """One config per point of the Cartesian product of `axes` over `base`, validated."""
    names = list(axes)
    configs = []
    for values in itertools.product(*(axes[n] for n in names)):
        config = copy.deepcopy(base)
        config["study"] = study
        for name, value in zip(names, values):
            _set_axis(config, name, value)
        validate(config, f"sweep {study} {dict(zip(names, values))}")
        configs.append(config)
    return configs


# The data-section key that holds a task's training-set size (in the units of `batch_size`).
TRAIN_SIZE = {"chemgpt": "n_train_molecules", "ff": "n_train_structures"}


def budget(configs: list[dict], epochs: float, min_steps: int = 0) -> list[dict]:
    """Give each run a step budget that follows from its point on the curve, not one cap for all.

    A run may take `epochs` passes over its own training set, at least `min_steps` steps (a tiny
    set still gets enough validations to stop early) and at most the config's `max_steps`:
    max_steps = clip(ceil(epochs · n_train / (batch_size · devices · num_nodes)), min_steps, max_steps).
    With early stopping, this is a cap that a converged run does not reach; a run that does reach it
    is marked capped in result.json. The cosine schedule decays over this budget, the run's own. `epochs` = 0 leaves
    every config's max_steps as it is. Returns new configs; the ones given are not changed. A negative or
    non-finite `epochs`, a negative `min_steps`, and a `min_steps` above a config's max_steps (the cap would win
    without a word, and the floor never be given) raise `ConfigError`.
    """
    if not (math.isfinite(epochs) and epochs >= 0):
        raise ConfigError(f"sweep.budget: epochs must be a finite number >= 0 (0: keep each max_steps), got {epochs}")
    if min_steps < 0:
        raise ConfigError(f"sweep.budget: min_steps must be >= 0, got {min_steps}")
    if epochs == 0:
        return [copy.deepcopy(c) for c in configs]
    out = []
    for config in configs:
        config = copy.deepcopy(config)
        train = config.setdefault("train", {})
        if config.get("task") not in TRAIN_SIZE:
            raise ConfigError(f"sweep.budget: task {config.get('task')!r} of {config.get('study')!r}: expected one of "
                              f"{list(TRAIN_SIZE)} (its training-set size gives the budget)")
        key = TRAIN_SIZE[config["task"]]
        # examples per optimizer step: batch_size is per device, and DDP runs devices x num_nodes of them
        n_train = _positive(config.get("data", {}).get(key), f"data {key}", config)
        batch = math.prod(_positive(train.get(k, default), f"train {k}", config)
                          for k, default in (("batch_size", 64), ("devices", 1), ("num_nodes", 1)))
        cap = _positive(train.get("max_steps", 1000), "train max_steps", config)
        if min_steps > cap:
            raise ConfigError(f"sweep.budget: min_steps = {min_steps} is above the cap max_steps = {cap} of "
                              f"{config.get('study')!r} {key} = {n_train}: lower min_steps or raise max_steps")
        train["max_steps"] = max(1, min(cap, max(int(min_steps), math.ceil(epochs * n_train / batch))))
        out.append(config)
    return out


def _positive(value, key: str, config: dict) -> int:
    """`value` as an int >= 1, or a ConfigError naming `key` and the config's study (a bare KeyError, a
    ZeroDivisionError for batch_size 0 or int()'s ValueError would say neither)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (math.isfinite(number) and number >= 1 and number == int(number)):
        raise ConfigError(f"sweep.budget: {key} of {config.get('study')!r} must be a whole number >= 1, got {value!r}")
    return int(number)


def longer(config: dict, factor: float = 3.0) -> dict:
    """The same run with `factor` times its step budget: the check that a point's budget did not set its loss.

    A run's budget is its step cap and, under early stopping, its patience: a converged run ended where
    patience ran out, and the plateau schedule does not depend on the cap, so 3x the cap alone would
    repeat it step for step. Both are scaled (patience rounded up; 0, no early stopping, stays 0), so
    the longer run may train past the point where the first one stopped.
    """
    if not (math.isfinite(factor) and factor > 1):
        raise ConfigError(f"sweep.longer: factor must be a finite number > 1 (a longer budget), got {factor}")
    if "max_steps" not in config.get("train", {}):
        raise ConfigError("sweep.longer: the config has no train max_steps to lengthen; give it a budget first "
                          "(sweep.budget)")
    config = copy.deepcopy(config)
    config["train"]["max_steps"] = math.ceil(factor * int(config["train"]["max_steps"]))
    if config["train"].get("patience"):
        config["train"]["patience"] = math.ceil(factor * int(config["train"]["patience"]))
    return config


def select(configs: list[dict], **where) -> list[dict]:
    """The configs whose values, named as `collect`'s columns ('width', 'n_train_structures'), equal `where`:
    one per run, in grid order (grids that share a point list it once). A `where` no config matches is an error."""
    flats = [_flatten(config) for config in configs]
    columns = sorted(set().union(*flats)) if flats else []
    for key in where:
        if key not in columns:
            import difflib

            close = difflib.get_close_matches(key, columns, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"sweep.select: {key!r} is not a column of these configs{hint}; columns: {columns}")
    out: dict[str, dict] = {}
    for config, flat in zip(configs, flats):
        if all(flat.get(k) == v for k, v in where.items()):
            out.setdefault(runs.run_id(config), config)
    if not out:
        raise ConfigError(f"no run of this grid has {where}: pick values that are on its axes")
    return list(out.values())


def run_dirs(configs: list[dict], root: Path | None = None) -> list[Path]:
    """Create (or find) the run folder of each config."""
    return [runs.create(c["study"], c, root) for c in configs]


def finished(configs: list[dict], root: Path | None = None) -> list[bool]:
    """Whether each config's run has finished, without creating its folder (`run_dirs` does): a notebook counts the
    runs it reuses before `run` checks the executor's parameters, and a refused params file must leave no folder."""
    return [runs.is_finished(Path(root or paths.RUNS) / c["study"] / runs.run_id(c)) for c in configs]


def _train_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "chemscale.train", str(run_dir)]


class _Children:
    """The training processes this sweep started, so an interrupt (Ctrl-C, Jupyter's stop, SIGTERM) can end them.

    Each child runs in its own session: a terminal's Ctrl-C reaches the sweep only, which
    stops the children itself (SIGTERM to each child's process group, so DDP ranks go too;
    SIGKILL after `GRACE_S`) and then re-raises. Once stopping, no new child is started.
    `reason` says why they were stopped, for the line each stopped run gets in its train.log.
    """

    def __init__(self):
        self.lock, self.live, self.stopping, self.reason = threading.Lock(), set(), False, ""

    def start(self, command, **kwargs) -> subprocess.Popen | None:
        with self.lock:
            if self.stopping:
                return None
            process = subprocess.Popen(command, start_new_session=True, **kwargs)
            self.live.add(process)
            return process

    def done(self, process: subprocess.Popen) -> None:
        with self.lock:
            self.live.discard(process)

    def stop(self, reason: str = "interrupted") -> None:
        """SIGTERM to every child's process group, SIGKILL to those still alive after GRACE_S; wait for all."""
        with self.lock:
            if not self.stopping:
                self.stopping, self.reason = True, reason
            live = list(self.live)
        _signal_groups(live, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        while any(p.poll() is None for p in live) and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal_groups([p for p in live if p.poll() is None], signal.SIGKILL)
        for p in live:
            p.wait()


def _signal_groups(processes: list[subprocess.Popen], sig: int) -> None:
    for p in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, sig)


def _why(error: BaseException) -> str:
    """What stopped a sweep, in a few words: 'KeyboardInterrupt' (Ctrl-C, Jupyter's stop) or 'SIGTERM'."""
    return str(error) if isinstance(error, Stopped) else type(error).__name__


def _checkpoint_note(run_dir: Path) -> str:
    """'its last checkpoint (step 40)', or without the step when there is no readable checkpoint. Read without the
    sha256 check that resuming makes (seconds for a large checkpoint, while the sweep is being stopped)."""
    ckpt = Path(run_dir) / runs.CHECKPOINT
    if not ckpt.exists():
        return "the start (no checkpoint yet)"
    try:
        import torch

        step = int(torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)["global_step"])
    except Exception:  # a checkpoint being replaced, or damaged: resuming checks it and says so
        return "its last checkpoint"
    return f"its last checkpoint (step {step})"


def _stop_line(run_dir: Path, why: str) -> str:
    """The line a run stopped by its sweep gets in train.log: when, why, and what the next sweep does with it."""
    return (f"{STOP_MARK} at {time.strftime('%Y-%m-%d %H:%M:%S')} ({why}); run the sweep again to resume this run "
            f"from {_checkpoint_note(run_dir)}")


def _run_local(run_dir: Path, threads: int, children: _Children | None = None) -> int | None:
    """Train one run in a child process, its output in RUN_DIR/train.log; returns the exit code (None if
    the sweep was interrupted before it started)."""
    from chemscale.train import held_elsewhere

    children = children or _Children()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), PARENT_ENV: str(os.getpid()),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(paths.ROOT), os.environ.get("PYTHONPATH")]))}
    with open(run_dir / "train.log", "ab") as log:
        process = children.start(_train_command(run_dir), stdout=log, stderr=subprocess.STDOUT, env=env,
                                 cwd=paths.ROOT)
        if process is None:
            return None
        code = process.wait()  # an interrupt raised here leaves the process in `children`, for its `stop`
        children.done(process)
        if children.stopping:
            log.write(f"\n{_stop_line(run_dir, children.reason)}\n".encode())
        elif code and held_elsewhere(run_dir):  # refused: another process trains it (not a crash of this run)
            log.write(f"\n{ELSEWHERE_MARK}\n".encode())
        elif code:  # also for a run killed without a traceback (e.g. out of memory): it is marked crashed
            log.write(f"\n{EXIT_MARK} {code}\n".encode())
    return code


def _run_all_local(todo: list[Path], parallel: int, threads: int, bar) -> None:
    """Train `todo`, `parallel` at a time; on an interrupt, stop every child and re-raise."""
    children = _Children()
    pool = ThreadPoolExecutor(max_workers=parallel)
    try:
        for _ in pool.map(lambda d: _run_local(d, threads, children), todo):
            bar.update(1)
    except BaseException as e:  # KeyboardInterrupt above all: the children must not train on unseen
        children.stop(_why(e))
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While a sweep trains, SIGTERM raises `Stopped` (a KeyboardInterrupt), so the sweep stops its runs and cancels
    its jobs as for Ctrl-C, each run's train.log saying so; then the process ends by SIGTERM, as it would have.

    `chemscale.study` stops a notebook's kernel with SIGTERM; without this, the kernel died at once and its runs
    were ended by the study or with it, and said nothing. Only where SIGTERM has its default action, in the main
    thread: a handler someone else installed is left alone.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the stopping short
        raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except Stopped:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise  # not reached where SIGTERM ends the process; reached if it is blocked
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _default_parallel() -> tuple[int, int]:
    """(runs at once, threads per run): one run using every core; oversubscribed threads collapse."""
    return 1, max(1, os.cpu_count() or 1)


def run(configs: list[dict], executor: str = "local", *, parallel: int | None = None, threads: int | None = None,
        progress: bool = True, root: Path | None = None, slurm: dict | None = None,
        max_resubmits: int = MAX_RESUBMITS, also: list[dict] = ()) -> pd.DataFrame:
    """Run every unfinished config; returns `collect`-style rows for these configs.

    `also`: configs trained in the same sweep whose rows are not returned (a notebook's 3x-budget
    checks, read by a later `run` of them that finds them finished): they fill the cores that the
    grid's last, longest runs leave idle instead of training alone after it. Local runs start
    longest first (`_cost`).

    Before any run starts, training-set sizes that the data cannot give are refused
    (`check_data`). Runs that fail are listed with their train.log and the sweep goes on; if no
    run finished, `SweepFailed` says so, instead of an empty table failing later in a notebook.
    A run that another process trains (its train.lock held) is reported as "running", not failed.
    An interrupt (Ctrl-C, Jupyter's stop) ends the local runs it started and is re-raised; they
    resume from their last checkpoint next time. A local run also dies with a killed sweep.

    Args:
        executor: "local" (child processes on this machine), "slurm" (one submitit job per run)
            or "submitit-local" (submitit's local executor, for testing the Slurm path).
        parallel, threads: local runs at once and torch threads each (default: 1 run, all cores).
        slurm: submitit parameters for the submitit executors, e.g. {"slurm_partition": "gpu", "slurm_account":
            "chem", "slurm_qos": "normal", "timeout_min": 600, "cpus_per_task": 8, "mem_gb": 64}; checked by
            submitit before any run folder is made (`_job_parameters` gives the defaults).
        max_resubmits: times a submitit job that fails (killed, out of memory, node lost) is submitted again;
            each resumes from the run's last checkpoint. A timed-out or preempted job is requeued by submitit
            itself as often (`_TrainJob.checkpoint`).
    """
    if not configs:
        raise ConfigError("sweep.run: no run configs given (is a sweep axis an empty list?)")
    shown, configs = len(configs), list(configs) + list(also)
    if executor not in EXECUTORS:
        raise ConfigError(f"notebook parameter 'executor' (the params file's key executor) must be one of "
                          f"{', '.join(EXECUTORS)}, got {executor!r}")
    if executor != "local" and importlib.util.find_spec("submitit") is None:  # before data checks and run folders
        raise ConfigError(f"executor {executor!r} needs submitit, which is not installed: pip install submitit "
                          "(or pip install 'chemscale[slurm]'), or use executor 'local'")
    unfinished = [c for c, done in zip(configs, finished(configs, root)) if not done]
    if executor != "local" and unfinished:  # a finished sweep's results are read anywhere, a laptop included
        _check_submitit(unfinished, executor, slurm or {}, max_resubmits, root)
    check_data(unfinished, progress)  # before any run folder is made
    dirs = list(dict.fromkeys(run_dirs(configs, root)))  # sweeps that share a point share its run
    todo = [d for d in dirs if not runs.is_finished(d)]
    if executor == "local":
        todo.sort(key=_cost, reverse=True)
    with _sigterm_as_interrupt():
        if executor == "local":
            default_parallel, default_threads = _default_parallel()
            parallel, threads = parallel or default_parallel, threads or max(1, default_threads // (parallel or 1))
            bar = tqdm(total=len(dirs), initial=len(dirs) - len(todo), desc="runs", disable=not progress)
            try:
                _run_all_local(todo, parallel, threads, bar)
            finally:
                bar.close()
        else:
            _run_submitit(todo, executor, slurm or {}, max_resubmits, root)
    df = collect_dirs(list(dict.fromkeys(run_dirs(configs[:shown], root))))
    running = df[df["status"] == "running"]
    if len(running):
        print(f"{len(running)} of {len(df)} runs are being trained by another process (a second sweep or notebook); "
              f"run this again, or sweep.collect, once it is done:\n{_log_lines(running)}", file=sys.stderr)
    failed = df[~df["status"].isin(["finished", "running"])]
    if len(failed) == len(df):
        which = "the only run" if len(df) == 1 else f"all {len(df)} runs"
        raise SweepFailed(f"{which} of this sweep failed ({_counts(failed)}); nothing to analyse. "
                          f"What went wrong is in each run's train.log:\n{_log_lines(failed)}")
    if len(failed):
        print(f"{len(failed)} of {len(df)} runs did not finish ({_counts(failed)}); see:\n{_log_lines(failed)}",
              file=sys.stderr)
    return df


def _cost(run_dir: Path) -> float:
    """A run's cost, for the order in which a local sweep starts its runs: step cap x batch x width^2 x depth.

    Ordering, not scheduling: the thread pool still takes the runs one after another. Started in grid order,
    the largest model at the largest data size (a sweep's longest run, 30% of notebook 01's) came last and
    trained alone while the other core idled; longest first, the short runs fill in beside it. Only the order
    matters, so the estimate ignores what differs between model families and early stopping."""
    try:
        config = runs.read_config(run_dir)
        model, train = config.get("model", {}), config.get("train", {})
        return (float(train.get("max_steps", 1)) * float(train.get("batch_size", 1))
                * float(model.get("width", 1)) ** 2 * float(model.get("depth", 1)))
    except (OSError, ValueError, TypeError, AttributeError):  # a damaged folder: its run says why, in its turn
        return 0.0


def _counts(failed: pd.DataFrame) -> str:
    """'2 crashed, 1 diverged'."""
    return ", ".join(f"{n} {status}" for status, n in failed["status"].value_counts().sort_index().items())


def _log_lines(failed: pd.DataFrame, limit: int = 20) -> str:
    """One line per failed run: its train.log and the log's last line (usually the error)."""
    lines = [f"  {d}/train.log: {_last_line(Path(d) / 'train.log')}" for d in failed["run_dir"][:limit]]
    if len(failed) > limit:
        lines.append(f"  ... and {len(failed) - limit} more")
    return "\n".join(lines)


def _last_line(log: Path) -> str:
    """The last line of a log that is not our exit-code mark, shortened; '' if there is none."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()]
    except OSError:
        return "(no train.log)"
    lines = [ln for ln in lines if ln and not ln.startswith(EXIT_MARK)]
    return (lines[-1][:200] if lines else "(empty)")


def _seconds_per_step(study_dir: Path) -> float | None:
    """The slowest measured training seconds per step among the study's finished runs (None before any): the
    estimate of a job's step time, since a sweep's runs share hardware and differ in size by a few-fold."""
    rates = []
    for path in study_dir.glob(f"*/{runs.RESULT}"):
        with contextlib.suppress(OSError, ValueError, TypeError, ZeroDivisionError):
            result = json.loads(path.read_text())
            rates.append(float(result["train_seconds"]) / int(result["steps"]))
    return max(rates) if rates else None


def _job_parameters(config: dict, executor: str, slurm: dict, root: Path | None) -> dict:
    """The submitit parameters of one run's job: `slurm` over defaults from the run's own train section.

    Defaults: `nodes = num_nodes` and one task per device (what Lightning DDP expects under Slurm), a GPU per
    device for accelerator gpu, and a time limit for the run's budget: JOB_START_S + max_steps x the study's
    measured seconds per step (`_seconds_per_step`), x1.5 and at least 60 minutes, or DEFAULT_TIMEOUT_MIN
    before any run of the study has finished. A time limit (timeout_min, or slurm_time in minutes) that
    cannot reach the run's first checkpoint, JOB_START_S + val_every_steps x that step time, is refused:
    the job would be requeued again and again without ever saving progress.
    """
    t = config.get("train", {})
    devices, nodes = int(t.get("devices", 1)), int(t.get("num_nodes", 1))
    step_s = _seconds_per_step(Path(root or paths.RUNS) / config["study"])
    budget_s = JOB_START_S + int(t.get("max_steps", 1000)) * step_s if step_s is not None else None
    params = {"timeout_min": DEFAULT_TIMEOUT_MIN if budget_s is None else max(60, math.ceil(1.5 * budget_s / 60)),
              "nodes": nodes, "tasks_per_node": devices, "name": f"chemscale-{runs.run_id(config)}"}
    if executor == "slurm" and t.get("accelerator") == "gpu":
        params["gpus_per_node"] = devices
    if executor == "submitit-local":
        params.pop("nodes"), params.pop("tasks_per_node")
    params |= slurm
    limit = params.get("slurm_time", params["timeout_min"]) if executor == "slurm" else params["timeout_min"]
    minutes = _minutes(limit)
    first_checkpoint_s = JOB_START_S + int(t.get("val_every_steps", 100)) * (step_s or 0.0)
    if minutes is not None and 60 * minutes < first_checkpoint_s:
        steps = (f"val_every_steps = {t.get('val_every_steps', 100)} steps at the {config['study']} runs' measured "
                 f"{step_s:.3g} s per step" if step_s is not None else "no run of the study has measured a step yet")
        raise ConfigError(f"notebook parameter 'slurm': a time limit of {limit!r} ({minutes:g} minutes) is shorter "
                          f"than a job needs to reach its first checkpoint (~{first_checkpoint_s / 60:.1f} minutes: "
                          f"{JOB_START_S:.0f} s to start; {steps}); raise timeout_min")
    return params


def _minutes(limit) -> float | None:
    """A job's time limit in minutes: a number (timeout_min), or Slurm's text for slurm_time ('90', '1:30:00',
    '2-12:00'; minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]]), which submitit passes
    to sbatch unchecked. None for text that is none of these ('UNLIMITED'): sbatch is left to judge it."""
    if isinstance(limit, int | float) and not isinstance(limit, bool):
        return float(limit)
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(limit).strip())
    if not match:
        return None
    days, *fields = match.groups()
    numbers = [int(f) for f in fields if f is not None]
    if days is not None:  # days-hours[:minutes[:seconds]]
        hours, mins, secs = (numbers + [0, 0])[:3]
        hours += 24 * int(days)
    else:  # minutes, minutes:seconds or hours:minutes:seconds
        hours, mins, secs = {1: [0, *numbers, 0], 2: [0, *numbers], 3: numbers}[len(numbers)]
    return 60 * hours + mins + secs / 60


def _executor(executor: str, folder: Path, max_resubmits: int):
    """submitit's executor: the local one for "submitit-local", else Slurm's (a ConfigError off a Slurm cluster).
    A timed-out or preempted job is requeued by submitit up to `max_resubmits` times."""
    import submitit

    cluster = "local" if executor == "submitit-local" else "slurm"
    try:
        return submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=max_resubmits,
                                     local_max_num_timeout=max_resubmits)
    except RuntimeError as e:  # submitit: 'Could not detect "srun", are you indeed on a slurm cluster?'
        raise ConfigError(f"notebook parameter 'executor' (the params file's key executor) is {executor!r}, but "
                          f"this machine is not a Slurm cluster node ({e}); run from a login node, or use "
                          f"executor local") from None


def _check_submitit(configs: list[dict], executor: str, slurm: dict, max_resubmits: int, root: Path | None) -> None:
    """Every job's parameters through submitit's own checks (names per executor, types) before any run folder or
    job is made, so a misspelt key fails at once, named, not after hours in the queue."""
    import tempfile

    if isinstance(max_resubmits, bool) or not isinstance(max_resubmits, int) or max_resubmits < 0:
        raise ConfigError(f"notebook parameter 'max_resubmits' must be an integer >= 0, got {max_resubmits!r}")
    bad = [k for k in slurm if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"notebook parameter 'slurm': keys must be submitit parameter names, got {bad}")
    for key, value in slurm.items():
        _check_amount(key, value)
    with tempfile.TemporaryDirectory() as folder:
        # the local executor checks every executor's parameter names and the shared ones' types; on a
        # cluster, Slurm's own executor also checks the values as it writes the sbatch script
        checkers = [_executor("submitit-local", Path(folder) / "local", max_resubmits)]
        if executor == "slurm":
            checkers.append(_executor("slurm", Path(folder) / "slurm", max_resubmits))
        for config in configs:
            params = _job_parameters(config, executor, slurm, root)
            for checker in checkers:
                try:
                    checker.update_parameters(**params)
                except (NameError, AssertionError, ValueError, TypeError) as e:
                    if checker.cluster == "local" and executor == "slurm" and isinstance(e, ValueError):
                        continue  # the local executor's own limits (one node) are not Slurm's
                    raise ConfigError(f"notebook parameter 'slurm' (the params file's key slurm): submitit "
                                      f"refuses {slurm}: {str(e).splitlines()[0]}{_close_names(slurm)}") from None


# submitit parameters that are amounts, and what each must be: submitit passes them on unchecked (to sbatch, or to
# its local executor), so a negative memory or zero CPUs failed in the queue, or meant something else there.
_POSITIVE, _COUNT, _NATURAL = "a number > 0", "an integer >= 1", "an integer >= 0"
_AMOUNTS = {"timeout_min": _POSITIVE, "slurm_time": _POSITIVE, "mem_gb": _POSITIVE,
            **dict.fromkeys(("nodes", "tasks_per_node", "cpus_per_task", "slurm_nodes", "slurm_ntasks_per_node",
                             "slurm_cpus_per_task", "slurm_cpus_per_gpu", "slurm_array_parallelism"), _COUNT),
            **dict.fromkeys(("gpus_per_node", "slurm_gpus_per_node", "slurm_gpus_per_task", "slurm_num_gpus",
                             "slurm_signal_delay_s"), _NATURAL)}


def _check_amount(key: str, value) -> None:
    """Refuse an amount in `_AMOUNTS` that no job can have (negative, zero where it must be positive, not finite, a
    fraction of a count), naming the params key; text (slurm_time: '1:00:00') is left to submitit and sbatch, except
    a negative one."""
    rule = _AMOUNTS.get(key)
    if rule is None:
        return
    if isinstance(value, int | float) and not isinstance(value, bool):
        ok = math.isfinite(value) and (value > 0 if rule == _POSITIVE else
                                       float(value).is_integer() and value >= (1 if rule == _COUNT else 0))
    else:
        ok = not str(value).strip().startswith("-")
    if not ok:
        raise ConfigError(f"notebook parameter 'slurm' (the params file's key slurm): {key} must be {rule}, got "
                          f"{value!r}")


def _close_names(slurm: dict) -> str:
    """The hint " (did you mean 'slurm_partition' for 'partiton'?)" for the keys of `slurm` that submitit knows no
    parameter by, from the names it accepts: its shared ones (timeout_min, mem_gb, ...) and each executor's, prefixed
    (slurm_qos) or bare (qos, which submitit takes for slurm_qos)."""
    import difflib

    from submitit.auto.auto import AutoExecutor
    from submitit.core import plugins

    names = {name: name for name in AutoExecutor._typed_parameters()}
    executors = plugins.get_executors()
    for ex in sorted(executors, key=lambda ex: ex != "slurm"):  # Slurm's names first: a bare name is taken for it
        for arg in sorted(executors[ex]._valid_parameters()):
            names.setdefault(f"{ex}_{arg}", f"{ex}_{arg}")
            names.setdefault(arg, f"{ex}_{arg}")
    hints = [f"{names[close[0]]!r} for {key!r}" for key in slurm if key not in names
             for close in [difflib.get_close_matches(key, names, n=1)] if close]
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


class _TrainJob:
    """One run as a submitit job: `python -m chemscale.train RUN_DIR` as a local run (train.log, dies with the job).

    submitit calls `checkpoint` when Slurm times the job out or preempts it, and requeues what it returns:
    the same job, which resumes from the run's last checkpoint (submitit.helpers.Checkpointable's
    behaviour; submitit only looks for the method, so this module needs no submitit to import).

    `sweep_pid` is set for submitit's local executor, whose jobs are processes of the sweep's machine: such a job
    stops its run when that sweep is gone (killed with -9, say), as a local run does (`train.die_with_parent`), so
    that nothing trains on unwatched. A Slurm job outlives its sweep, which a restarted sweep waits on again.
    """

    def __init__(self, run_dir: Path, sweep_pid: int | None = None):
        self.run_dir = Path(run_dir)
        self.sweep_pid = sweep_pid

    def __call__(self) -> None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        children = _Children()
        sweep_pid = getattr(self, "sweep_pid", None)  # a job pickled before the attribute has none
        if sweep_pid is not None and sys.platform.startswith("linux"):
            threading.Thread(target=_stop_when_gone, args=(sweep_pid, children), daemon=True).start()
        try:
            code = _run_local(self.run_dir, threads, children)
        except BaseException as e:  # cancelled (submitit's local executor interrupts the job): the run stops too
            children.stop(f"its submitit job was stopped ({_why(e)})")
            raise
        if children.stopping:
            raise RuntimeError(f"python -m chemscale.train {self.run_dir} was stopped: {children.reason}")
        if code:
            raise RuntimeError(f"python -m chemscale.train {self.run_dir} exited with code {code}; see its train.log")

    def checkpoint(self):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def _ancestors(pid: int) -> set[int]:
    """The pids above `pid` up to init, from /proc (Linux): a process re-parented when its parent died no longer has
    that parent among them, whatever pid the kernel gives out later."""
    seen: set[int] = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return seen - {os.getpid()}


def _stop_when_gone(sweep_pid: int, children: _Children, every_s: float = 1.0) -> None:
    """In a submitit-local job: stop its run once the sweep that submitted it is no longer above this process (the
    sweep was killed, or the job's controller was, when a cancel had to force it)."""
    while sweep_pid in _ancestors(os.getpid()):
        time.sleep(every_s)
    children.stop(f"the sweep that submitted this submitit job (pid {sweep_pid}) is gone")


def _write_job_record(run_dir: Path, job, executor: str, folder: Path, resubmits: int, cancelled: bool = False) -> None:
    """RUN_DIR/submitit.json, atomically: the run's last submitted job, for a sweep restarted after this one died."""
    atomic_write_json(run_dir / JOB_RECORD, {"job_id": str(job.job_id), "executor": executor, "folder": str(folder),
                                             "tasks": job.num_tasks, "resubmits": resubmits, "cancelled": cancelled,
                                             "written": time.strftime("%Y-%m-%d %H:%M:%S")})


def _read_job_record(run_dir: Path) -> dict | None:
    """The run's submitit.json, or None when there is none; a damaged one is named in train.log and not used."""
    path = Path(run_dir) / JOB_RECORD
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        record["job_id"], record["folder"], record["tasks"] = str(record["job_id"]), str(record["folder"]), \
            int(record.get("tasks", 1))
        return record
    except (OSError, ValueError, TypeError, KeyError) as e:
        _log(run_dir, f"chemscale.sweep: {path} cannot be read ({type(e).__name__}: {e}); its job is not waited on")
        return None


def _log(run_dir: Path, line: str) -> None:
    with open(Path(run_dir) / "train.log", "a") as log:
        log.write(f"{line}\n")


def _reattach(run_dir: Path, executor: str):
    """The Slurm job an earlier sweep submitted for this run and recorded, if Slurm still has it pending or running
    (`LIVE_STATES`, asked of sacct now): (job, resubmits so far). None for no record, a job cancelled by its sweep,
    one that ended or that sacct cannot tell of, and a job of submitit's local executor: that one was a process of
    the earlier sweep and stopped with it (`_TrainJob`)."""
    record = _read_job_record(run_dir)
    if record is None or record.get("cancelled") or executor != "slurm" or record.get("executor") != "slurm":
        return None
    import submitit

    job = submitit.SlurmJob(record["folder"], record["job_id"], tasks=tuple(range(max(1, record["tasks"]))))
    state = job.watcher.get_state(job.job_id, mode="force")
    if (state.split() or ["UNKNOWN"])[0].upper() not in LIVE_STATES:
        return None
    _log(run_dir, f"chemscale.sweep: submitit job {job.job_id}, submitted by an earlier sweep, is {state}: "
                  f"this sweep waits for it instead of submitting the run again")
    return job, int(record.get("resubmits", 0))


def _submit(ex, run_dir: Path, executor: str, slurm: dict, root: Path | None, resubmits: int, jobs: dict | None = None):
    """Submit one run's job through submitit's executor `ex`, add it to `jobs` (the ones an interrupt cancels) at
    once, then record it in the run folder; returns the job."""
    ex.update_parameters(**_job_parameters(runs.read_config(run_dir), executor, slurm, root))
    job = ex.submit(_TrainJob(run_dir, os.getpid() if executor == "submitit-local" else None))
    if jobs is not None:
        jobs[run_dir] = (job, resubmits)
    _write_job_record(run_dir, job, executor, ex.folder, resubmits)
    return job


def _run_submitit(todo: list[Path], executor: str, slurm: dict, max_resubmits: int, root: Path | None) -> None:
    """Submit one job per run folder with submitit and wait; a failed job is submitted again, `max_resubmits` times.

    The wait loop is no scheduler: Slurm (or submitit's local executor) runs the jobs; the loop only
    submits a failed run's same job again, through submitit, and it resumes from its last checkpoint. A
    run that another process trains (its lock held) is left to it, as a local sweep does. Each job is
    recorded in its run folder (`JOB_RECORD`): a sweep restarted after this one was killed waits on a Slurm job
    still pending or running instead of submitting it twice (`_reattach`). An interrupt (Ctrl-C, SIGTERM) cancels
    every job not yet seen to end, says so in each run's train.log, and is re-raised (`_cancel`).
    """
    from chemscale.train import held_elsewhere

    if not todo:
        return
    ex = _executor(executor, Path(root or paths.RUNS) / "_submitit", max_resubmits)

    jobs: dict = {}  # run folder: (job, resubmits so far), for the jobs not yet seen to end
    try:
        for d in todo:
            attached = _reattach(d, executor)
            if attached is not None:
                jobs[d] = attached
            elif held_elsewhere(d):  # another sweep's job or a local run trains it
                _log(d, ELSEWHERE_MARK)
            else:
                _submit(ex, d, executor, slurm, root, 0, jobs)
        while jobs:
            time.sleep(POLL_S)
            for d, (job, resubmits) in list(jobs.items()):
                if not job.done():
                    continue
                del jobs[d]
                try:
                    job.results()  # one result per task: a DDP job has a task per device
                    continue
                except Exception as e:  # one failed job must not stop the sweep; its folder says what happened
                    error = _job_error(job, e)
                deadline = time.monotonic() + GRACE_S  # a killed job's training process exits a moment after it
                while held_elsewhere(d) and time.monotonic() < deadline:
                    time.sleep(0.1)
                again = resubmits < max_resubmits and not runs.is_finished(d) and not held_elsewhere(d)
                _log(d, f"submitit job {job.job_id} failed: {error}\n"
                     + (f"submitted again ({resubmits + 1} of {max_resubmits}); it resumes from its last checkpoint"
                        if again else f"Traceback: not submitted again ({resubmits} resubmits)"))
                if again:
                    _submit(ex, d, executor, slurm, root, resubmits + 1, jobs)
    except BaseException as e:  # KeyboardInterrupt, Stopped (SIGTERM): no job may train on unwatched
        _cancel(jobs, executor, ex.folder, e)
        raise


def _cancel(jobs: dict, executor: str, folder: Path, error: BaseException) -> None:
    """Cancel each job (submitit's `cancel`: scancel on Slurm), record it as cancelled, and say so in its run's
    train.log; for submitit's local executor, wait (GRACE_S at most) for the jobs and their training to end."""
    from chemscale.train import held_elsewhere

    why = _why(error)
    for d, (job, resubmits) in jobs.items():
        try:
            job.cancel(check=True)
            what = f"cancelled at {time.strftime('%Y-%m-%d %H:%M:%S')}"
        except (subprocess.CalledProcessError, OSError) as e:
            what = f"could not be cancelled ({e}): cancel it yourself (scancel {job.job_id}) before the next sweep"
        with contextlib.suppress(OSError):
            _write_job_record(d, job, executor, folder, resubmits, cancelled=True)
        _log(d, f"submitit job {job.job_id} {what}: the sweep was stopped ({why}); run the sweep again to resume "
                f"this run from {_checkpoint_note(d)}")
    if executor != "submitit-local":
        return  # Slurm ends the jobs on its own nodes; the next sweep does not wait on a cancelled one
    deadline = time.monotonic() + GRACE_S
    while any(not job.done() for job, _ in jobs.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for job, _ in jobs.values():  # a job that ignored the cancel (SIGINT ignored, as in a background shell's)
        process = getattr(job, "_process", None)
        if process is not None and process.poll() is None:
            process.kill()  # its training stops by itself: the sweep is no longer above it (_stop_when_gone)
            process.wait()
    deadline = time.monotonic() + GRACE_S
    while any(held_elsewhere(d) for d in jobs) and time.monotonic() < deadline:
        time.sleep(0.1)


def _job_error(job, error: Exception) -> str:
    """Why a submitit job failed, in one line for train.log: the last line of what the job raised, or for a job that
    left no result (killed, out of memory, node lost, cancelled) the state submitit gives it and its log; the last
    line of that message is a line of the job's own log ('Loading pickle'), which says nothing of why it went."""
    text = str(error).strip()
    state = re.search(r"has not produced any output \(state: ([^)]*)\)", text)
    if state:
        return f"it ended without a result (state: {state[1]}); its log: {job.paths.stderr}"
    return text.splitlines()[-1] if text else type(error).__name__


def _flatten(config: dict) -> dict:
    """Config columns: section keys unprefixed where unique ('width'), else 'section.key'."""
    flat = {k: v for k, v in config.items() if k not in (*SECTIONS, "meta")}
    seen: dict[str, int] = {}
    for s in SECTIONS:
        for k in config.get(s, {}):
            seen[k] = seen.get(k, 0) + 1
    for s in SECTIONS:
        for k, v in config.get(s, {}).items():
            flat[k if seen[k] == 1 and k not in flat else f"{s}.{k}"] = v
    return flat


def _status(run_dir: Path, result: dict | None) -> str:
    """finished or diverged (result.json), running (another process holds train.lock), crashed or pending."""
    from chemscale.train import held_elsewhere

    if result is not None:
        return result.get("status", "finished")
    if held_elsewhere(run_dir):
        return "running"
    log = run_dir / "train.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return "crashed" if "Traceback" in text or EXIT_MARK in text else "pending"


def _convergence(result: dict | None) -> str | None:
    """converged, capped or diverged (None for an unfinished run): result.json's own, or for a result written
    before it had one, derived from its stop_reason, so finished runs need no retraining to be told apart."""
    from chemscale.train import CONVERGENCE

    if result is None:
        return None
    if "convergence" in result:
        return result["convergence"]
    if result.get("status") == "diverged":
        return "diverged"
    return CONVERGENCE.get(result.get("stop_reason"))


def collect_dirs(dirs: list[Path]) -> pd.DataFrame:
    """One row per run folder: config columns, result columns, run_id, run_dir, status, convergence."""
    rows = []
    for d in dirs:
        config = runs.read_config(d)
        result = runs.read_result(d)
        row = {"run_id": d.name, "run_dir": str(d), **_flatten(config), "status": _status(d, result)}
        if result:
            row.update({k: v for k, v in result.items() if k not in ("meta", "train", "status")})
        row["convergence"] = _convergence(result)
        rows.append(row)
    return pd.DataFrame(rows)


def collect(study: str, root: Path | None = None) -> pd.DataFrame:
    """Every run of a study (finished or not) as a DataFrame."""
    folder = Path(root or paths.RUNS) / study
    dirs = sorted(p for p in folder.glob("*/") if (p / runs.CONFIG).exists()) if folder.exists() else []
    return collect_dirs(dirs)


def converged(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of `df` whose run converged (early stopping ended it): the rows a fit may use, since a capped
    run's loss is its step budget's, not the model's."""
    return df[df["convergence"] == "converged"]


def curves(df: pd.DataFrame) -> pd.DataFrame:
    """metrics.csv rows of the runs in `df` (one per step/validation), joined with their config columns.

    Columns are read under today's names: a finished run from before a rename keeps its id and its
    file, and its rows would otherwise fill a column of their own beside the new runs'.
    """
    frames = []
    for row in df.itertuples(index=False):
        path = Path(row.run_dir) / runs.METRICS
        if path.exists():
            m = pd.read_csv(path).rename(columns=runs.METRICS_RENAMED)
            m["run_id"] = row.run_id
            frames.append(m)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True).merge(df, on="run_id", how="left")

