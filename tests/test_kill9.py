"""kill -9 of a whole sweep mid-run (issue 12, item 3), and the bad run folders a restart meets.

A node lost, the OOM killer taking a cgroup, `kill -9 -- -PGID` from a batch system: the sweep and
its training child die together, with no handler run. The restarted sweep must leave the finished
run alone, resume the interrupted one from its checkpoint with each metric row once, and end with
the table of a sweep that was never interrupted. A run folder whose config.json was edited since is
refused before any run starts, naming the file and the key, with no finished result rewritten; the
half-written checkpoint a kill can leave is not resumed from (a last.ckpt cut short is refused by name:
tests/test_train.py).
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from chemscale import paths, runs, sweep, train
from chemscale.config import ConfigError
from conftest import tiny_lm_config

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock, process groups and /proc")

SWEEP_SCRIPT = """
import json
import sys
from chemscale import sweep
sweep.run(json.loads(sys.argv[1]), parallel=2, threads=1, progress=False, root=sys.argv[2])
"""

# Result columns that measure this machine's speed, or say how the run got there, not what it learned.
TIMING = ("run_dir", "wall_s", "train_seconds", "train_tokens_per_s", "resumed_from_step")


def _configs() -> list[dict]:
    """Two runs trained side by side (one thread each, as on a 2-core machine): a short one that finishes, and one
    long enough to be killed after its first checkpoints (validations every 10 steps, each one a checkpoint)."""
    return sweep.grid("k", tiny_lm_config(val_every_steps=10), max_steps=[20, 200])


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie that nobody reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _trainer_pid(run_dir: Path) -> int | None:
    """The pid of the process that trains `run_dir` now (train.lock held and naming it), else None.

    Asked only once the run has a checkpoint: a shared flock taken by `held_elsewhere` at the instant its trainer
    takes the lock would make the trainer refuse the run as trained by another process."""
    holder = (run_dir / train.LOCK).read_text().split()
    return int(holder[1]) if len(holder) > 1 and train.held_elsewhere(run_dir) else None


def _kill_mid_sweep(configs: list[dict], root: Path) -> tuple[Path, Path]:
    """Start the sweep in its own process group; once the second run trains past a checkpoint (it is stopped there)
    and the first run finished, SIGKILL both process groups (the sweep's and the child's); returns (finished run,
    killed run)."""
    done, killed = (root / c["study"] / runs.run_id(c) for c in configs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(paths.ROOT), os.environ.get("PYTHONPATH")]))}
    log = root.parent / f"{root.name}.sweep.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-c", SWEEP_SCRIPT, json.dumps(configs), str(root)], env=env,
                                   cwd=paths.ROOT, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    groups = [process.pid]
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a timing: the runs take seconds
        # First the long run: stopped (SIGSTOP to its own process group) as soon as it has trained past a
        # checkpoint, so that it cannot finish however long the short run takes to finish (a CI machine once let
        # it run to its last step while this loop waited for the short one).
        while not ((killed / runs.CHECKPOINT).exists() and (child := _trainer_pid(killed)) is not None):
            assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the sweep never reached its second run's first checkpoint"
            time.sleep(0.01)
        groups.append(os.getpgid(child))  # each run is a session of its own (sweep._Children)
        assert groups[1] != groups[0], "the training child is not in the sweep's process group"
        os.killpg(groups[1], signal.SIGSTOP)
        while not runs.is_finished(done):
            assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the sweep's first run never finished"
            time.sleep(0.01)
        # Then the sweep's group, so that neither sees the other die (the child's parent-death signal, the sweep's
        # exit mark or next run), then SIGKILL both: the whole tree dies at one instant, as when its node is lost.
        os.killpg(groups[0], signal.SIGSTOP)
        assert not runs.is_finished(killed), "the second run finished before it could be killed"
    except BaseException:  # a failed assertion must not leave a sweep or a run training (or stopped)
        for group in groups:
            with contextlib.suppress(ProcessLookupError):  # a sweep that exited by itself has no group left
                os.killpg(group, signal.SIGKILL)
        process.wait()
        raise
    for group in groups:
        os.killpg(group, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30
    # The lock dies with the process: once its last thread exits, which can be a moment after its main thread shows
    # as a zombie (torch's threads hold the open files until then).
    while _alive(child) or train.held_elsewhere(killed):
        assert time.monotonic() < deadline, (f"the SIGKILLed training process {child} is still alive, or its run's "
                                             f"{train.LOCK} is still held 30 s after the kill")
        time.sleep(0.05)
    return done, killed


def _files(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a run folder: (content, mtime in ns)."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.iterdir() if p.is_file()}


def _rows(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, validation rows) of a run's metrics.csv, indexed from 0."""
    m = pd.read_csv(run_dir / runs.METRICS)
    return m[m["train_loss"].notna()].reset_index(drop=True), m[m["val_loss"].notna()].reset_index(drop=True)


