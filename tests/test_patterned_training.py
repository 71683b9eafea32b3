"""Training with loss weights: all-ones is bitwise the plain Trainer, and weights reach the
loss of the right tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CONTEXT, VOCAB, estimate, tiny_gpt2
from transformers import Trainer, TrainingArguments, default_data_collator

from susc_callback.patterning import plan_patterning
from susc_callback.patterning.training import (
    PatternedTrainer,
    WeightedPool,
    token_weight_table,
    weighted_causal_lm_loss,
)


def pool_ids(count: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, CONTEXT), generator=torch.Generator().manual_seed(5))


class Plain(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def train(trainer_class, dataset, tmp_path, name):
    args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=4,
                             per_device_train_batch_size=4, learning_rate=1e-3, seed=0,
                             report_to="none", use_cpu=True, disable_tqdm=True,
                             save_strategy="no", logging_steps=1, dataloader_num_workers=0)
    trainer = trainer_class(model=tiny_gpt2(0), args=args, train_dataset=dataset,
                            data_collator=default_data_collator)
    trainer.train()
    return trainer


def test_all_ones_is_bitwise_the_plain_run(tmp_path):
    ids = pool_ids()
    plain = train(Trainer, Plain(ids), tmp_path, "plain")
    weighted = train(PatternedTrainer, WeightedPool({"input_ids": ids}), tmp_path, "ones")
    for (name, a), b in zip(plain.model.state_dict().items(),
                            weighted.model.state_dict().values()):
        assert torch.equal(a, b), name
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (plain, weighted)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_weights_reach_the_loss_of_the_right_tokens():
    torch.manual_seed(0)
    model = tiny_gpt2(0).eval()
    ids = pool_ids(4)
    weights = torch.rand(4, CONTEXT) + 0.5
    weights[0] = 0.0  # sequence 0 does not count
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        loss = weighted_causal_lm_loss(logits, ids, weights)
        # brute force: token by token, sequences 1..3 only
        total, norm = 0.0, 0.0
        for s in range(1, 4):
            for j in range(1, CONTEXT):
                value = F.cross_entropy(logits[s, j - 1][None], ids[s, j][None]).item()
                total, norm = total + weights[s, j].item() * value, norm + weights[s, j].item()
        assert loss.item() == pytest.approx(total / norm, rel=1e-5)
        ones = weighted_causal_lm_loss(logits, ids, torch.ones(4, CONTEXT))
        assert ones.item() == pytest.approx(model(input_ids=ids, labels=ids).loss.item(),
                                            rel=1e-6)
        masked = ids.clone()
        masked[1, :5] = -100  # ignored labels carry no weight
        expected = weighted_causal_lm_loss(logits, masked, weights)
        assert expected.item() != pytest.approx(loss.item())
    with pytest.raises(ValueError, match="all have loss weight 0"):
        weighted_causal_lm_loss(logits, ids, torch.zeros(4, CONTEXT))


def test_a_plan_becomes_a_weight_table(gpt2, probe, sampling_ids, config):
    result = estimate(gpt2, probe, sampling_ids, config)
    plan = plan_patterning(result, {"l1h0": 1.0})
    table = token_weight_table(plan, result)
    assert table.shape == probe.input_ids.shape
    for i, (s, t) in enumerate(zip(result.token_sequence, result.token_position)):
        assert table[s, t + 1].item() == pytest.approx(plan.token_weights[i])
    assert (table[:, 0] == 1).all()  # position 0 predicts nothing
    pool = WeightedPool(probe.tensors, table)
    assert torch.equal(pool[1]["loss_weights"], table[1])
    with pytest.raises(ValueError, match="one weight per token"):
        pool.set_weights(torch.ones(2, 2))
    with pytest.raises(ValueError, match="finite and >= 0"):
        pool.set_weights(-table)


def test_the_weights_survive_the_trainers_column_filter(tmp_path, monkeypatch):
    import susc_callback.patterning.training as training

    seen, original = [], training.weighted_causal_lm_loss

    def recording(logits, labels, weights, num_items_in_batch=None):
        seen.append(weights.clone())
        return original(logits, labels, weights, num_items_in_batch)

    monkeypatch.setattr(training, "weighted_causal_lm_loss", recording)
    ids = pool_ids()
    weights = torch.ones(len(ids), CONTEXT)
    weights[::2] = 0.25
    trainer = train(PatternedTrainer, WeightedPool({"input_ids": ids}, weights), tmp_path, "w")
    assert 1 <= len(seen) <= 4 and all(w.shape == (4, CONTEXT) for w in seen)
    assert {float(v) for w in seen for v in w.unique()} <= {0.25, 1.0}
    plain = train(Trainer, Plain(ids), tmp_path, "plain")
    assert not torch.equal(trainer.model.transformer.wte.weight, plain.model.transformer.wte.weight)


def patterning_run(tmp_path, name, callback_target=None, workers=0, **options):
    from susc_callback import SGLDConfig
    from susc_callback.patterning.callback import PatterningCallback

    ids = pool_ids()
    pool = WeightedPool({"input_ids": ids})
    args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=6,
                             per_device_train_batch_size=4, learning_rate=1e-3, seed=0,
                             report_to="none", use_cpu=True, disable_tqdm=True,
                             save_strategy="no", logging_steps=1,
                             dataloader_num_workers=workers)
    trainer = PatternedTrainer(model=tiny_gpt2(0), args=args, train_dataset=pool,
                               data_collator=default_data_collator)
    callback = None
    if callback_target is not None:
        config = SGLDConfig(num_chains=1, num_draws=3, batch_size=4, observable_sequences=4,
                            eval_batch_size=8, n_beta=10.0, gamma=100.0, progress=False)
        callback = PatterningCallback(pool, callback_target, components="heads",
                                      schedule=2, config=config,
                                      log_dir=str(tmp_path / name / "tb"), **options)
        callback.bind(trainer)
    trainer.train()
    return trainer, pool, callback


def test_online_patterning_replans_and_logs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, pool, callback = patterning_run(tmp_path, "steer", {"l1h0": -0.01})
    assert [h.step for h in callback.history_] == [2, 4, 6]
    assert callback.history_[0].realised is None and callback.history_[1].realised
    last = callback.history_[-1].plan
    assert not torch.equal(pool.weights, torch.ones_like(pool.weights))
    assert pool.weights[:, 1:].flatten().tolist() == pytest.approx(
        [float(w) for w in token_weight_table(last, _result_like(pool))[:, 1:].flatten()])
    events = EventAccumulator(str(tmp_path / "steer" / "tb"))
    events.Reload()
    for tag in ("patterning/target/l1h0", "patterning/predicted/l1h0",
                "patterning/realised/l1h0", "patterning/weights/max"):
        assert tag in events.Tags()["scalars"], tag
    assert [e.step for e in events.Scalars("patterning/predicted/l1h0")] == [2, 4, 6]


def _result_like(pool):
    """Token order of a causal-LM result on the pool: every (sequence, position < T-1)."""
    from types import SimpleNamespace

    rows, positions = pool.weights.shape
    sequence, position = np.divmod(np.arange(rows * (positions - 1)), positions - 1)
    return SimpleNamespace(probe_input_ids=np.zeros((rows, positions)), token_sequence=sequence,
                           token_position=position)


def test_a_zero_target_is_bitwise_the_plain_run(tmp_path):
    """The estimates leave the model, its optimizer and every RNG stream alone, and a zero
    target gives weights 1: the run equals the one without the callback, bit for bit."""
    plain, _, _ = patterning_run(tmp_path, "plain")
    steered, pool, callback = patterning_run(tmp_path, "zero", np.zeros(4))
    assert len(callback.history_) == 3 and torch.equal(pool.weights,
                                                       torch.ones_like(pool.weights))
    for (name, a), b in zip(plain.model.state_dict().items(),
                            steered.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_patterning_refuses_loader_workers(tmp_path):
    with pytest.raises(ValueError, match="dataloader_num_workers=0"):
        patterning_run(tmp_path, "workers", {"l1h0": 1.0}, workers=1)


def test_a_separate_probe_steers_a_large_pool_by_dataset(tmp_path, probe):
    from susc_callback.patterning.callback import PatterningCallback

    labels = ["a", "b"] * 8
    trainer, pool, callback = patterning_run(
        tmp_path, "datasets", {"l1h0": -0.01}, probe=probe, pool_datasets=labels,
        plan_options={"granularity": "dataset"})
    plan = callback.history_[-1].plan
    assert plan.groups == ["a", "b"] and len(callback.history_) == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "datasets" / "tb"))
    events.Reload()
    assert events.Scalars("patterning/dataset_weight/a")[-1].value == pytest.approx(
        plan.weights[0])
    for row, label in enumerate(labels):
        assert (pool.weights[row] == float(plan.weights[plan.groups.index(label)])).all()
    with pytest.raises(ValueError, match=r"Pool datasets \['c'\] have no probe sequences"):
        PatterningCallback(pool, {"l1h0": 1.0}, probe=probe, pool_datasets=["c"] * 16,
                           plan_options={"granularity": "dataset"})
    with pytest.raises(ValueError, match="pass plan_options=\\{'granularity': 'dataset'\\}"):
        PatterningCallback(pool, {"l1h0": 1.0}, probe=probe, pool_datasets=labels)


@pytest.mark.parametrize("by_sampling", [False, True])
def test_smoothing_averages_the_plans(tmp_path, probe, by_sampling):
    """With smoothing s, the weights applied at re-plan k are s times those applied at k-1
    plus (1 - s) times plan k's; the first plan is applied as it is."""
    from susc_callback.patterning.mixture import MixtureSampler

    labels = ["a", "b"] * 8
    routing = ({"mixture_sampler": MixtureSampler(labels, seed=0)} if by_sampling
               else {"pool_datasets": labels})
    _, pool, callback = patterning_run(tmp_path, f"smooth{by_sampling}", {"l1h0": -0.01},
                                       probe=probe, smoothing=0.75,
                                       plan_options={"granularity": "dataset"}, **routing)
    plans = [dict(zip(h.plan.groups, h.plan.weights.tolist())) for h in callback.history_]
    expected = dict(plans[0])
    for plan, record in zip(plans, callback.history_):
        if record is not callback.history_[0]:
            expected = {d: 0.75 * expected[d] + 0.25 * plan[d] for d in plan}
        assert record.applied == pytest.approx(expected)
    assert len(plans) == 3 and plans[0] != plans[-1]
    if by_sampling:
        assert callback.mixture_sampler.weights.tolist() == pytest.approx(
            [expected["a"], expected["b"]])
    else:
        for row, label in enumerate(labels):
            assert pool.weights[row].tolist() == pytest.approx([expected[label]] * CONTEXT)


@pytest.mark.parametrize("smoothing", [-0.1, 1.0, True, float("nan")])
def test_bad_smoothing_is_refused(smoothing):
    from susc_callback.patterning.callback import PatterningCallback

    with pytest.raises(ValueError, match="smoothing must be a number in \\[0, 1\\)"):
        PatterningCallback(WeightedPool({"input_ids": pool_ids()}), {"l1h0": 1.0},
                           smoothing=smoothing)
