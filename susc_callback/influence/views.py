"""What a researcher reads off influence results: for a query sequence, the training
sequences that most raise and most lower its loss, and how that list changes over a
checkpoint series ("influence dynamics"). Numbers only; the HTML and figures are in
:mod:`susc_callback.logging.influence_report`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from susc_callback.influence.result import InfluenceResult, strongest


@dataclass
class Influential:
    """The training sequences with the largest positive (``raising``) and negative
    (``lowering``) influence on one query sequence: ``(training sequence, score)`` pairs,
    strongest first."""

    query: int
    raising: list[tuple[int, float]]
    lowering: list[tuple[int, float]]

    @property
    def sequences(self) -> set[int]:
        """The training sequences in either list."""
        return {i for i, _ in self.raising + self.lowering}


def influential_sequences(result: InfluenceResult, query: int, count: int = 5,
                          posterior: str = "full") -> Influential:
    """The ``count`` training sequences that most raise and most lower query sequence
    ``query``'s mean loss (covariance form, :meth:`InfluenceResult.sequence_matrix`)."""
    queries = len(result.query_datasets)
    if not 0 <= query < queries:
        raise ValueError(f"query sequence {query} is outside [0, {queries - 1}]")
    return Influential(query, *strongest(result.sequence_matrix(posterior)[:, query], count))


@dataclass
class InfluenceDynamics:
    """A query's most influential training sequences across a checkpoint series.

    Attributes:
        steps: the checkpoints' training steps, in order.
        sequences: every training sequence that was among the ``count`` strongest (raising
            or lowering) at some checkpoint.
        scores: ``(steps, sequences)`` their influence at every checkpoint.
        overlap: ``(steps - 1,)`` Jaccard overlap of the strongest sets of consecutive
            checkpoints (1: the same training data matter; 0: entirely other data).
    """

    query: int
    steps: list[int]
    sequences: list[int]
    scores: np.ndarray
    overlap: np.ndarray


def influence_dynamics(results: list[InfluenceResult], query: int, count: int = 5,
                       posterior: str = "full") -> InfluenceDynamics:
    """How query sequence ``query``'s most influential training sequences change over
    ``results`` (one series: the same training and query sequences)."""
    results = sorted(results, key=lambda r: -1 if r.step is None else r.step)
    check_one_influence_series(results)
    tops = [influential_sequences(r, query, count, posterior).sequences for r in results]
    sequences = sorted(set().union(*tops))
    scores = np.stack([r.sequence_matrix(posterior)[sequences, query] for r in results])
    overlap = np.array([len(a & b) / len(a | b) if a | b else 1.0
                        for a, b in zip(tops, tops[1:])])
    return InfluenceDynamics(query, [r.step for r in results], sequences, scores, overlap)


def check_one_influence_series(results: list[InfluenceResult]) -> None:
    """Refuse results that do not share training and query sequences (and their
    identities), or posteriors, with the first."""
    if not results:
        raise ValueError("No influence results")
    first = results[0]
    for result in results[1:]:
        same = (np.array_equal(result.train_index, first.train_index)
                and _same(result.train_input_ids, first.train_input_ids)
                and _same(result.query_input_ids, first.query_input_ids)
                and result.posterior_names == first.posterior_names)
        if not same:
            raise ValueError(f"The influence result of step {result.step} was computed on "
                             f"other training or query sequences, or other components, than "
                             f"that of step {first.step}: one series shares them")


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None
                                         and np.array_equal(a, b))
