"""Stopping and restarting sweeps (issue 12): Ctrl-C or SIGTERM cancels a submitit sweep's jobs, each stopped run says
so in its train.log, a sweep killed with -9 leaves no submitit-local job training, a restarted sweep waits on the
Slurm job a killed one left instead of submitting it again, and impossible submitit parameters are refused up front.

Slurm itself is submitit's own test double (`submitit.slurm.test_slurm.mocked_slurm`: sbatch, sacct and scancel
answered in Slurm's formats, job states set by the test); the jobs of submitit's local executor are real processes.
"""

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from chemscale import paths, runs, sweep, train
from chemscale.config import ConfigError
from conftest import tiny_lm_config

submitit = pytest.importorskip("submitit")
from submitit.core import submission  # noqa: E402
from submitit.slurm.test_slurm import mocked_slurm  # noqa: E402

# runs.create records platform.platform(), which the first time runs `uname -p` through subprocess.check_output:
# submitit's Slurm double answers only sbatch, sacct, scancel and tail, so the answer is taken once, before any double.
platform.platform()

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock, PR_SET_PDEATHSIG and /proc")


def _wait(condition, what: str, every_s: float = 0.05, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what} after {limit_s} s"
        time.sleep(every_s)


def _rows_once(run_dir: Path, steps: int, every: int) -> None:
    """Each training step and each validation of the run is in its metrics.csv once, none missing."""
    m = pd.read_csv(run_dir / runs.METRICS)
    assert m.loc[m["train_loss"].notna(), "step"].tolist() == list(range(1, steps + 1))
    assert m.loc[m["val_loss"].notna(), "step"].tolist() == list(range(every, steps + 1, every))


# ------------------------------------------------------------------ parameters that no job can have, named up front

@pytest.mark.parametrize("slurm, hint", [
    ({"partiton": "gpu"}, "did you mean 'slurm_partition' for 'partiton'?"),
    ({"slurm_partiton": "gpu"}, "did you mean 'slurm_partition' for 'slurm_partiton'?"),
    ({"timeout_mn": 10}, "did you mean 'timeout_min' for 'timeout_mn'?"),
    ({"slurm_qos": "normal", "slurm_acount": "chem"}, "did you mean 'slurm_account' for 'slurm_acount'?")])
def test_a_misspelt_submitit_key_is_named_with_the_close_name(runs_root, slurm, hint):
    configs = sweep.grid("s", tiny_lm_config(), seed=[0])
    with pytest.raises(ConfigError, match="submitit refuses") as refused:
        sweep.run(configs, executor="submitit-local", slurm=slurm, root=runs_root, progress=False)
    assert hint in str(refused.value) and "the params file's key slurm" in str(refused.value)
    assert not list(runs_root.iterdir())


@pytest.mark.parametrize("slurm, message", [
    ({"timeout_min": -5}, "timeout_min must be a number > 0, got -5"),
    ({"timeout_min": 0}, "timeout_min must be a number > 0, got 0"),
    ({"slurm_time": "-5"}, "slurm_time must be a number > 0, got '-5'"),
    ({"mem_gb": -1}, "mem_gb must be a number > 0, got -1"),
    ({"mem_gb": float("nan")}, "mem_gb must be a number > 0, got nan"),
    ({"cpus_per_task": 0}, "cpus_per_task must be an integer >= 1, got 0"),
    ({"slurm_cpus_per_task": 2.5}, "slurm_cpus_per_task must be an integer >= 1, got 2.5"),
    ({"nodes": 0}, "nodes must be an integer >= 1, got 0"),
    ({"tasks_per_node": 0}, "tasks_per_node must be an integer >= 1, got 0"),
    ({"gpus_per_node": -1}, "gpus_per_node must be an integer >= 0, got -1")])
