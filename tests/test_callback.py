"""SusceptibilityCallback inside real Trainer runs on CPU (tiny GPT-2, built from a config)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONTEXT, NEEDS_CUDA, VOCAB, tiny_gpt2
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import Trainer, TrainingArguments, default_data_collator

from susc_callback import ProbeSet, Schedule, SGLDConfig, SusceptibilityResult
from susc_callback.callback.trainer_callback import SusceptibilityCallback
from susc_callback.store.run import RunStore

DROPOUT = {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}


class TokenDataset(torch.utils.data.Dataset):
    """Random sequences as examples (labels = input ids), like a tokenized LM dataset."""

    def __init__(self, count: int = 32, seed: int = 3) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (count, CONTEXT), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def snapshot_config(**changes) -> SGLDConfig:
    values = dict(num_chains=1, num_draws=3, batch_size=4, observable_sequences=4,
                  eval_batch_size=8, n_beta=10.0, gamma=100.0, progress=False)
    return SGLDConfig(**{**values, **changes})


def make_trainer(output_dir: Path, callbacks: list, max_steps: int = 6, save_steps: int = 0,
                 report_to: str = "tensorboard", device: str = "cpu",
                 bind: bool = True) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4,
        learning_rate=1e-3, logging_steps=1, report_to=report_to, seed=0,
        use_cpu=device == "cpu",
        disable_tqdm=True, save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, dataloader_num_workers=0)
    trainer = Trainer(model=tiny_gpt2(0, **DROPOUT), args=args, train_dataset=TokenDataset(),
                      data_collator=default_data_collator, callbacks=callbacks)
    for callback in callbacks:
        if bind and isinstance(callback, SusceptibilityCallback):
            callback.bind(trainer)
    return trainer


def make_callback(probe: ProbeSet, log_dir: Path | None = None,
                  **changes) -> SusceptibilityCallback:
    options = dict(components="heads", config=snapshot_config(), schedule=Schedule(every=2),
                   log_dir=log_dir, n_pcs=2)
    return SusceptibilityCallback(probe, **{**options, **changes})


def losses(trainer: Trainer) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in trainer.state.log_history
            if "loss" in entry]


def scalar_steps(log_dir: Path, tag: str) -> list[int]:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


@pytest.mark.parametrize(("device", "workers"), [
    ("cpu", 1), ("cpu", 2), pytest.param("cuda", 1, marks=NEEDS_CUDA)])
def test_training_is_bitwise_unchanged_by_snapshots(tmp_path, probe, device, workers):
    """Dropout on, snapshots every 2 steps (their chains in forked workers too): weights,
    optimizer state and logged losses equal those of the same run without the callback,
    bit for bit."""
    plain = make_trainer(tmp_path / "plain", [], device=device)
    plain.train()
    config = snapshot_config(num_chains=2, workers=workers)
    watched = make_trainer(tmp_path / "watched", [make_callback(probe, config=config)],
                           device=device)
    watched.train()

    assert sorted(RunStore.of_run(tmp_path / "watched").saved_steps()) == [2, 4, 6]
    for (name, a), b in zip(plain.model.state_dict().items(), watched.model.state_dict().values()):
        assert torch.equal(a, b), name
    state_a, state_b = plain.optimizer.state_dict(), watched.optimizer.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    for key, values in state_a["state"].items():
        for field, tensor in values.items():
            assert torch.equal(tensor, state_b["state"][key][field]), (key, field)
    assert losses(plain) == losses(watched) and len(losses(plain)) == 6
    assert watched.model.training == plain.model.training
    assert all(p.requires_grad for p in watched.model.parameters())


def test_tensorboard_run_holds_loss_and_susceptibilities(tmp_path, probe, monkeypatch,
                                                         capsys):
    log_dir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(log_dir))
    trainer = make_trainer(tmp_path / "out", [make_callback(probe)])
    trainer.train()
    printed = capsys.readouterr().out
    for step in (2, 4, 6):  # each snapshot says when it starts and when it is saved
        assert f"Susceptibility snapshot at step {step}: 4 components and the full chain, " \
               "1 chains x 3 draws" in printed
        assert re.search(rf"Susceptibility snapshot at step {step}: done in \d+ s", printed)

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0,
                                                                "tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert "train/loss" in tags["scalars"]
    for tag in ("susceptibility/a/l0h0", "susceptibility/b/l1h1", "rllc/l0h1", "llc/full",
                "aligned_pc1_loading/l1h0", "aligned_pc2/explained_variance",
                "aligned_pc2/variance_rank", "pc_spectrum/pc2", "snapshot/seconds",
                "snapshot/time_share"):
        assert [e.step for e in accumulator.Scalars(tag)] == [2, 4, 6], tag
    assert {"figures/heatmap", "figures/pc_loadings", "figures/trajectory_pc1_pc2"} <= set(
        tags["images"])
    assert (log_dir / "projector_config.pbtxt").is_file()
    # The scalars equal the saved results.
    result = SusceptibilityResult.load(tmp_path / "out" / "susceptibility" / "step-4")
    logged = accumulator.Scalars("susceptibility/b/l0h1")[1].value
    assert logged == pytest.approx(result.dataset_chi[1, 1], rel=1e-6)
    # ... and reach state.log_history without costing any step its loss log.
    history = trainer.state.log_history
    assert [e["step"] for e in history if "llc/full" in e] == [2, 4, 6]
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4, 5, 6]


def test_checkpoint_steps_get_a_copy_of_the_result(tmp_path, probe):
    callback = make_callback(probe, log_dir=tmp_path / "tb",
                             schedule=Schedule(on_save=True, at_end=True))
    make_trainer(tmp_path / "out", [callback], max_steps=5, save_steps=2).train()
    root = tmp_path / "out"
    assert sorted(RunStore.of_run(root).saved_steps()) == [2, 4, 5]
    for step in (2, 4):
        copy = SusceptibilityResult.load(root / f"checkpoint-{step}" / "susceptibility")
        original = SusceptibilityResult.load(root / "susceptibility" / f"step-{step}")
        assert (copy.chi == original.chi).all()


def test_resume_continues_the_schedule_without_recomputing(tmp_path, probe, monkeypatch):
    import susc_callback.callback.trainer_callback as callback_module

    computed = []
    engine = callback_module.estimate_susceptibilities

    def counting(*args, **kwargs):
        computed.append(kwargs["step"])
        return engine(*args, **kwargs)

    monkeypatch.setattr(callback_module, "estimate_susceptibilities", counting)
    log_dir, out = tmp_path / "tb", tmp_path / "out"
    make_trainer(out, [make_callback(probe, log_dir)], max_steps=8, save_steps=4).train()
    assert computed == [2, 4, 6, 8]

    computed.clear()
    with pytest.warns(UserWarning, match="Moved 2 saved susceptibility snapshots"):
        make_trainer(out, [make_callback(probe, log_dir)], max_steps=8, save_steps=4).train(
            resume_from_checkpoint=str(out / "checkpoint-4"))
    assert computed == [6, 8]
    assert sorted(RunStore.of_run(out).saved_steps()) == [2, 4, 6, 8]
    assert scalar_steps(log_dir, "susceptibility/a/l0h0") == [2, 4, 6, 8]
    assert scalar_steps(log_dir, "aligned_pc1_loading/l0h0") == [2, 4, 6, 8]


def test_resume_with_other_settings_is_refused(tmp_path, probe):
    out = tmp_path / "out"
    make_trainer(out, [make_callback(probe, tmp_path / "tb")], max_steps=4, save_steps=2).train()
    changed = make_callback(probe, tmp_path / "tb", config=snapshot_config(step_size=2e-3))
    with pytest.raises(ValueError, match="other components or SGLD settings"):
        make_trainer(out, [changed], max_steps=4, save_steps=2).train(
            resume_from_checkpoint=str(out / "checkpoint-2"))
    assert sorted(RunStore.of_run(out).saved_steps()) == [2, 4]  # a refusal changes nothing


def test_a_diverging_component_is_marked_and_training_goes_on(tmp_path, probe):
    diverging = {"l0h0": {"transformer.h.0.attn.c_attn.weight": None},
                 "l1": {"transformer.h.1.mlp.c_fc.weight": None}}
    callback = make_callback(probe, tmp_path / "tb", components=diverging,
                             config=snapshot_config(step_size=1e9), schedule=[2])
    trainer = make_trainer(tmp_path / "out", [callback], max_steps=3)
    with pytest.warns(RuntimeWarning, match="snapshot at step 2 failed"):
        trainer.train()  # the full chain diverges too: the snapshot fails, training goes on
    assert trainer.state.global_step == 3

    strict = make_callback(probe, tmp_path / "tb2", components=diverging,
                           config=snapshot_config(step_size=1e9), schedule=[2], strict=True)
    with pytest.raises(RuntimeError, match="diverged"):
        make_trainer(tmp_path / "out2", [strict], max_steps=3).train()


def test_a_diverging_component_is_saved_as_failed(tmp_path, probe, monkeypatch):
    """Only one component's chains blow up: it is saved as failed, the others are kept."""
    from susc_callback.sampler.sgld import ChainBank

    step = ChainBank.step

    def exploding(self, grads, **kwargs):
        step(self, grads, **kwargs)
        if self.name == "l1h0":
            self.state.fill_(float("nan"))

    monkeypatch.setattr(ChainBank, "step", exploding)
    callback = make_callback(probe, tmp_path / "tb", schedule=[2])
    with pytest.warns(RuntimeWarning, match="l1h0"):
        make_trainer(tmp_path / "out", [callback], max_steps=2).train()
    result = SusceptibilityResult.load(tmp_path / "out" / "susceptibility" / "step-2")
    assert set(result.failed) == {"l1h0"}
    assert torch.isnan(torch.from_numpy(result.chi[2])).all()
    assert torch.isfinite(torch.from_numpy(result.chi[[0, 1, 3]])).all()


