"""Chains in parallel CPU processes.

On a CPU, small models gain little from torch's intra-op threads (their matrices are too
small to split well): measured on 2 cores, one process with 2 threads ran tiny's 2 chains
in 2.23 s, two forked single-threaded processes with a chain each in 1.68 s. Chains are
independent, so the engine can hand different chain indices to forked copies of itself.
Forking copies the process as it is, which is only safe when no other thread could hold a
lock the worker needs; :func:`fork_is_safe` checks what can be checked.
"""

from __future__ import annotations

import multiprocessing
import pickle
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

import torch

Progress = Callable[[int], None]
PROGRESS_INTERVAL = 0.1  # seconds between progress updates while workers run


def fork_is_safe(device: torch.device) -> bool:
    """Whether chains may run in forked processes: a CPU device on Linux, no other
    non-daemon Python thread, not a daemon process (which may not have children), not a
    member of a ``torch.distributed`` group.

    Daemon threads are background helpers (tqdm's monitor, TensorBoard's event writer) whose
    locks a worker never takes, as PyTorch's DataLoader assumes when it forks its workers
    beside them; a thread of the caller's own could hold a lock a worker needs."""
    others = [thread for thread in threading.enumerate()
              if thread is not threading.current_thread() and not thread.daemon]
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return (device.type == "cpu" and sys.platform.startswith("linux") and not others
            and not multiprocessing.current_process().daemon and not distributed)


def run_forked(task: Callable[[list[int], Progress], Any], shares: list[list[int]],
               progress: Progress) -> list[Any]:
    """``task(share, progress)`` for every share, each in a forked process with an equal
    part of torch's threads; returns their results in order. Warnings raised in a worker
    are raised again here; an exception in a worker is raised here (after every worker has
    ended)."""
    context = multiprocessing.get_context("fork")
    threads = max(1, torch.get_num_threads() // len(shares))
    done = context.RawArray("q", len(shares))  # steps done, one slot per worker: no lock
    workers = []                                # that a killed worker could leave taken
    for index, share in enumerate(shares):
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_work, args=(task, share, threads, done, index,
                                                      sender), daemon=True)
        process.start()
        sender.close()
        workers.append((process, receiver))
    outcomes: list[tuple[str, Any, list]] = [None] * len(workers)  # type: ignore[list-item]
    pending = {receiver: index for index, (_, receiver) in enumerate(workers)}
    reported = 0
    try:
        while pending:  # wakes as soon as a worker sends, or to update the progress bar
            for receiver in wait(list(pending), timeout=PROGRESS_INTERVAL):
                index = pending.pop(receiver)
                outcomes[index] = _receive(receiver, workers[index][0])
            reported = _report(done, reported, progress)
    finally:  # interrupted (e.g. KeyboardInterrupt): stop the workers still running
        for index in pending.values():
            workers[index][0].terminate()
        for process, receiver in workers:
            process.join()
            receiver.close()
    _report(done, reported, progress)
    for _, _, caught in outcomes:
        for warning in caught:
            warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                   warning.lineno)
    for status, value, _ in outcomes:
        if status == "error":
            raise value
    return [value for _, value, _ in outcomes]


def _work(task: Callable, share: list[int], threads: int, done: Any, index: int,
          sender: Any) -> None:
    torch.set_num_threads(threads)

    def progress(count: int) -> None:
        done[index] += count

    with warnings.catch_warnings(record=True) as caught:
        try:
            outcome: tuple[str, Any] = ("ok", task(share, progress))
        except BaseException as error:  # relayed to the parent, which raises it
            outcome = ("error", error)
    try:
        payload = pickle.dumps((*outcome, caught))
    except Exception:  # an exception or warning that cannot be pickled: its text
        payload = pickle.dumps(("error", RuntimeError(
            f"a chain worker failed:\n{traceback.format_exc()}"), []))
    sender.send_bytes(payload)
    sender.close()


def _receive(receiver: Any, process: Any) -> tuple[str, Any, list]:
    try:
        return pickle.loads(receiver.recv_bytes())
    except EOFError:  # the worker died without a word (killed, out of memory)
        process.join()
        return ("error", RuntimeError(f"a chain worker ended with exit code "
                                      f"{process.exitcode} before sending its result"), [])
    except Exception as error:  # e.g. an exception type that cannot be rebuilt here
        return ("error", RuntimeError(f"a chain worker's result could not be read: "
                                      f"{type(error).__name__}: {error}"), [])


def _report(done: Any, reported: int, progress: Progress) -> int:
    value = sum(done)
    if value > reported:
        progress(value - reported)
    return value