def test_amounts_no_job_can_have_are_refused_before_any_run_folder(runs_root, slurm, message):
    """On Slurm (submitit's own sbatch and sacct double): submitit passes these on unchecked, to fail in the queue."""
    with mocked_slurm():
        with pytest.raises(ConfigError, match="the params file's key slurm") as refused:
            sweep.run([tiny_lm_config()], executor="slurm", slurm=slurm, root=runs_root, progress=False)
        assert message in str(refused.value)
        assert not list(runs_root.iterdir())
        for fine in ({"gpus_per_node": 0}, {"timeout_min": 90, "mem_gb": 0.5}, {"slurm_time": "UNLIMITED"},
                     {"slurm_cpus_per_task": 8.0}):
            sweep._check_submitit([tiny_lm_config()], "slurm", fine, 3, runs_root)


# ---------------------------------------------------------------------- Slurm: cancel on a stop, re-attach on a restart

def _submit_as_a_killed_sweep(config: dict, root: Path):
    """What a sweep killed with -9 leaves: its run folder, and one Slurm job submitted for it and recorded."""
    run_dir = runs.create(config["study"], config, root)
    ex = sweep._executor("slurm", root / "_submitit", sweep.MAX_RESUBMITS)
    return run_dir, sweep._submit(ex, run_dir, "slurm", {}, root, 0)


@contextlib.contextmanager
def _interrupt_once(ready):
    """Ctrl-C (KeyboardInterrupt in the main thread) as soon as `ready()`: what a user does to a waiting sweep."""
    def tick(signum, frame):
        if ready():
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, tick)
    signal.setitimer(signal.ITIMER_REAL, 0.1, 0.1)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_stopped_slurm_sweep_cancels_its_job_and_a_restart_submits_the_run_once(runs_root):
    config = tiny_lm_config()
    run_dir = runs_root / "t" / runs.run_id(config)
    record = run_dir / sweep.JOB_RECORD
    with mocked_slurm() as mock:
        cancelled = []
        scancel = mock.scancel
        mock.scancel = lambda args: cancelled.append(list(args)) or scancel(args)
        with pytest.raises(KeyboardInterrupt), _interrupt_once(record.exists):
            sweep.run([config], executor="slurm", root=runs_root, progress=False)
        assert cancelled == [["12"]], "scancel for the job it submitted, and only that"
        assert json.loads(record.read_text())["cancelled"] is True
        log = (run_dir / "train.log").read_text()
        assert "submitit job 12 cancelled at " in log
        assert ("the sweep was stopped (KeyboardInterrupt); run the sweep again to resume this run from the start "
                "(no checkpoint yet)") in log

        # Restarted while sacct still says RUNNING (scancel is not instant): the cancelled job is not waited on, and
        # the run is submitted once.
        submitted_again = lambda: json.loads(record.read_text())["job_id"] == "13"  # noqa: E731
        with pytest.raises(KeyboardInterrupt), _interrupt_once(submitted_again):
            sweep.run([config], executor="slurm", root=runs_root, progress=False)
        assert mock.job_count == 14, "one sbatch per sweep"
        assert cancelled == [["12"], ["13"]]


@pytest.mark.parametrize("state, waits", [
    ("PENDING", True), ("RUNNING", True), ("REQUEUED", True), ("COMPLETING", True),
    ("COMPLETED", False), ("FAILED", False), ("TIMEOUT", False), ("OUT_OF_MEMORY", False), ("CANCELLED by 1000", False),
    ("       ", False)])  # sacct knows no such job any more: ended
def test_a_restarted_sweep_waits_only_on_a_recorded_slurm_job_that_has_not_ended(runs_root, state, waits):
    with mocked_slurm() as mock:
        run_dir, job = _submit_as_a_killed_sweep(tiny_lm_config(), runs_root)
        mock.set_job_state(job.job_id, state)
        attached = sweep._reattach(run_dir, "slurm")
        assert (attached is not None) == waits
        if waits:
            assert attached[0].job_id == job.job_id and attached[1] == 0
            assert f"submitit job 12, submitted by an earlier sweep, is {state}" in (run_dir / "train.log").read_text()


