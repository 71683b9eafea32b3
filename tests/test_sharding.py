"""Estimates split by chain: the plan, the shards, and ``susc analyze`` on 2 and 3
processes (gloo on CPU, launched with torchrun) against one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_cli import SGLD, run  # noqa: F401 - the run fixture

from susc_callback import SGLDConfig, SusceptibilityResult, estimate_susceptibilities
from susc_callback.sharding import (
    ShardMismatchError,
    ShardStore,
    WorkUnit,
    estimate_chains,
    merged_result,
    rank_share,
    work_units,
)
from susc_callback.store.run import RunStore

CHAINS = ["--num-chains", "3"]


def test_rank_shares_cover_every_unit_once_and_balance():
    units = work_units([30, 10, 20], 4)
    for world in (1, 2, 3, 5, 12, 13):
        shares = [rank_share(units, rank, world) for rank in range(world)]
        assert sorted(u for share in shares for u in share) == sorted(units)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert rank_share(units, 0, 3)[:2] == [WorkUnit(10, 0), WorkUnit(10, 1)]
    with pytest.raises(ValueError, match="rank 3 is not in 0..2"):
        rank_share(units, 3, 3)


def test_chains_run_apart_and_merged_give_the_one_process_result(gpt2, probe, sampling_ids,
                                                                 config, tmp_path):
    settings = config.replace(num_chains=3, workers=1)
    whole = estimate_susceptibilities(gpt2, "heads", sampling_ids, probe, settings, step=5)
    parts = [*estimate_chains(gpt2, "heads", sampling_ids, probe, settings, [2, 0]),
             *estimate_chains(gpt2, "heads", sampling_ids, probe, settings, [1])]
    store = ShardStore(RunStore(tmp_path))
    for shard in parts:  # through the disk, as susc analyze does
        store.write(5, shard, {"settings": settings.estimate_settings()})
    merged = merged_result([store.read(WorkUnit(5, c)) for c in range(3)], probe, settings, 5)
    for key in ("chi", "chi_se", "rllc", "loss_traces", "probe_traces"):
        np.testing.assert_array_equal(getattr(merged, key), getattr(whole, key), err_msg=key)
    assert merged.llc_full == whole.llc_full
    with pytest.raises(ValueError, match=r"one shard of each of its 3 chains; got chains \[0, 2\]"):
        merged_result([parts[0], parts[1]], probe, settings, 5)


def test_a_shard_of_another_estimate_is_refused_by_name(gpt2, probe, sampling_ids, config,
                                                        tmp_path):
    settings = config.replace(num_chains=1)
    store = ShardStore(RunStore(tmp_path))
    shard, = estimate_chains(gpt2, "heads", sampling_ids, probe, settings, [0])
    store.write(5, shard, {"settings": settings.estimate_settings(), "probe": "abc"})
    other = settings.replace(step_size=2e-3)
    with pytest.raises(ShardMismatchError, match=r"settings.step_size=0.001 \(now 0.002\).*"
                                                 r"--force"):
        store.is_done(WorkUnit(5, 0), {"settings": other.estimate_settings(), "probe": "abc"})
    assert store.is_done(WorkUnit(5, 0), {"settings": settings.estimate_settings(),
                                          "probe": "abc"})
    assert not store.is_done(WorkUnit(5, 1), {})
    (store.folder(WorkUnit(5, 0)) / "arrays.safetensors").write_bytes(b"damaged")
    assert not store.is_done(WorkUnit(5, 0), {"settings": settings.estimate_settings(),
                                              "probe": "abc"})  # computed again


def _launch(run_dir: Path, processes: int, *extra: str, wait: bool = True,
            program: tuple[str, ...] = ("-m", "susc_callback")):
    root = run_dir.parent
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", *program, "analyze",
               str(run_dir), "--probe", str(root / "probe.jsonl"), "--sampling-data",
               str(root / "train.jsonl"), *SGLD, *CHAINS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _copy(run_dir: Path, name: str) -> Path:
    target = run_dir.parent / name / "run"
    shutil.copytree(run_dir, target)
    for data in ("probe.jsonl", "train.jsonl"):
        shutil.copy(run_dir.parent / data, target.parent)
    return target


def _results(run_dir: Path) -> list[SusceptibilityResult]:
    return RunStore.of_run(run_dir).load_all()


@pytest.mark.parametrize("processes", [2, 3])
def test_analyze_on_several_processes_equals_one_process(run, processes):  # noqa: F811
    one = _launch(_copy(run, "one"), 1)
    assert one.returncode == 0, one.stderr
    many = _launch(run, processes)
    assert many.returncode == 0, many.stdout + many.stderr
    assert f"on rank {processes - 1} of {processes}" in many.stdout
    expected, found = _results(run.parent / "one" / "run"), _results(run)
    assert [r.step for r in found] == [10, 20, 30]
    for a, b in zip(found, expected):
        difference = np.nanmax(np.abs(a.chi - b.chi))
        assert difference <= 1e-5 * np.nanmax(np.abs(b.chi)), (a.step, difference)
    assert not (run / "susceptibility" / "shards").exists()  # merged shards are removed


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _units_on_disk(run_dir: Path) -> set[tuple[int, int]]:
    shards = run_dir / "susceptibility" / "shards"
    done: set[tuple[int, int]] = set()
    for step in RunStore.of_run(run_dir).saved_steps():
        done |= {(step, chain) for chain in range(3)}
    for folder in shards.glob("step-*/chain-*"):
        if not folder.name.endswith(".partial"):
            done.add((int(folder.parent.name[5:]), int(folder.name[6:])))
    return done


def _computed(output: str) -> set[tuple[int, int]]:
    units = set()
    for line in output.splitlines():
        if ": estimating chains " in line:
            step = int(line.split(":")[0].split()[1])
            for span in line.split("estimating chains ")[1].split()[0].split(","):
                first, _, last = span.partition("-")
                units |= {(step, c) for c in range(int(first), int(last or first) + 1)}
    return units


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_rank_killed_midway_leaves_shards_that_a_rerun_completes(run):  # noqa: F811
    reference = _copy(run, "reference")
    assert _launch(reference, 1).returncode == 0
    job = _launch(run, 2, wait=False)
    while not _units_on_disk(run) and job.poll() is None:
        time.sleep(0.01)
    ranks = _children(job.pid)
    assert ranks and job.poll() is None, "the job finished before a rank could be killed"
    os.kill(max(ranks), 9)
    output, _ = job.communicate(timeout=300)
    assert job.returncode != 0, output
    kept = _units_on_disk(run)
    assert 0 < len(kept) < 9
    rerun = _launch(run, 2)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert not _computed(rerun.stdout) & kept  # nothing done is done again
    assert _computed(rerun.stdout) | kept == {(s, c) for s in (10, 20, 30) for c in range(3)}
    for a, b in zip(_results(run), _results(reference)):
        np.testing.assert_allclose(a.chi, b.chi, rtol=1e-5, atol=1e-7, err_msg=str(a.step))


def test_a_second_analysis_of_the_same_run_is_refused(run):  # noqa: F811
    with RunStore.of_run(run).writing():
        busy = _launch(run, 2)
    assert busy.returncode != 0
    assert "is being written by another process" in busy.stdout + busy.stderr
    assert not RunStore.of_run(run).saved_steps()
    assert not (run / "susceptibility" / "shards").exists()


@pytest.mark.parametrize("stage, rank, told", [
    ("_Analysis.of", "1", "rank 1: "),  # loading its inputs, e.g. a file missing on a node
    ("_finish", "0", "main rank: "),    # the main rank merging and saving
])
def test_a_rank_failing_alone_stops_every_rank(run, tmp_path, stage, rank, told):  # noqa: F811
    script = tmp_path / "fails_on_one_rank.py"
    owner, _, name = f"analyze.{stage}".rpartition(".")
    script.write_text(
        "import os, sys\n"
        "from susc_callback.cli import analyze, main\n"
        f"real = {owner}.{name}\n"
        "def failing(*args):\n"
        f"    if os.environ['RANK'] == '{rank}':\n"
        "        raise analyze.CommandError('disk quota exceeded on this node')\n"
        "    return real(*args)\n"
        f"{owner}.{name} = failing\n"
        "sys.exit(main(sys.argv[1:]))\n")
    job = _launch(run, 2, program=(str(script),))
    assert job.returncode != 0
    # Every rank reports the error and ends by itself. Before, the others waited at their
    # next collective: torchrun killed them, a launcher without an agent (srun) would not.
    assert "error: disk quota exceeded on this node" in job.stderr  # the failing rank
    assert f"error: {told}disk quota exceeded on this node" in job.stderr  # the other
    assert "Signal 6" not in job.stderr and "SIGABRT" not in job.stderr


def _estimate_on_rank(rank: int, world: int, folder: str) -> None:
    import torch.distributed as dist
    from conftest import tiny_gpt2

    from susc_callback.sharding import estimate_distributed

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world)
    try:
        model, data, probe, config = _inputs(tiny_gpt2)
        result = estimate_distributed(model, "heads", data, probe, config, step=1)
        result.save(Path(folder) / f"rank-{rank}")
    finally:
        dist.destroy_process_group()


def _inputs(build):
    import torch

    from susc_callback import ProbeSet

    generator = torch.Generator().manual_seed(3)
    data = torch.randint(0, 64, (16, 16), generator=generator)
    probe = ProbeSet.from_tensors(torch.randint(0, 64, (4, 16), generator=generator))
    config = SGLDConfig(num_chains=3, num_draws=4, batch_size=4, observable_sequences=4,
                        eval_batch_size=8, n_beta=10.0, gamma=100.0, progress=False,
                        workers=1)
    return build().eval(), data, probe, config


def test_estimate_distributed_in_a_process_group_equals_one_process(tmp_path):
    from conftest import tiny_gpt2
    from torch.multiprocessing import start_processes

    start_processes(_estimate_on_rank, args=(2, str(tmp_path)), nprocs=2,
                    start_method="spawn")
    model, data, probe, config = _inputs(tiny_gpt2)
    alone = estimate_susceptibilities(model, "heads", data, probe, config, step=1)
    for rank in (0, 1):  # every rank gets the whole result
        found = SusceptibilityResult.load(tmp_path / f"rank-{rank}")
        np.testing.assert_allclose(found.chi, alone.chi, rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(found.loss_traces, alone.loss_traces)
