"""SMILES -> SELFIES in worker processes, with a per-molecule timeout (older selfies releases hang).

Workers are forked (they start in milliseconds and inherit a test's stand-in encoder), so they
would inherit every file descriptor of the parent. Two of those once hung every later load of a
corpus after a `kill -9` of the parent: the cache lock (a worker kept it held) and the parent's
ends of the worker pipes (a worker never saw EOF, so it waited forever). Each worker therefore
closes the descriptors registered in `PARENT_ONLY_FDS` as it starts, asks Linux to kill it when
its parent dies (PR_SET_PDEATHSIG), and also leaves when its parent process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import time
from collections import deque

import selfies as sf
from tqdm.auto import tqdm

from chemscale.lm.read import CorpusError

_CHUNK_MAX = 1000  # molecules a worker task: ~0.2-0.5 s of work against ~1 ms of IPC
_PARENT_POLL_S = 1.0  # how often an idle worker checks that its parent is alive
_PR_SET_PDEATHSIG = 1
PARENT_ONLY_FDS: set[int] = set()  # descriptors a forked worker closes first (locks, pipe ends)

_selfies_encoder = sf.encoder  # module-level so tests can swap in an encoder that hangs or crashes


@contextlib.contextmanager
def parent_only(fd: int):
    """Keep descriptor `fd` out of the workers started while this block runs (e.g. a lock's)."""
    PARENT_ONLY_FDS.add(fd)
    try:
        yield fd
    finally:
        PARENT_ONLY_FDS.discard(fd)


def encode_one(smiles: str) -> tuple[str | None, str | None]:
    """(SELFIES, None) or (None, drop reason). selfies itself rejects what does not parse,
    kekulize or respect valences, so RDKit (~40% more time per molecule) is not asked."""
    try:
        selfies = _selfies_encoder(smiles)
    except sf.EncoderError as e:
        message = str(e)
        if "semantic constraints" in message:
            return None, "valence"
        if "parse" in message or "kekuliz" in message:
            return None, "invalid_smiles"
        return None, "selfies_error"
    except Exception:  # noqa: BLE001 -- any failure drops this molecule, never the run
        return None, "selfies_error"
    return (selfies, None) if selfies else (None, "selfies_error")


def _detach(parent_pid: int) -> None:
    """In a new worker: drop the parent's descriptors and die with the parent."""
    for fd in list(PARENT_ONLY_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    PARENT_ONLY_FDS.clear()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(0)


def _worker_main(conn, position, parent_pid: int) -> None:
    """Worker loop: encode each (start, smiles) task, publishing `start + i` before molecule i."""
    _detach(parent_pid)
    with contextlib.suppress(EOFError, OSError, KeyboardInterrupt):
        while True:
            if not conn.poll(_PARENT_POLL_S):
                if os.getppid() != parent_pid:
                    return
                continue
            if (task := conn.recv()) is None:
                return
            start, smiles = task
            results = []
            for i, s in enumerate(smiles):
                position.value = start + i
                results.append(encode_one(s))
            conn.send(results)


class _Worker:
    """One encoding process. The parent watches `position` (shared memory, no IPC) to see
    which molecule it is on and since when: one stuck past the timeout gets the worker killed."""

    def __init__(self, ctx):
        self.position = ctx.RawValue("q", -1)
        self.conn, child = ctx.Pipe()
        self.fd = self.conn.fileno()
        PARENT_ONLY_FDS.add(self.fd)  # this worker and later ones must not hold it
        self.process = ctx.Process(target=_worker_main, args=(child, self.position, os.getpid()), daemon=True)
        try:
            self.process.start()
        except BaseException:
            PARENT_ONLY_FDS.discard(self.fd)
            self.conn.close()
            raise
        finally:
            child.close()  # so the parent sees EOF when the worker dies
        self.task: tuple[int, int] | None = None
        self.seen = (-1, 0.0)  # (position, when the parent first saw it)

    def submit(self, task: tuple[int, int], smiles: list[str]) -> None:
        self.position.value = -1
        self.task, self.seen = task, (-1, time.monotonic())
        self.conn.send((task[0], smiles[task[0]:task[1]]))

    def receive(self) -> list | None:
        """The finished task's results, or None if the worker died."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None

    def stuck(self, timeout_s: float) -> bool:
        """True if the same molecule has been encoding for more than `timeout_s`."""
        now, position = time.monotonic(), self.position.value
        if position != self.seen[0]:
            self.seen = (position, now)
            return False
        return now - self.seen[1] > timeout_s

    def stop(self, kill: bool = False) -> None:
        if self.conn.closed:
            return
        if not kill:
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.process.join(timeout=1)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        PARENT_ONLY_FDS.discard(self.fd)
        self.conn.close()


def _mp_context():
    # fork: workers start in milliseconds and inherit the (possibly monkeypatched) encoder
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _tasks(n: int, workers: int) -> deque[tuple[int, int]]:
    """(start, stop) slices: several per worker for an even finish, at most _CHUNK_MAX each."""
    size = max(16, min(_CHUNK_MAX, math.ceil(n / (8 * workers))))
    return deque((i, min(i + size, n)) for i in range(0, n, size))


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(2, cores or 1)


def encode_smiles(smiles: list[str], workers: int | None = None, timeout_s: float = 5.0,
                  progress: bool = True) -> list[tuple[str | None, str | None]]:
    """(SELFIES, None) or (None, reason) for each SMILES, in order, encoded in worker processes.

    A molecule still encoding after `timeout_s` seconds gets its worker killed and replaced and is
    dropped as 'timeout'; one whose worker dies is dropped as 'crash'. Either way the rest go on.
    """
    results: list = [None] * len(smiles)
    if not smiles:
        return results
    if workers is not None and workers < 1:
        raise CorpusError(f"workers must be >= 1 (or None for min(2, cores)), got {workers}")
    tasks, ctx, false_starts = _tasks(len(smiles), workers or default_workers()), _mp_context(), 0
    pool: list[_Worker] = []
    bar = tqdm(total=len(smiles), desc="SMILES -> SELFIES", unit=" mol", disable=not progress, leave=False)
    try:
        pool += [_Worker(ctx) for _ in range(min(workers or default_workers(), len(tasks)))]
        while tasks or any(w.task for w in pool):
            for w in pool:
                if w.task is None and tasks:
                    w.submit(tasks.popleft(), smiles)
            ready = mp.connection.wait([w.conn for w in pool if w.task], timeout=min(0.05, timeout_s / 4))
            for i, w in enumerate(pool):
                if w.task is None:
                    continue
                done = w.receive() if w.conn in ready else None
                if done is not None:
                    results[w.task[0]:w.task[1]] = done
                    bar.update(w.task[1] - w.task[0])
                    w.task = None
                elif w.conn in ready or w.stuck(timeout_s):
                    false_starts += _fail(w, "crash" if w.conn in ready else "timeout", results, tasks, bar)
                    if false_starts > 3:
                        raise CorpusError("SMILES encoder worker processes keep dying before encoding anything")
                    pool[i] = _Worker(ctx)
    finally:
        bar.close()
        for w in pool:
            w.stop(kill=w.task is not None)
    return results


def _fail(w: _Worker, reason: str, results: list, tasks: deque, bar) -> int:
    """Drop the molecule worker `w` is stuck on and requeue the rest of its task; 1 if it had not started."""
    w.stop(kill=True)
    (start, stop), position = w.task, w.position.value
    if not start <= position < stop:
        tasks.appendleft((start, stop))
        return 1
    results[position] = (None, reason)
    bar.update(1)
    # the results of molecules it had already done died with it: requeue those too
    tasks.extendleft([t for t in ((position + 1, stop), (start, position)) if t[0] < t[1]])
    return 0