def test_a_sweep_killed_with_its_children_resumes_to_the_uninterrupted_table(tmp_path):
    configs = _configs()
    root = tmp_path / "killed"
    done, killed = _kill_mid_sweep(configs, root)
    step = train._checkpoint_step(killed / runs.CHECKPOINT, killed)
    assert 10 <= step < 200 and step % 10 == 0
    assert sweep.collect("k", root).set_index("run_id")["status"].to_dict() == {
        done.name: "finished", killed.name: "pending"}, "a kill -9 is not a crash: no traceback, no exit mark"
    finished_files = _files(done)

    # A kill during a checkpoint's write leaves the temporary file cut short (last.ckpt itself is only ever
    # replaced whole): the resume must neither read it nor leave it behind.
    partial = killed / f".{runs.CHECKPOINT}.tmp"
    partial.write_bytes((killed / runs.CHECKPOINT).read_bytes()[:1000])
    df = sweep.run(configs, parallel=1, threads=1, progress=False, root=root)
    assert _files(done) == finished_files, "the finished run is not redone"
    assert df["status"].tolist() == ["finished"] * 2
    assert runs.read_result(killed)["resumed_from_step"] == step and not partial.exists()
    training, validations = _rows(killed)
    assert training["step"].tolist() == list(range(1, 201)), "each step once, none missing, in order"
    assert validations["step"].tolist() == list(range(10, 201, 10)), "each validation once"

    # The same runs, never interrupted (each trained in this process: one torch thread, as in the sweep).
    reference = tmp_path / "uninterrupted"
    for config in configs:
        train.train(runs.create(config["study"], config, reference))
    expected = sweep.collect("k", reference)
    # Exact: the checkpoint holds the weights, the optimizer, the schedule and every random generator's state,
    # the loader resumes at the checkpoint's batch, and one thread sums in one order, so the resumed run computes
    # the same float32 numbers step for step (chemscale.train); any difference is a resume bug, not noise.
    pd.testing.assert_frame_equal(df.drop(columns=list(TIMING)).sort_values("run_id", ignore_index=True),
                                  expected.drop(columns=list(TIMING)).sort_values("run_id", ignore_index=True))
    for got, want in zip(_rows(killed), _rows(reference / "k" / killed.name)):
        pd.testing.assert_frame_equal(got, want)


def test_a_sweep_refuses_a_run_folder_whose_config_was_edited_naming_file_and_key(runs_root):
    """Editing a finished run's config.json (a 'quick fix' of its learning rate) is refused before any run starts,
    naming the file and the changed key; the finished result stays as it was."""
    configs = sweep.grid("e", tiny_lm_config(study="e", max_steps=4, val_every_steps=2), width=[16, 24])
    edited, other = (runs.create("e", c, runs_root) for c in configs)
    train.train(edited)
    config = runs.read_config(edited)
    config["train"]["lr"] = 0.5
    (edited / runs.CONFIG).write_text(json.dumps(config))
    before = _files(edited)
    with pytest.raises(ConfigError) as err:
        sweep.run(configs, progress=False, root=runs_root)
    message = str(err.value)
    assert message.startswith(f"{edited / runs.CONFIG}: ") and "edited by hand" in message
    assert "train.lr is 0.5 in the file, 0.003 for this run id" in message
    assert _files(edited) == before, "the finished run's files are left as they were"
    assert not (other / runs.METRICS).exists(), "no run started"