def test_only_a_slurm_job_that_its_sweep_did_not_cancel_is_waited_on(runs_root):
    with mocked_slurm():
        run_dir, job = _submit_as_a_killed_sweep(tiny_lm_config(), runs_root)  # RUNNING, as far as sacct says
        record = run_dir / sweep.JOB_RECORD
        assert sweep._reattach(run_dir, "slurm") is not None
        assert sweep._reattach(run_dir, "submitit-local") is None, "a local sweep cannot wait on a Slurm job"
        written = json.loads(record.read_text())
        record.write_text(json.dumps({**written, "executor": "submitit-local"}))
        assert sweep._reattach(run_dir, "slurm") is None, "a local job was a process of its sweep, gone with it"
        record.write_text(json.dumps({**written, "cancelled": True}))
        assert sweep._reattach(run_dir, "slurm") is None
        record.write_text("{not json")
        assert sweep._reattach(run_dir, "slurm") is None
        assert f"{record} cannot be read" in (run_dir / "train.log").read_text()


@pytest.fixture
def _restore_submitit_signals():
    """submitit's process_job sets the handlers of a job's process (SIGTERM, SIGCONT, SIGUSR2); these tests run a job
    in pytest's own process, as submitit's own tests do."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGCONT, signal.SIGUSR2)}
    saved_folder = os.environ.get("SUBMITIT_FOLDER")
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
    if saved_folder is None:
        os.environ.pop("SUBMITIT_FOLDER", None)
    else:
        os.environ["SUBMITIT_FOLDER"] = saved_folder


def test_a_sweep_restarted_after_a_kill_waits_on_the_running_slurm_job_instead_of_submitting_it_again(
        runs_root, _restore_submitit_signals):
    config = tiny_lm_config(max_steps=10, val_every_steps=5)
    with mocked_slurm() as mock:
        run_dir, job = _submit_as_a_killed_sweep(config, runs_root)  # job 12, RUNNING; its sweep was killed
        out = {}
        restarted = threading.Thread(target=lambda: out.update(df=sweep.run(
            [config], executor="slurm", root=runs_root, progress=False)), daemon=True)
        restarted.start()
        log = run_dir / "train.log"
        _wait(lambda: (log.exists() and "this sweep waits for it" in log.read_text()) or not restarted.is_alive(),
              "the restarted sweep to take up job 12")
        assert restarted.is_alive() and mock.job_count == 13, "no second job for the run"
        with mock.job_context(job.job_id):  # Slurm starts the job: it trains the run
            submission.process_job(job.paths.folder)
        mock.set_job_state(job.job_id, "COMPLETED")
        restarted.join(timeout=120)
        assert not restarted.is_alive()
        assert out["df"]["status"].tolist() == ["finished"]
        assert mock.job_count == 13
    _rows_once(run_dir, 10, 5)


# ---------------------------------------------------------------------- real processes: local runs and local jobs

SWEEP_SCRIPT = """
import json
import signal
import sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's Python has it (not a background job's)
from chemscale import sweep
sweep.run([json.loads(sys.argv[1])], executor=sys.argv[2], progress=False, root=sys.argv[3])
"""


def _start(config: dict, executor: str, root: Path, trainer_before: int | None = None):
    """A sweep in its own process (and session), once its run trains past a checkpoint: (sweep, trainer pid)."""
    run_dir = root / config["study"] / runs.run_id(config)
    lock = run_dir / train.LOCK
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(paths.ROOT), str(Path(__file__).parent)])}
    process = subprocess.Popen([sys.executable, "-c", SWEEP_SCRIPT, json.dumps(config), executor, str(root)], env=env,
                               cwd=paths.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)

    def trainer() -> int | None:
        holder = lock.read_text().split() if lock.exists() else []
        return int(holder[1]) if len(holder) > 1 and int(holder[1]) != trainer_before else None

    _wait(lambda: process.poll() is not None or (trainer() is not None and (run_dir / runs.CHECKPOINT).exists()),
          "the run to train", limit_s=600)
    assert process.poll() is None, process.communicate()
    return process, trainer()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _sigterm_pending(pid: int) -> bool:
    """Whether a SIGTERM waits for the (stopped) process `pid`: /proc's mask of signals sent to the process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line for line in status.splitlines() if line.startswith("ShdPnd:")).split()[1], 16)
    return bool(mask & (1 << (signal.SIGTERM - 1)))


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # each is a session (and group) of its own
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@linux_only
def test_a_stopped_local_sweep_says_in_each_runs_log_when_and_from_which_step_it_resumes(runs_root):
    """SIGTERM (what chemscale.study sends a notebook's kernel) stops the sweep's run as Ctrl-C does, the run's log says
    so, and then the sweep ends by SIGTERM."""
    config = tiny_lm_config(max_steps=100_000, val_every_steps=5)
    run_dir = runs_root / "t" / runs.run_id(config)
    started = []
    try:
        process, trainer = _start(config, "local", runs_root)
        started += [process.pid, trainer]
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
        assert process.returncode == -signal.SIGTERM
        assert not _alive(trainer) and not train.held_elsewhere(run_dir)
    finally:
        _kill_all(started)
    step = train._checkpoint_step(run_dir / runs.CHECKPOINT, run_dir)
    last = (run_dir / "train.log").read_text().strip().splitlines()[-1]
    assert last.startswith(f"{sweep.STOP_MARK} at {time.strftime('%Y-%m-%d')}"), last
    assert last.endswith(f"(SIGTERM); run the sweep again to resume this run from its last checkpoint (step {step})")
    assert sweep.collect("t", runs_root)["status"].tolist() == ["pending"], "a stop is not a crash"