@pytest.mark.parametrize("changes, message", [
    ({"components": {"x": {"no.such.weight": None}}}, "unknown parameter"),
    ({"schedule": [100]}, "selects no step"),
    ({"config": snapshot_config(batch_size=64)}, "fewer than batch_size"),
])
def test_fail_fast_at_train_begin(tmp_path, probe, changes, message):
    trainer = make_trainer(tmp_path / "out", [make_callback(probe, tmp_path / "tb", **changes)])
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.state.global_step == 0


def test_fail_fast_for_a_probe_longer_than_the_context(tmp_path):
    long_probe = ProbeSet.from_tensors(torch.zeros(2, CONTEXT + 4, dtype=torch.long))
    trainer = make_trainer(tmp_path / "out", [make_callback(long_probe, tmp_path / "tb")])
    with pytest.raises(ValueError, match="more than the model's context"):
        trainer.train()


def test_fail_fast_for_an_iterable_train_dataset(tmp_path, probe):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from TokenDataset()

    trainer = make_trainer(tmp_path / "out", [make_callback(probe, tmp_path / "tb")])
    trainer.train_dataset = Stream()
    with pytest.raises(ValueError, match="pass sampling_data="):
        trainer.train()


@pytest.mark.parametrize("kwargs, error", [
    ({"n_pcs": 0}, "n_pcs must be a positive integer"),
    ({"standardization": "zscore"}, "Invalid standardization 'zscore'"),
    ({"schedule": "often"}, "schedule must be a Schedule"),
])
def test_constructor_rejects_bad_arguments(probe, kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        SusceptibilityCallback(probe, **kwargs)


def test_schedule_rejects_bad_values():
    with pytest.raises(ValueError, match="Schedule.every must be a positive integer.*got 0"):
        Schedule(every=0)
    with pytest.raises(ValueError, match="non-negative integers, got \\[-3\\]"):
        Schedule(steps=(5, -3))


def test_log_spaced_schedule_is_dense_early():
    steps = sorted(Schedule(log_spaced=8).planned_steps(1000))
    assert steps[0] == 1 and steps[-1] == 1000
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert gaps == sorted(gaps)


def test_no_warnings_on_a_clean_run(tmp_path, probe):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module="susc_callback")
        make_trainer(tmp_path / "out", [make_callback(probe, tmp_path / "tb")], max_steps=2).train()


