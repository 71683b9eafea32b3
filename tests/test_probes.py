"""ProbeSet.from_jsonl: the probe and sampling files of `susc analyze`."""

from __future__ import annotations

import json

import pytest
import torch

from susc_callback import ProbeSet


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))
    return path


def test_token_ids_are_padded_masked_and_truncated(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"input_ids": [5, 6, 7], "dataset": "a"}, "",
                                         {"input_ids": [8, 9]}])
    probe = ProbeSet.from_jsonl(path)
    assert probe.datasets == ("a", "probe")
    assert torch.equal(probe.input_ids, torch.tensor([[5, 6, 7], [8, 9, 0]]))
    assert torch.equal(probe.attention_mask, torch.tensor([[1, 1, 1], [1, 1, 0]]))
    short = ProbeSet.from_jsonl(path, max_length=2)
    assert torch.equal(short.input_ids, torch.tensor([[5, 6], [8, 9]]))


def test_text_is_tokenized(tmp_path):
    class Letters:  # a tokenizer of the shape from_texts needs
        def __call__(self, text, truncation=False, max_length=None):
            ids = [ord(c) - 96 for c in text]
            return {"input_ids": ids[:max_length] if truncation else ids}

    path = _write(tmp_path / "t.jsonl", [{"text": "abc", "dataset": "x"},
                                         {"text": "de", "dataset": "y"}])
    probe = ProbeSet.from_jsonl(path, Letters())
    assert probe.dataset_names == ["x", "y"]
    assert torch.equal(probe.input_ids, torch.tensor([[1, 2, 3], [4, 5, 0]]))


@pytest.mark.parametrize(("rows", "message"), [
    (['{"input_ids": [1, 2]}', "{not json"], r"b\.jsonl:2: not JSON"),
    ([{"input_ids": [1, 2], "text": "ab"}], r"b\.jsonl:1: expected an object with either"),
    ([[1, 2]], r"b\.jsonl:1: expected an object"),
    ([{"input_ids": [1, 2]}, {"text": "ab"}], "mix of 'text' and 'input_ids' rows"),
    ([{"text": "ab"}], "holds text: pass a tokenizer"),
    (["", "  "], "probe file .* holds no sequences"),
])
def test_bad_files_are_named_with_the_line(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        ProbeSet.from_jsonl(_write(tmp_path / "b.jsonl", rows))


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="sampling data file .*nothing.jsonl not found"):
        ProbeSet.from_jsonl(tmp_path / "nothing.jsonl", what="sampling data")
