"""Token pattern labels on hand-written sequences; clusters on planted and on pure noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from susc_callback import SGLDConfig, SusceptibilityResult
from susc_callback.clusters import TokenClusters, tag_tokens
from susc_callback.clusters.clustering import eigengap_count


def tokens_of(texts: list[str], ids: list[int] | None = None):
    """A one-sequence probe: every position but the first is a probe target (ids default
    to one per distinct piece)."""
    ids = ids or [texts.index(piece) for piece in texts]
    positions = np.arange(len(texts) - 1)
    return np.zeros(len(positions), np.int64), positions, np.array([ids]), [texts]


def test_word_spacing_and_digit_tags():
    pieces = ["The", " bro", "wn", " un", "believ", "able", "\n", "    ", "ret", "urn",
              " 42", ".", "'s"]
    # entry t tags pieces[t + 1], predicted from pieces[:t + 1]
    assert tag_tokens(*tokens_of(pieces)).tolist() == [
        "word start", "word end", "word start", "word part", "word end", "spacing",
        "spacing", "word start", "word end", "digit", "delimiter", "other"]


def test_bracket_and_quote_tags():
    pieces = ["f", "(", "x", ")", " [", "'", "a", "'", "]", ";"]
    assert tag_tokens(*tokens_of(pieces)).tolist() == [
        "open", "word start", "close", "open", "open", "word start", "close", "close",
        "delimiter"]


def test_induction_means_the_same_continuation_seen_before():
    pieces = ["A", " cat", " sat", ".", " A", " cat", " sat", " A", " cat", " ran"]
    ids = [{"A": 0, " cat": 1, " sat": 2, ".": 3, " A": 4, " ran": 5}[p] for p in pieces]
    labels = tag_tokens(*tokens_of(pieces, ids)).tolist()
    assert labels[3] == "word start"  # " A" has not occurred before ("A" is another token)
    assert labels[4] == "word start"  # " A" -> " cat": no earlier " A"
    assert labels[5] == "induction"  # " cat" -> " sat", as after the earlier " cat"
    assert labels[7] == "induction"  # " A" -> " cat", as after the earlier " A"
    assert labels[8] == "word start"  # " cat" -> " ran": no earlier " cat" went on so
    # without texts only the induction rule can apply
    sequence, position, id_rows, _ = tokens_of(pieces, ids)
    assert [label == "induction" for label in tag_tokens(sequence, position, id_rows)] == \
        [label == "induction" for label in labels]
    assert set(tag_tokens(sequence, position, id_rows).tolist()) == {"induction", "other"}


def test_user_rules_go_first_or_replace():
    custom = {"cat": lambda context: context.text == " cat"}
    labels = tag_tokens(*tokens_of(["<s>", " The", " cat"]), rules=custom).tolist()
    assert labels == ["word start", "cat"]
    only = tag_tokens(*tokens_of(["<s>", " The", " cat"]), rules=custom, replace=True)
    assert only.tolist() == ["other", "cat"]


def fake_result(chi: np.ndarray, seed: int = 0) -> SusceptibilityResult:
    components, tokens = chi.shape
    return SusceptibilityResult(
        component_names=[f"h{i}" for i in range(components)], chi=chi,
        dataset_names=["a", "b"], dataset_chi=np.zeros((components, 2)),
        rllc=np.ones(components), llc_full=1.0, mean_phi=np.ones(components),
        anchor_loss=np.ones(components), loss_traces=np.ones((components, 1, 2)),
        full_loss_trace=np.ones((1, 2)), token_sequence=np.arange(tokens) % 2,
        token_position=np.arange(tokens) // 2,
        probe_input_ids=np.zeros((2, tokens // 2 + 1), np.int64),
        probe_attention_mask=np.ones((2, tokens // 2 + 1), np.int64),
        sequence_datasets=["a", "b"], config=SGLDConfig().to_dict(), step=seed)


def planted(seed: int, clusters: int = 5, per_cluster: int = 80, components: int = 24,
            noise: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """Tokens drawn around ``clusters`` random component profiles."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, components))
    truth = np.repeat(np.arange(clusters), per_cluster)
    vectors = centres[truth] + noise * rng.normal(size=(len(truth), components))
    return vectors.T, truth


@pytest.mark.parametrize("method, n_clusters", [("graph", None), ("graph", 5),
                                                ("kmeans", 5), ("hdbscan", None)])
def test_planted_clusters_are_recovered(method, n_clusters):
    chi, truth = planted(0)
    fit = TokenClusters(method, n_clusters).fit(fake_result(chi))
    found = fit.labels_
    assert adjusted_rand_score(truth[found >= 0], found[found >= 0]) >= 0.9
    assert (found >= 0).mean() > 0.8
    if method == "graph" and n_clusters is None:
        assert fit.n_clusters_ == 5  # the eigengap finds the planted number
    assert fit.sizes_.sum() == (found >= 0).sum()
    # each cluster's profile is its members' mean vector, and its typical tokens its members
    for k in range(fit.n_clusters_):
        assert set(fit.typical_[k]) <= set(np.flatnonzero(found == k))
        np.testing.assert_allclose(fit.chi_profiles_[k], chi[:, found == k].mean(1))