def test_two_process_ddp_matches_a_single_process_estimate(tmp_path, probe):
    """gloo, 2 CPU processes: components are split across ranks, rank 0 merges and writes,
    and the merged result equals a single-process estimate on the saved checkpoint."""
    from transformers import GPT2LMHeadModel

    from susc_callback import estimate_susceptibilities
    from susc_callback.logging.tensorboard import EVENT_FILE_SUFFIX

    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent)]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), str(here / "ddp_worker.py"), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    assert sorted(RunStore.of_run(tmp_path).saved_steps()) == [2, 4]
    merged = SusceptibilityResult.load(tmp_path / "susceptibility" / "step-4")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "checkpoint-4")
    single = estimate_susceptibilities(model, "heads", TokenDataset(), probe,
                                       snapshot_config(), collate_fn=default_data_collator)
    assert merged.component_names == single.component_names == ["l0h0", "l0h1", "l1h0", "l1h1"]
    # Each rank runs one head per layer (one chain at a time), the single process stacks
    # two: the same random streams, so equal up to float rounding.
    np.testing.assert_allclose(merged.chi, single.chi, rtol=1e-5, atol=1e-7)
    assert merged.llc_full == single.llc_full
    writers = {p.name.split(".")[5] for p in (tmp_path / "tb").glob(f"*{EVENT_FILE_SUFFIX}")}
    assert len(writers) == 1  # only rank 0 wrote TensorBoard events


