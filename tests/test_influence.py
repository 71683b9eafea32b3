"""estimate_influence on a tiny GPT-2: aggregation, layout, files, processes and bad input.
(Its numbers against a closed form: test_influence_closed_form.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CONTEXT, VOCAB, tiny_gpt2

from susc_callback import ProbeSet, SGLDConfig
from susc_callback.influence import InfluenceResult, estimate_influence
from susc_callback.store.files import ResultFileError


def ids(count: int, seed: int, length: int = CONTEXT) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


def settings(**overrides) -> SGLDConfig:
    return SGLDConfig(**{"num_chains": 2, "num_draws": 6, "batch_size": 4,
                         "observable_sequences": 4, "step_size": 1e-3, "n_beta": 10.0,
                         "gamma": 100.0, "workers": 1, "progress": False, **overrides})


@pytest.fixture(scope="module")
def token_level():
    return estimate_influence(tiny_gpt2(0), ids(6, 1), ids(2, 2), settings(),
                              components="heads", train_level="token", query_level="token")


def test_sequence_rows_are_the_means_of_their_tokens(token_level):
    """Cov(mean_t a_t, b) = mean_t Cov(a_t, b): with the same seed (the same draws) the
    sequence-level matrix is the token-level one averaged over each sequence's tokens."""
    by_sequence = estimate_influence(tiny_gpt2(0), ids(6, 1), ids(2, 2), settings(),
                                     components="heads", train_level="sequence",
                                     query_level="sequence")
    tokens = token_level.influence
    train_seq, query_seq = token_level.train_rows[:, 0], token_level.query_rows[:, 0]
    expected = np.stack([[[tokens[k][np.ix_(train_seq == i, query_seq == j)].mean()
                           for j in range(2)] for i in range(6)] for k in range(len(tokens))])
    np.testing.assert_allclose(by_sequence.influence, expected, rtol=1e-6, atol=1e-12)
    assert by_sequence.influence.shape == (5, 6, 2)
    assert by_sequence.train_rows.tolist() == [[i, -1] for i in range(6)]


def test_rows_name_their_tokens(token_level):
    assert token_level.posterior_names == ["full", "l0h0", "l0h1", "l1h0", "l1h1"]
    assert token_level.influence.shape == (5, 6 * (CONTEXT - 1), 2 * (CONTEXT - 1))
    assert token_level.query_rows[:CONTEXT].tolist() == \
        [[0, t] for t in range(CONTEXT - 1)] + [[1, 0]]
    assert (token_level.draws == 12).all()
    assert np.isfinite(token_level.influence).all()


def test_the_correlation_form_and_the_top_rows(token_level):
    corr = token_level.matrix("l1h0", "correlation")
    cov = token_level.matrix("l1h0")
    k = token_level.posterior_names.index("l1h0")
    i, j = 3, 5
    assert corr[i, j] == pytest.approx(cov[i, j] / np.sqrt(
        token_level.train_variance[k, i] * token_level.query_variance[k, j]))
    assert np.nanmax(np.abs(corr)) <= 1 + 1e-9
    top = token_level.top(j, count=3)
    column = token_level.matrix()[:, j]
    assert [row for row, _ in top["raise"]] == np.argsort(-column)[:3].tolist()
    assert [row for row, _ in top["lower"]] == np.argsort(column)[:3].tolist()
    assert all(score > 0 for _, score in top["raise"])


def test_files_round_trip_exactly(token_level, tmp_path):
    token_level.save(tmp_path / "influence")
    loaded = InfluenceResult.load(tmp_path / "influence")
    for name, value in vars(token_level).items():
        other = getattr(loaded, name)
        if isinstance(value, np.ndarray):
            assert value.dtype == other.dtype and np.array_equal(value, other), name
        else:
            assert value == other, name
    token_level.save(tmp_path / "susceptibility-like")
    (tmp_path / "susceptibility-like" / "meta.json").write_text('{"format_version": 2}')
    with pytest.raises(ResultFileError):
        InfluenceResult.load(tmp_path / "susceptibility-like")


def test_forked_workers_merge_to_the_one_process_result(token_level):
    """Chains are seeded per (seed, component, chain): two processes give the same sums."""
    forked = estimate_influence(tiny_gpt2(0), ids(6, 1), ids(2, 2), settings(workers=2),
                                components="heads", train_level="token", query_level="token")
    np.testing.assert_allclose(forked.influence, token_level.influence, rtol=1e-9, atol=1e-15)


def test_queries_of_another_length_are_padded(tmp_path):
    result = estimate_influence(tiny_gpt2(0), ids(4, 1), ids(2, 2, length=CONTEXT // 2),
                                settings(), query_level="token")
    assert result.influence.shape == (1, 4, 2 * (CONTEXT // 2 - 1))
    assert result.query_input_ids.shape == (2, CONTEXT // 2)


@pytest.mark.parametrize("call, message", [
    (lambda m: estimate_influence(m, ids(4, 1, CONTEXT + 4), ids(2, 2), settings()),
     "train sequences have 20 tokens, more than the model's context of 16"),
    (lambda m: estimate_influence(m, ids(4, 1), ids(0, 2), settings()), "queries is empty"),
    (lambda m: estimate_influence(m, ids(4, 1), ids(2, 2), settings(), components="l9h9"),
     "Unknown component 'l9h9'"),
    (lambda m: estimate_influence(m, ids(4, 1), ids(2, 2), settings(), train_level="word"),
     "train_level must be one of"),
    (lambda m: estimate_influence(m, ids(4, 1), ids(2, 2), settings(), train_index=[1, 2]),
     "train_index must hold one integer per training sample"),
    (lambda m: estimate_influence(m, ids(4, 1), ids(2, 2), settings(), max_bytes=1000,
                                  query_level="token"),
     r"4 x 30 entries per posterior .* Aggregate"),
    (lambda m: estimate_influence(
        m, ProbeSet.from_tensors(ids(2, 1), torch.tensor([[1] * CONTEXT, [1] + [0] * 15])),
        ids(2, 2), settings(), sampling_data=ids(8, 3)),
     r"training sequences \[1\] have no valid target token"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_gpt2(0))


def test_a_covariance_needs_two_draws():
    with pytest.raises(ValueError, match="num_draws=1"):
        settings(num_chains=1, num_draws=1)