@linux_only
def test_a_stopped_or_killed_submitit_local_sweep_leaves_no_job_training_and_a_restart_finishes_the_run_once(runs_root):
    config = tiny_lm_config(max_steps=30, val_every_steps=5)
    run_dir = runs_root / "t" / runs.run_id(config)
    record = run_dir / sweep.JOB_RECORD
    started = []
    try:
        # SIGTERM to the sweep: its job is cancelled, its training stops, and the log says so.
        process, trainer = _start(config, "submitit-local", runs_root)
        started += [process.pid, trainer]
        job_id = json.loads(record.read_text())["job_id"]
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
        assert process.returncode == -signal.SIGTERM
        assert not train.held_elsewhere(run_dir), "the cancelled job's run still trains"
        assert not _alive(int(job_id)) and not _alive(trainer)
        assert not runs.is_finished(run_dir), "the run finished before the sweep was stopped; give it more steps"
        log = (run_dir / "train.log").read_text()
        assert f"submitit job {job_id} cancelled at " in log
        assert "the sweep was stopped (SIGTERM); run the sweep again to resume this run from its last checkpoint " \
               "(step" in log
        assert json.loads(record.read_text())["cancelled"] is True

        # kill -9 of the sweep: no handler runs, and its job (a process of this machine) stops its run by itself.
        process, trainer = _start(config, "submitit-local", runs_root, trainer_before=trainer)
        started += [process.pid, trainer]
        os.killpg(trainer, signal.SIGSTOP)  # held where it is, so that it cannot finish while the test looks on
        process.kill()
        process.wait()  # not communicate(): the job's processes hold the sweep's stdout until they end
        _wait(lambda: _sigterm_pending(trainer), "the orphaned job to stop its run (SIGTERM)", limit_s=60)
        os.killpg(trainer, signal.SIGCONT)
        _wait(lambda: not _alive(trainer) and not train.held_elsewhere(run_dir), "the run to stop", limit_s=60)
        assert not runs.is_finished(run_dir)
        _wait(lambda: "is gone); run the sweep again to resume this run from its last checkpoint" in (
            run_dir / "train.log").read_text(), "the job to say in train.log that it stopped the run", limit_s=30)
        process.communicate()  # the job has ended: the pipes close
    finally:
        _kill_all(started)

    df = sweep.run([config], executor="submitit-local", progress=False, root=runs_root)
    assert df["status"].tolist() == ["finished"]
    assert runs.read_result(run_dir)["resumed_from_step"] > 0
    _rows_once(run_dir, 30, 5)
