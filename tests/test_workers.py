"""Forked chain workers: results in order, errors relayed, no worker outlives the call."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time

import pytest

from susc_callback.estimator.workers import run_forked

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="chain workers fork, which only Linux supports here")


def test_results_come_back_in_share_order_with_progress():
    reported = []
    results = run_forked(lambda share, progress: (progress(len(share)), sum(share))[1],
                         [[1, 2], [3], [4, 5, 6]], reported.append)
    assert results == [3, 3, 15]
    assert sum(reported) == 6


def test_a_worker_killed_without_a_word_is_reported():
    def task(share, progress):
        if share == [1]:
            os.kill(os.getpid(), signal.SIGKILL)
        return share

    with pytest.raises(RuntimeError, match="ended with exit code -9 before sending"):
        run_forked(task, [[0], [1]], lambda count: None)


def test_an_interrupted_parent_stops_its_workers():
    def interrupt(count):
        raise KeyboardInterrupt

    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        run_forked(lambda share, progress: (progress(1), time.sleep(60)), [[0], [1]],
                   interrupt)
    assert time.perf_counter() - start < 30
    assert multiprocessing.active_children() == []
