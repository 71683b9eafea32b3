"""The run's TensorBoard view and checkpoint copies follow the saved results across
resumes and kills, and one run directory has one writer at a time."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap

import pytest
from test_callback import make_callback, make_trainer, scalar_steps
from test_cli import analyze, run  # noqa: F401 - the `run` fixture

from susc_callback import SusceptibilityResult
from susc_callback.store import run as run_module
from susc_callback.store.run import RunInUseError, RunStore


def projector_steps(log_dir) -> list[int]:
    config = (log_dir / "projector_config.pbtxt").read_text()
    return sorted(int(step) for step in re.findall(r'tensor_path: "(\d+)/susceptibility/', config))


def test_resume_rebuilds_tensorboard_and_repairs_checkpoint_copies(tmp_path, probe):
    log_dir, out = tmp_path / "tb", tmp_path / "out"
    make_trainer(out, [make_callback(probe, log_dir)], max_steps=8, save_steps=4).train()
    assert projector_steps(log_dir) == [2, 4, 6, 8]
    # What a kill can leave: the events of a saved snapshot never written (killed between
    # saving and logging), an interrupted copy into its checkpoint.
    for events in log_dir.glob("events.out.tfevents.*.susceptibility"):
        events.unlink()
    copy = out / "checkpoint-4" / "susceptibility"
    shutil.rmtree(copy)
    copy.mkdir()

    with pytest.warns(UserWarning, match="Moved 2 saved susceptibility snapshots"):
        make_trainer(out, [make_callback(probe, log_dir)], max_steps=8, save_steps=4).train(
            resume_from_checkpoint=str(out / "checkpoint-4"))
    assert projector_steps(log_dir) == [2, 4, 6, 8]
    for tag in ("susceptibility/a/l0h0", "aligned_pc1_loading/l0h0", "snapshot/seconds"):
        assert scalar_steps(log_dir, tag) == [2, 4, 6, 8], tag
    saved = SusceptibilityResult.load(out / "susceptibility" / "step-4")
    assert (SusceptibilityResult.load(copy).chi == saved.chi).all()


def test_an_interrupted_copy_into_a_checkpoint_leaves_no_partial_copy(tmp_path, probe,
                                                                      monkeypatch):
    out = tmp_path / "out"
    make_trainer(out, [make_callback(probe, tmp_path / "tb")], max_steps=2, save_steps=2).train()
    store, target = RunStore.of_run(out), out / "checkpoint-2" / "susceptibility"
    shutil.rmtree(target)
    copytree = shutil.copytree

    def killed_midway(source, destination, **kwargs):
        copytree(source, destination, ignore=lambda folder, names: names[1:], **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module.shutil, "copytree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        store.copy_into_checkpoint(2, out)
    assert not target.exists()
    monkeypatch.setattr(run_module.shutil, "copytree", copytree)
    store.copy_into_checkpoint(2, out, only_if_missing=True)
    SusceptibilityResult.load(target)


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from susc_callback.store.run import RunStore
    with RunStore(sys.argv[1]).writing():
        print("locked", flush=True)
        time.sleep(60)
""")


def test_one_writer_per_run_directory(run, capsys):  # noqa: F811
    root = RunStore.of_run(run).root
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(root)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert analyze(run, "--checkpoints", "checkpoint-10") == 2
        error = capsys.readouterr().err
        assert "is being written by another process" in error and str(root) in error
        assert not RunStore.of_run(run).saved_steps()
        with pytest.raises(RunInUseError), RunStore(root).writing(wait_seconds=0.2):
            pass
    finally:
        holder.kill()  # a killed holder leaves no stale lock
        holder.wait()
    assert analyze(run, "--checkpoints", "checkpoint-10") == 0
    assert list(RunStore.of_run(run).saved_steps()) == [10]
