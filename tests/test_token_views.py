"""The token view's quantities against their definitions, on matrices built from known
parts."""

from __future__ import annotations

import numpy as np
import pytest
from test_analysis import _result

from susc_callback.analysis.token_views import token_quantity
from susc_callback.components.architectures import group_by_layer, layer_of


def test_layers_of_preset_names():
    assert [layer_of(n) for n in ("l0h3", "l12h0", "l1mlp", "l1", "embed", "mine")] == [
        "l0h", "l12h", "l1mlp", "l1", "", ""]
    assert group_by_layer(["l0h0", "embed", "l0h1", "l1mlp", "mine"]) == {
        "l0h": [0, 2], "": [1, 4], "l1mlp": [3]}


@pytest.fixture
def parts():
    """chi = covariance + E[phi] * u, with u = shared profile of the layer + own part."""
    rng = np.random.default_rng(0)
    names = ["l0h0", "l0h1", "l0h2", "l1h0", "l1h1", "l1mlp"]
    tokens = 30
    shared = {"l0h": rng.normal(size=tokens) * 3, "l1h": rng.normal(size=tokens) * 3,
              "l1mlp": rng.normal(size=tokens)}
    own = rng.normal(size=(len(names), tokens)) * 0.1
    covariance = rng.normal(size=(len(names), tokens)) * 0.01
    mean_phi = np.array([0.5, 0.7, 0.2, 0.05, 0.08, 0.3])
    u = np.stack([shared[layer_of(n)] for n in names]) + own
    result = _result(covariance + mean_phi[:, None] * u)
    result.component_names, result.chi_covariance, result.mean_phi = names, covariance, mean_phi
    return result, names, own, covariance, mean_phi


def test_relative_to_layer_keeps_what_a_component_does_differently(parts):
    result, names, own, covariance, mean_phi = parts
    values = token_quantity(result, "relative-to-layer", "none")
    for rows in ([0, 1, 2], [3, 4]):  # the heads of layer 0, of layer 1
        specific = own[rows] - own[rows].mean(axis=0)
        expected = covariance[rows] + mean_phi[rows, None] * specific
        np.testing.assert_allclose(values[rows], expected, atol=1e-12)
    np.testing.assert_allclose(values[5], covariance[5], atol=1e-12)  # alone in its group
    centred = token_quantity(result, "relative-to-layer")  # structural-inference
    np.testing.assert_allclose(centred, values - values.mean(axis=1, keepdims=True))


def test_chi_and_covariance_views(parts):
    result, *_ = parts
    np.testing.assert_allclose(token_quantity(result, "chi", "none"), result.chi)
    np.testing.assert_allclose(token_quantity(result, "covariance", "none"),
                               result.chi_covariance)


def test_failed_rows_and_old_results(parts):
    result, *_ = parts
    result.chi[1] = np.nan
    values = token_quantity(result, "relative-to-layer", "none")
    assert np.isnan(values[1]).all() and np.isfinite(np.delete(values, 1, axis=0)).all()
    result.chi_covariance = None
    with pytest.raises(ValueError, match="results saved before format 2"):
        token_quantity(result, "relative-to-layer")
    with pytest.raises(ValueError, match="Invalid token quantity 'raw'"):
        token_quantity(result, "raw")