def test_pure_noise_gives_unstable_clusters():
    """Two independent noise 'estimates' of the same tokens: their clusterings agree no
    better than chance (the stability check can say "no structure")."""
    rng = np.random.default_rng(1)
    a, b = (TokenClusters("graph", 5).fit(fake_result(rng.normal(size=(24, 400)))).labels_
            for _ in range(2))
    assert abs(adjusted_rand_score(a, b)) < 0.05
    chi, _ = planted(2)
    noisy = chi + 0.2 * rng.normal(size=chi.shape)
    again = [TokenClusters("graph", 5).fit(fake_result(x)).labels_ for x in (chi, noisy)]
    assert adjusted_rand_score(*again) > 0.9


def test_compositions_count_patterns_and_datasets():
    chi, truth = planted(3, clusters=3)
    patterns = np.where(truth == 0, "induction", "word start")
    fit = TokenClusters("kmeans", 3).fit(fake_result(chi), patterns)
    assert fit.pattern_names_ == ["induction", "word start"]
    induction_cluster = np.argmax(fit.pattern_counts_[:, 0])
    assert fit.pattern_counts_[induction_cluster].tolist() == [80, 0]
    assert fit.dataset_counts_.sum() == len(truth)


def test_eigengap_of_disjoint_cliques():
    from scipy.sparse import block_diag, csr_matrix

    blocks = [np.ones((6, 6)) - np.eye(6) for _ in range(4)]
    assert eigengap_count(csr_matrix(block_diag(blocks)), 8) == 4


@pytest.mark.parametrize("options, message", [
    ({"method": "dbscan"}, "method must be one of"),
    ({"method": "kmeans"}, "needs n_clusters"),
    ({"n_clusters": 1}, r"n_clusters must be in \[2, 400\]"),
    ({"n_neighbors": 500}, "more probe tokens"),
])
def test_bad_options_are_named(options, message):
    chi, _ = planted(0)
    with pytest.raises(ValueError, match=message):
        TokenClusters(**options).fit(fake_result(chi))


def test_the_body_plan_shares_one_plane_and_tracks_clusters():
    from susc_callback.clusters.body_plan import BodyPlan, cluster_emergence

    chi, truth = planted(4, clusters=3)
    rng = np.random.default_rng(5)
    early = rng.normal(size=chi.shape)  # no structure yet
    results = [fake_result(early, 1), fake_result(0.5 * chi + 0.5 * early, 2),
               fake_result(chi, 3)]
    plan = BodyPlan("pca").fit(results, truth)
    assert plan.method_ == "pca" and plan.steps_ == [1, 2, 3]
    assert [e.shape for e in plan.embedding_] == [(240, 2)] * 3
    for k in range(3):
        np.testing.assert_allclose(plan.tracks_[k, 2], plan.embedding_[2][truth == k].mean(0))
    per_snapshot = [TokenClusters("kmeans", 3).fit(r).labels_ for r in results]
    emergence = cluster_emergence(truth, per_snapshot)
    assert emergence.shape == (3, 3)
    assert (emergence[:, 2] > 0.9).all() and (emergence[:, 0] < 0.5).all()
    with pytest.raises(ValueError, match="different probe sizes"):
        BodyPlan("pca").fit([fake_result(chi), fake_result(chi[:, :100])])


def test_the_umap_body_plan_where_installed():
    pytest.importorskip("umap")
    from susc_callback.clusters.body_plan import BodyPlan

    chi, truth = planted(6, clusters=3)
    threads = torch.get_num_threads()
    plan = BodyPlan().fit([fake_result(chi, 1), fake_result(chi, 2)], truth)
    assert torch.get_num_threads() == threads  # numba's reset is undone
    assert plan.method_ == "umap" and [e.shape for e in plan.embedding_] == [(240, 2)] * 2
    assert np.isfinite(plan.tracks_).all()


def test_agreement_of_two_estimates():
    from susc_callback.clusters.stability import cluster_agreement

    chi, _ = planted(7)
    rng = np.random.default_rng(8)
    same = cluster_agreement(fake_result(chi + 0.1 * rng.normal(size=chi.shape)),
                             fake_result(chi + 0.1 * rng.normal(size=chi.shape)))
    assert same.ari > 0.9 and (same.best_jaccard > 0.8).all() and same.sizes.sum() == 400
    noise = cluster_agreement(fake_result(rng.normal(size=chi.shape)),
                              fake_result(rng.normal(size=chi.shape)), n_clusters=5)
    assert abs(noise.ari) < 0.05 and (noise.best_jaccard < 0.5).all()
    with pytest.raises(ValueError, match="different probe tokens"):
        cluster_agreement(fake_result(chi), fake_result(chi[:, :200]))
