"""N worker processes that run tasks from a queue and report back on another.

Not multiprocessing.Pool: a Pool whose worker is killed (out of memory, SIGKILL) replaces it and
waits forever for the lost task. Here the parent watches its workers, so a dead worker is an error
naming the task it was running, and finished tasks stay finished for the rerun.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import signal
import threading
import time
import traceback

from shardgen.tasks import TaskSettings, Worker
from shards.errors import UserError


class WorkerError(UserError):
    """A worker process died or raised something that cannot be sent back as it is."""


def _context():
    # spawn, not fork (threads in the parent, e.g. boto3's) and not forkserver: a forkserver keeps the
    # environment and working directory it started with, so a later build in the same process would
    # run its workers without, say, the S3 credentials set since.
    return mp.get_context("spawn")


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """A worker must not outlive the build's main process: a killed build whose workers go on writing
    races its own rerun (which removes their half-written files). On Linux the kernel sends SIGKILL
    when the parent dies; elsewhere a thread watches the parent."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:  # it died before the kernel was told
        os._exit(1)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1)
    os._exit(1)


def _worker_main(wid: int, s: TaskSettings, tasks, results, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    # One worker = one core: no Rayon thread pool inside encode_batch (N workers use N cores).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    worker = Worker(s, results)
    while (task := tasks.get()) is not None:
        results.put(("start", wid, task.index))
        try:
            record = worker.run(task)
        except Exception as e:  # noqa: BLE001 - every failure goes back to the parent
            tb = "".join(traceback.format_exception(e))
            try:
                pickle.loads(pickle.dumps(e))  # some exceptions pickle but do not unpickle
            except Exception:  # noqa: BLE001
                e = WorkerError(f"task {task.index}: {tb}")
            results.put(("error", wid, task.index, e, tb))
            return
        results.put(("done", wid, task.index, record))


def _death(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        return f"was killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"exited with status {code}"


def run_tasks(todo, s: TaskSettings, workers: int, on_progress) -> dict[int, dict]:
    """Run `todo` on `workers` processes; {task index: completion record}. The first error stops all."""
    ctx = _context()
    tasks, results = ctx.Queue(), ctx.Queue()
    for t in todo:
        tasks.put(t)
    n = max(1, min(workers, len(todo)))
    for _ in range(n):
        tasks.put(None)
    procs = [ctx.Process(target=_worker_main, args=(i, s, tasks, results, os.getpid()), daemon=True)
             for i in range(n)]
    for p in procs:
        p.start()
    done: dict[int, dict] = {}
    running: dict[int, int] = {}
    try:
        while len(done) < len(todo):
            try:
                msg = results.get(timeout=0.2)
            except queue_mod.Empty:
                for i, p in enumerate(procs):
                    if p.exitcode not in (None, 0):
                        task = running.get(i)
                        raise WorkerError(f"worker process {p.pid} {_death(p.exitcode)}"
                                          f"{f' while running task {task}' if task is not None else ''}; "
                                          f"finished tasks are kept: rerun the same command to resume")
                if all(p.exitcode == 0 for p in procs) and results.empty():
                    raise WorkerError(f"workers exited with {len(todo) - len(done)} tasks unfinished")
                continue
            kind = msg[0]
            if kind == "progress":
                on_progress(*msg[1:])
            elif kind == "start":
                running[msg[1]] = msg[2]
            elif kind == "done":
                running.pop(msg[1], None)
                done[msg[2]] = msg[3]
            else:  # the pickled exception lost its traceback and task: they go with it as the cause
                _, wid, task, error, tb = msg
                raise error from WorkerError(f"task {task} failed in worker process {procs[wid].pid}:\n{tb}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()
        tasks.cancel_join_thread()
        results.cancel_join_thread()
    return done
