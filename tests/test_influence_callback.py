"""InfluenceCallback: influence matrices at snapshots, training left exactly as it was."""

from __future__ import annotations

import numpy as np
import torch
from test_callback import losses, make_trainer, scalar_steps, snapshot_config

from susc_callback import Schedule
from susc_callback.callback.influence import InfluenceCallback
from susc_callback.influence import InfluenceResult
from susc_callback.influence.views import influential_sequences
from susc_callback.store.run import INFLUENCE_FOLDER, RunStore


def test_snapshots_are_saved_logged_and_leave_training_alone(tmp_path, probe):
    train = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(4))
    plain = make_trainer(tmp_path / "plain", [])
    plain.train()
    callback = InfluenceCallback(train, probe, config=snapshot_config(num_chains=2),
                                 schedule=Schedule(every=2), count=2,
                                 log_dir=str(tmp_path / "tb"))
    watched = make_trainer(tmp_path / "watched", [callback])
    watched.train()
    for (name, a), b in zip(plain.model.state_dict().items(),
                            watched.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert losses(plain) == losses(watched)
    store = RunStore.of_run(tmp_path / "watched", INFLUENCE_FOLDER, InfluenceResult)
    assert sorted(store.saved_steps()) == [2, 4, 6] == [r.step for r in callback.results_]
    assert np.array_equal(store.load(6).influence, callback.results_[-1].influence)
    assert scalar_steps(tmp_path / "tb", "influence/mean_abs") == [2, 4, 6]
    assert scalar_steps(tmp_path / "tb", "influence/top_overlap/q3") == [4, 6]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tops = [influential_sequences(r, 0, 2) for r in callback.results_[1:]]
    sets = [{i for i, _ in t.raising + t.lowering} for t in tops]
    assert events.Scalars("influence/top_overlap/q0")[-1].value == \
        len(sets[0] & sets[1]) / len(sets[0] | sets[1])
