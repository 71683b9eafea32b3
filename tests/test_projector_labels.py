"""TensorBoard's projector, read through TensorBoard's own HTTP data API, shows every probe
token with its pattern label and cluster."""

from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import torch
from conftest import CONTEXT, VOCAB, tiny_gpt2

from susc_callback import ProbeSet, SGLDConfig, estimate_susceptibilities
from susc_callback.clusters.snapshot import cluster_snapshot
from susc_callback.logging.snapshots import SnapshotPublisher
from susc_callback.store.run import RunStore


def _get(url: str) -> str:
    for _ in range(30):  # the server loads the run in the background
        try:
            return urllib.request.urlopen(url, timeout=10).read().decode()
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def test_the_projector_serves_pattern_and_cluster_labels(tmp_path):
    from tensorboard import program

    generator = torch.Generator().manual_seed(0)
    spans = torch.randint(0, VOCAB, (3, CONTEXT // 2), generator=generator)
    probe = ProbeSet.from_tensors(torch.cat([torch.cat([spans, spans], 1), torch.randint(
        0, VOCAB, (3, CONTEXT), generator=generator)]))
    sampling = torch.randint(0, VOCAB, (16, CONTEXT), generator=generator)
    config = SGLDConfig(num_chains=1, num_draws=4, batch_size=4, observable_sequences=4,
                        progress=False)
    result = estimate_susceptibilities(tiny_gpt2(0), "heads", sampling, probe, config, step=5)
    publisher = SnapshotPublisher(RunStore(tmp_path / "store"), tmp_path / "tb")
    publisher.publish(result)
    publisher.close()

    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(tmp_path / "tb"), "--port", "0",
                          "--host", "127.0.0.1"])
    url = board.launch()
    info = json.loads(_get(url + "data/plugin/projector/info?run=."))
    name = info["embeddings"][0]["tensorName"]
    rows = [line.split("\t") for line in _get(
        url + f"data/plugin/projector/metadata?run=.&name={name}").splitlines()]
    header, rows = rows[0], rows[1:]
    assert header == ["token", "context", "dataset", "sequence", "position", "pattern",
                      "cluster"]
    expected = cluster_snapshot(result)
    assert len(rows) == len(result.chi[0])
    assert [r[5] for r in rows] == expected.patterns.tolist()
    assert [int(r[6]) for r in rows] == expected.clusters.labels_.tolist()
    assert "induction" in {r[5] for r in rows}  # the repeated halves
    assert np.unique([r[6] for r in rows]).size == expected.clusters.n_clusters_