def _free_port() -> int:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return probe_socket.getsockname()[1]


def test_other_reporters_get_the_scalars_and_keep_their_loss_logs(tmp_path, probe, monkeypatch):
    """A reporting integration (as wandb would be) receives each snapshot's scalars through
    its on_log, and every step's loss log still reaches it."""
    from transformers import TrainerCallback, integrations

    class Recorder(TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append((state.global_step, dict(logs)))

    monkeypatch.setitem(integrations.INTEGRATION_TO_CALLBACK, "recorder", Recorder)
    recorder = Recorder()
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    make_trainer(tmp_path / "out", [make_callback(probe), recorder], report_to="none").train()
    assert [step for step, logs in recorder.logs if "llc/full" in logs] == [2, 4, 6]
    assert [step for step, logs in recorder.logs if "loss" in logs] == [1, 2, 3, 4, 5, 6]
    # TensorBoard reporting is off: the callback writes to output_dir/runs/<date_host> itself
    assert len(list((tmp_path / "out" / "runs").glob("*/events.out.tfevents.*"))) == 1


def test_folders_before_training_and_an_unbound_callback(tmp_path, probe, monkeypatch):
    """The folders are known from the arguments before training, else once it begins; a
    callback that is not bound to its Trainer writes a TensorBoard run of its own."""
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    named = make_callback(probe, tmp_path / "tb", output_dir=tmp_path / "results")
    assert named.results_dir == tmp_path / "results" / "susceptibility"
    assert named.tensorboard_dir == tmp_path / "tb"
    unbound = make_callback(probe)
    assert unbound.results_dir is None and unbound.tensorboard_dir is None
    trainer = make_trainer(tmp_path / "out", [unbound], max_steps=2, bind=False)
    trainer.train()
    assert unbound.results_dir == tmp_path / "out" / "susceptibility"
    assert unbound.tensorboard_dir == tmp_path / "out" / "runs" / "susceptibility"
    assert list(unbound.tensorboard_dir.glob("events.out.tfevents.*"))
    assert [e["step"] for e in trainer.state.log_history if "llc/full" in e] == [2]
    with pytest.raises(TypeError, match="needs a transformers Trainer"):
        unbound.bind(object())
    bound = make_callback(probe).bind(trainer)
    assert bound.bind(trainer) is bound
    assert trainer.callback_handler.callbacks.count(bound) == 1


def test_a_random_collator_does_not_move_the_global_rng(tmp_path, probe):
    """The default sampling data goes through the Trainer's collator, which may draw random
    numbers (MLM masking): the callback's checks and snapshots must not move the RNG."""
    from transformers import default_data_collator

    def random_collator(examples):
        torch.rand(1)  # as an MLM collator would
        return default_data_collator(examples)

    def run(callbacks):
        trainer = make_trainer(tmp_path / f"out{len(callbacks)}", callbacks)
        trainer.data_collator = random_collator
        trainer.train()
        return trainer

    plain, watched = run([]), run([make_callback(probe, tmp_path / "tb")])
    assert losses(plain) == losses(watched)
    for a, b in zip(plain.model.parameters(), watched.model.parameters()):
        assert torch.equal(a, b)


def test_sharded_training_is_recognised():
    from types import SimpleNamespace as Fake

    from susc_callback.callback.trainer_context import shards_parameters

    def deepspeed(stage):
        plugin = Fake(zero_stage=stage)
        return Fake(is_fsdp_enabled=False, is_deepspeed_enabled=True,
                    accelerator=Fake(state=Fake(deepspeed_plugin=plugin)))

    plain = Fake(fsdp=None)
    assert shards_parameters(Fake(is_fsdp_enabled=True, accelerator=Fake()), plain)
    assert shards_parameters(deepspeed(3), plain)
    assert not shards_parameters(deepspeed(2), plain)
    assert not shards_parameters(None, plain)
    assert shards_parameters(None, Fake(fsdp="full_shard"))  # unbound: from the arguments
