"""Forked chain workers: results in order, errors relayed, no worker outlives the call, and
the engine's numbers the same with workers as without."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
import torch
from conftest import causal_lm_loss, estimate
from test_divergence import _run_poisoned

from susc_callback import ChainDivergedError
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


@pytest.mark.parametrize("observable", ["fixed", "per-block"])
def test_chains_in_forked_workers_give_the_one_process_numbers(gpt2, probe, sampling_ids,
                                                               config, observable):
    """Chain indices split over two forked processes (3 chains: 2 + 1), draws merged."""
    config = config.replace(num_chains=3, observable=observable)
    one = estimate(gpt2, probe, sampling_ids, config.replace(workers=1), components="heads")
    two = estimate(gpt2, probe, sampling_ids, config.replace(workers=2), components="heads")
    # the same chains; only float32 rounding may differ (threads per process differ)
    np.testing.assert_allclose(two.chi, one.chi, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(two.loss_traces, one.loss_traces, rtol=1e-5)
    np.testing.assert_allclose(two.full_loss_trace, one.full_loss_trace, rtol=1e-5)
    np.testing.assert_allclose(two.probe_traces, one.probe_traces, rtol=1e-5)
    assert two.llc_full == pytest.approx(one.llc_full, rel=1e-5)


def test_a_divergence_in_a_worker_is_raised_or_marked_as_in_one_process():
    with pytest.raises(ChainDivergedError, match="chain 0 of component 'b' diverged at step 3"):
        _run_poisoned({"b": 3}, num_chains=2, workers=2)
    with pytest.warns(RuntimeWarning, match="component 'b' diverged at step 3"):
        result = _run_poisoned({"b": 3}, num_chains=2, workers=2, on_divergence="mark")
    assert list(result.failed) == ["b"] and np.isfinite(result.chi[0]).all()


def test_workers_only_where_forking_is_safe(gpt2, probe, sampling_ids, config):
    """With another thread running, explicit workers are refused and "auto" stays in this
    process (a loss_fn's side effects are then seen by the caller)."""
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        return causal_lm_loss(m, batch)

    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with pytest.raises(ValueError, match="workers=2 needs a CPU device on Linux"):
            estimate(gpt2, probe, sampling_ids, config.replace(workers=2), loss_fn=loss_fn)
        torch.set_num_threads(2)  # "auto" would use 2 workers
        estimate(gpt2, probe, sampling_ids, config, loss_fn=loss_fn)
    finally:
        torch.set_num_threads(1)
        stop.set()
        other.join()
    assert len(calls) > 0
