"""Damaged or inconsistent result folders are refused with one error that names the folder
and what is wrong, never read as other numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import estimate

from susc_callback import ResultFileError, SusceptibilityResult
from susc_callback.store.files import (
    ARRAYS_FILE,
    CHECKSUM_KEY,
    META_FILE,
    read_folder,
    write_folder,
)


@pytest.fixture
def saved(gpt2, probe, sampling_ids, config, tmp_path):
    result = estimate(gpt2, probe, sampling_ids, config, step=7)
    return result.save(tmp_path / "step-7")


def _rewrite(folder, edit_arrays=None, edit_meta=None):
    """Rewrite ``folder`` consistently (a fresh checksum), with edited contents: what a
    script editing a result by hand would leave."""
    arrays, meta = read_folder(folder)
    if edit_arrays:
        edit_arrays(arrays)
    if edit_meta:
        edit_meta(meta)
    write_folder(folder, arrays, meta)


@pytest.mark.parametrize("damage, problem", [
    (lambda data: b"", "0 bytes. does not match the checksum"),
    (lambda data: data[:len(data) // 2], "does not match the checksum"),
    (lambda data: bytes(np.random.default_rng(0).integers(0, 256, len(data), np.uint8)),
     "does not match the checksum"),
    (lambda data: data[:-9] + bytes([data[-9] ^ 1]) + data[-8:], "does not match the checksum"),
])
def test_damaged_arrays_are_refused(saved, damage, problem):
    path = saved / ARRAYS_FILE
    path.write_bytes(damage(path.read_bytes()))
    assert_refused(saved, problem)


def assert_refused(folder, problem):
    with pytest.raises(ResultFileError, match=problem) as caught:
        SusceptibilityResult.load(folder)
    assert str(folder) in str(caught.value)


def test_damaged_arrays_without_checksum_are_refused(saved):
    meta = json.loads((saved / META_FILE).read_text())
    del meta[CHECKSUM_KEY]
    (saved / META_FILE).write_text(json.dumps(meta))
    SusceptibilityResult.load(saved)  # a folder from before checksums: read as it is
    (saved / ARRAYS_FILE).write_bytes((saved / ARRAYS_FILE).read_bytes()[:100])
    with pytest.raises(ResultFileError, match="not a readable safetensors file"):
        SusceptibilityResult.load(saved)


@pytest.mark.parametrize("damage, problem", [
    (lambda text: text[:len(text) // 2], "meta.json is not valid JSON"),
    (lambda text: "", "meta.json is not valid JSON"),
    (lambda text: "[1, 2]", "holds a list, not an object"),
    (lambda text: text.replace('"format_version": 4', '"format_version": 9'),
     "unsupported result format 9"),
])
def test_damaged_metadata_is_refused(saved, damage, problem):
    path = saved / META_FILE
    path.write_text(damage(path.read_text()))
    assert_refused(saved, problem)


@pytest.mark.parametrize("edit_arrays, edit_meta, problem", [
    (None, lambda m: m.update(component_names=m["component_names"][:3]),
     "chi has shape .* make it"),
    (lambda a: a.pop("chi"), None, r"lacks \['chi'\]"),
    (None, lambda m: m.pop("dataset_names"), r"lacks \['dataset_names'\]"),
    (None, lambda m: m.update(surprise=1), r"unexpected \['surprise'\]"),
    (lambda a: a.update(rllc=a["rllc"][:-1]), None, "rllc has shape"),
    (lambda a: a.update(loss_traces=a["loss_traces"][:, 0]), None,
     "loss_traces has shape .* must be .components, chains, draws."),
    (lambda a: (a.pop("chi_covariance"), a.update(loss_traces=a["loss_traces"][:, 0])),
     None, "loss_traces has shape"),
    (lambda a: a.update(token_sequence=a["token_sequence"] + 100), None,
     "token_sequence points outside"),
    (lambda a: a.update(token_position=a["token_position"] + 100), None,
     "token_position points outside"),
    (None, lambda m: m.update(sequence_datasets=["x"] * len(m["sequence_datasets"])),
     "sequence_datasets name datasets missing"),
    (None, lambda m: m.update(failed={"nobody": "x"}), "failed names components"),
    (None, lambda m: m.update(step="7"), "step must be an integer"),
    (None, lambda m: m.update(component_names=["a"] * len(m["component_names"])),
     "repeat a name"),
])
def test_inconsistent_results_are_refused(saved, edit_arrays, edit_meta, problem):
    _rewrite(saved, edit_arrays, edit_meta)
    assert_refused(saved, problem)


def test_an_intact_result_loads_exactly(saved):
    _rewrite(saved)  # the checksum of a rewrite is the checksum of the same bytes
    first, again = SusceptibilityResult.load(saved), SusceptibilityResult.load(saved)
    assert np.array_equal(first.chi, again.chi)


def test_a_format_1_result_loads_without_the_covariance_part(saved):
    def to_format_1(arrays):
        arrays.pop("chi_covariance")
    _rewrite(saved, to_format_1, lambda meta: meta.update(format_version=1))
    loaded = SusceptibilityResult.load(saved)
    assert loaded.chi_covariance is None and loaded.subset(loaded.component_names[:2])
    loaded.save(saved)  # and saves again without it
    assert SusceptibilityResult.load(saved).chi_covariance is None
