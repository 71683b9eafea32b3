"""The run store: layout, settings checks, setting aside, checkpoint discovery."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from susc_callback import SGLDConfig, SusceptibilityResult
from susc_callback.store.files import PARTIAL_SUFFIX
from susc_callback.store.run import (
    RunStore,
    check_same_settings,
    checkpoint_step,
    find_checkpoints,
    load_results,
)


def _result(step: int, config: SGLDConfig) -> SusceptibilityResult:
    chi = np.random.default_rng(step).normal(size=(2, 3))
    return SusceptibilityResult(
        component_names=["h0", "h1"], chi=chi, dataset_names=["a"],
        dataset_chi=chi.mean(axis=1, keepdims=True), rllc=np.ones(2), llc_full=1.0,
        mean_phi=np.ones(2), anchor_loss=np.ones(2), loss_traces=np.ones((2, 1, 1)),
        full_loss_trace=np.ones((1, 1)), token_sequence=np.zeros(3, np.int64),
        token_position=np.arange(3), probe_input_ids=np.arange(4)[None],
        probe_attention_mask=np.ones((1, 4), np.int64), sequence_datasets=["a"],
        config=config.to_dict(), step=step)


def test_every_field_is_marked_and_run_only_fields_may_differ():
    config = SGLDConfig()
    run_only = {f.name for f in dataclasses.fields(SGLDConfig)} - set(config.estimate_settings())
    assert run_only == {"on_divergence", "batch_chains", "max_batched_chains", "workers",
                        "device", "progress"}
    saved = _result(1, config.replace(workers=1, batch_chains="off", progress=False))
    check_same_settings(saved, config.replace(workers=2), ["h0", "h1"], "here")  # no error
    for change in (dict(step_size=2e-3), dict(seed=1), dict(eval_batch_size=8)):
        with pytest.raises(ValueError, match="other components or SGLD settings"):
            check_same_settings(saved, config.replace(**change), ["h0", "h1"], "here")
    with pytest.raises(ValueError, match="other components"):
        check_same_settings(saved, config, ["h1", "h0"], "here")


def test_saved_steps_ignore_partial_and_foreign_folders(tmp_path):
    store = RunStore.of_run(tmp_path)
    for step in (30, 4):
        store.save(_result(step, SGLDConfig()))
    (store.root / f"step-7{PARTIAL_SUFFIX}").mkdir()  # an interrupted save
    (store.root / "step-9").mkdir()                   # not a result
    (store.root / "notes").mkdir()
    assert list(store.saved_steps()) == [4, 30] and store.has(30) and not store.has(9)
    assert [r.step for r in store.load_all()] == [4, 30]
    assert [r.step for r in store.load_all(up_to=10)] == [4]
    assert [r.step for r in load_results(tmp_path)] == [4, 30]        # a run
    assert [r.step for r in load_results(store.root)] == [4, 30]      # its store
    assert [r.step for r in load_results(store.step_dir(30))] == [30]  # one result


def test_set_aside_keeps_the_results_out_of_the_series(tmp_path):
    store = RunStore.of_run(tmp_path)
    for step in (2, 4, 6):
        store.save(_result(step, SGLDConfig()))
    target = store.set_aside([4, 6])
    assert list(store.saved_steps()) == [2]
    assert sorted(p.name for p in target.iterdir()) == ["step-4", "step-6"]
    assert np.array_equal(RunStore(target).load(6).chi, _result(6, SGLDConfig()).chi)


def test_checkpoints_are_found_by_name_or_trainer_state(tmp_path):
    for name in ("checkpoint-20", "checkpoint-3", "other", "checkpoint-x"):
        (tmp_path / name).mkdir()
    assert {s: p.name for s, p in find_checkpoints(tmp_path).items()} == {
        3: "checkpoint-3", 20: "checkpoint-20"}
    (tmp_path / "other" / "trainer_state.json").write_text('{"global_step": 11}')
    assert checkpoint_step(tmp_path / "other") == 11
    assert list(find_checkpoints(tmp_path, ["other", "checkpoint-3"])) == [3, 11]
    with pytest.raises(ValueError, match="cannot tell the training step"):
        checkpoint_step(tmp_path / "checkpoint-x")
    with pytest.raises(FileNotFoundError, match="no checkpoints found"):
        find_checkpoints(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="no saved results"):
        load_results(tmp_path)
