"""Per-dataset mixture weights applied by sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_patterned_training import patterning_run, pool_ids, train

from susc_callback.patterning.mixture import MixtureSampler
from susc_callback.patterning.training import PatternedTrainer, WeightedPool

LABELS = ["a"] * 60 + ["b"] * 30 + ["c"] * 10


def test_draws_follow_the_weighted_shares():
    sampler = MixtureSampler(LABELS, {"a": 1.0, "b": 2.0, "c": 0.0}, num_samples=20000,
                             seed=3)
    expected = {"a": 60 / 120, "b": 60 / 120, "c": 0.0}  # shares 0.6, 0.3, 0.1 times weights
    assert sampler.probabilities() == pytest.approx(expected) and sampler.labels == LABELS
    drawn = np.array([LABELS[i] for i in sampler])
    for name, p in expected.items():
        share = float((drawn == name).mean())
        assert abs(share - p) < 4.5 * np.sqrt(p * (1 - p) / 20000) + 1e-12, name
    uniform = MixtureSampler(LABELS, num_samples=20000, seed=3).probabilities()
    assert uniform == pytest.approx({"a": 0.6, "b": 0.3, "c": 0.1})


def test_new_weights_apply_from_the_next_chunk():
    sampler = MixtureSampler(LABELS, num_samples=1000, chunk=100, seed=0)
    drawn = []
    for k, index in enumerate(sampler):
        drawn.append(LABELS[index])
        if k == 99:
            sampler.set_weights({"a": 0.0, "c": 0.0})
    assert set(drawn[100:]) == {"b"} and len(set(drawn[:100])) == 3


@pytest.mark.parametrize("weights, message", [
    ({"z": 1.0}, r"unknown datasets \['z'\]"),
    ({"a": -1.0}, "finite, >= 0 and not all 0"),
    ({"a": 0.0, "b": 0.0, "c": 0.0}, "finite, >= 0 and not all 0"),
])
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(ValueError, match=message):
        MixtureSampler(LABELS, weights)


def test_the_trainer_draws_its_batches_with_the_sampler(tmp_path, monkeypatch):
    ids = pool_ids()
    labels = ["a", "b"] * 8
    sampler = MixtureSampler(labels, {"b": 0.0}, seed=0)
    seen = []
    original = WeightedPool.__getitem__
    monkeypatch.setattr(WeightedPool, "__getitem__",
                        lambda self, i: (seen.append(i), original(self, i))[1])

    class Sampled(PatternedTrainer):
        def __init__(self, **kwargs):
            super().__init__(mixture_sampler=sampler, **kwargs)

    train(Sampled, WeightedPool({"input_ids": ids}), tmp_path, "mixture")
    assert seen and all(labels[i] == "a" for i in seen)


def test_online_patterning_by_sampling(tmp_path, probe):
    labels = ["a", "b"] * 8
    sampler = MixtureSampler(labels, seed=0)
    _, pool, callback = patterning_run(tmp_path, "sampling", {"l1h0": -0.01}, probe=probe,
                                       mixture_sampler=sampler,
                                       plan_options={"granularity": "dataset"})
    plan = callback.history_[-1].plan
    assert sampler.weights.tolist() == pytest.approx(plan.weights.tolist())
    assert torch.equal(pool.weights, torch.ones_like(pool.weights))  # loss weights stay 1
