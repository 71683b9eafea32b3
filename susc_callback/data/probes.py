"""Probe sets: the token sequences whose per-token losses are observed."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ProbeSet:
    """Probe sequences (or samples) with a dataset label per sequence.

    Attributes:
        tensors: the model inputs, every tensor with one row per sequence. For a causal LM
            ``input_ids`` ``(sequences, positions)`` and optionally ``attention_mask``; for
            any other model whatever its ``loss_fn`` reads (e.g. ``{"x": ..., "y": ...}``).
        datasets: one label per sequence, e.g. ``"code"`` or ``"prose"``.

    With the default next-token loss, probe token ``(s, t)`` is the loss of predicting
    ``input_ids[s, t + 1]`` from ``input_ids[s, :t + 1]``. With a custom ``loss_fn``
    returning ``(B, K)`` losses, probe token ``(s, k)`` is entry ``k`` of sample ``s``.
    """

    tensors: dict[str, torch.Tensor]
    datasets: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.tensors:
            raise ValueError("ProbeSet needs at least one tensor")
        rows = {key: _rows(key, value) for key, value in self.tensors.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"ProbeSet tensors differ in their number of sequences: {rows}")
        count = next(iter(rows.values()))
        if count == 0:
            raise ValueError("ProbeSet is empty: it holds 0 sequences")
        ids = self.tensors.get("input_ids")
        if ids is not None and (ids.dim() != 2 or ids.is_floating_point()
                                or ids.dtype == torch.bool or ids.shape[1] < 2):
            raise ValueError("ProbeSet input_ids must be an integer tensor of shape "
                             f"(sequences, positions >= 2), got {_describe(ids)}")
        mask = self.tensors.get("attention_mask")
        if mask is not None and ids is not None and mask.shape != ids.shape:
            raise ValueError(f"ProbeSet attention_mask has shape {tuple(mask.shape)}, "
                             f"input_ids has {tuple(ids.shape)}")
        if len(self.datasets) != count:
            raise ValueError(f"ProbeSet has {count} sequences but {len(self.datasets)} "
                             "dataset labels")

    @classmethod
    def from_tensors(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     datasets: str | Sequence[str] = "probe") -> ProbeSet:
        """Build from token ids; ``datasets`` is one label for all or one per sequence."""
        ids = torch.as_tensor(input_ids).cpu()
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got {_describe(ids)} "
                             "(converting would truncate or reinterpret them)")
        tensors = {"input_ids": ids.long()}
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask).cpu()
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("attention_mask must hold only 0 and 1, got values "
                                 f"{sorted(set(mask.flatten().tolist()))[:5]}")
            tensors["attention_mask"] = mask.long()
        return cls.from_batch(tensors, datasets)

    @classmethod
    def from_batch(cls, tensors: Mapping[str, torch.Tensor],
                   datasets: str | Sequence[str] = "probe") -> ProbeSet:
        """Build from any dict of tensors with one row per probe sequence or sample."""
        tensors = {key: torch.as_tensor(value).cpu() for key, value in tensors.items()}
        count = _rows(*next(iter(tensors.items()))) if tensors else 0
        if isinstance(datasets, str):
            datasets = [datasets] * count
        return cls(tensors, tuple(str(d) for d in datasets))

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer, datasets: str | Sequence[str] = "probe",
                   max_length: int | None = None) -> ProbeSet:
        """Tokenize ``texts`` with a HF tokenizer: right-padded with id 0 and masked,
        truncated to ``max_length``. The tokenizer is not modified."""
        if isinstance(texts, str):
            raise TypeError("from_texts expects a list of texts, got a single string")
        encoded = [tokenizer(text, truncation=max_length is not None,
                             max_length=max_length)["input_ids"] for text in texts]
        width = max((len(ids) for ids in encoded), default=0)
        input_ids = torch.zeros(len(encoded), width, dtype=torch.long)
        attention_mask = torch.zeros(len(encoded), width, dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
        return cls.from_tensors(input_ids, attention_mask, datasets)

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, tokenizer: object | None = None, *,
                   max_length: int | None = None, what: str = "probe") -> ProbeSet:
        """Read sequences from a JSONL file: one ``{"text": ...}`` or ``{"input_ids":
        [...]}`` object per line, with an optional ``"dataset"`` label (default
        ``"probe"``). Text needs ``tokenizer``; ids are right-padded with 0 and masked;
        both are truncated to ``max_length``. ``what`` names the file in errors."""
        rows = _jsonl_rows(Path(path), what)
        datasets = [str(row.get("dataset", "probe")) for row in rows]
        if all("text" in row for row in rows):
            if tokenizer is None:
                raise ValueError(f"{what} {path} holds text: pass a tokenizer (--tokenizer, "
                                 "or save the tokenizer with the checkpoints)")
            return cls.from_texts([row["text"] for row in rows], tokenizer, datasets,
                                  max_length=max_length)
        if not all("input_ids" in row for row in rows):
            raise ValueError(f"{path}: mix of 'text' and 'input_ids' rows; use one kind")
        length = max(len(row["input_ids"]) for row in rows)
        if max_length:
            length = min(length, max_length)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens = torch.as_tensor(row["input_ids"][:length], dtype=torch.long)
            ids[i, :len(tokens)], mask[i, :len(tokens)] = tokens, 1
        return cls.from_tensors(ids, mask, datasets)

    @property
    def input_ids(self) -> torch.Tensor | None:
        return self.tensors.get("input_ids")

    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self.tensors.get("attention_mask")

    @property
    def dataset_names(self) -> list[str]:
        """Distinct dataset labels in order of first appearance."""
        return list(dict.fromkeys(self.datasets))

    def __len__(self) -> int:
        return len(self.datasets)

    def batch(self, start: int, stop: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Sequences ``start:stop`` as a model input dict on ``device``."""
        return {key: value[start:stop].to(device) for key, value in self.tensors.items()}


def _jsonl_rows(path: Path, what: str) -> list[dict]:
    """The objects of a JSONL file, each with exactly one of ``text`` and ``input_ids``."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} not found")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from error
        if not isinstance(row, dict) or ("text" in row) == ("input_ids" in row):
            raise ValueError(f"{path}:{number}: expected an object with either 'text' or "
                             "'input_ids'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{what} file {path} holds no sequences")
    return rows


def _rows(key: str, value: object) -> int:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        raise ValueError(f"ProbeSet tensor {key!r} must be a tensor with one row per sequence, "
                         f"got {_describe(value)}")
    return value.shape[0]


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def probe_token_texts(probe: ProbeSet, tokenizer: object | None) -> list[list[str]] | None:
    """The decoded text of every probe token ``[sequence][position]`` (None without a
    tokenizer or token ids); stored with results so reports need no tokenizer."""
    ids = probe.input_ids
    if tokenizer is None or ids is None:
        return None
    return decode_each(ids.tolist(), tokenizer)


def decode_each(rows: Sequence[Sequence[int]], tokenizer: object) -> list[list[str]]:
    """Every token id decoded on its own: ``[row][position]`` text."""
    cache: dict[int, str] = {}
    return [[cache.setdefault(int(t), token_text(tokenizer, int(t))) for t in row]
            for row in rows]


def token_text(tokenizer: object, token_id: int) -> str:
    """The text of one token. A byte-level token that is only part of a UTF-8 character
    decodes to U+FFFD; it is shown by its bytes instead (``<e2 80>``), so that different
    tokens stay distinguishable and no replacement characters reach a page."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text
    raw = _byte_level_bytes(tokenizer, token_id)
    return f"<{raw.hex(' ')}>" if raw is not None else text


def _byte_level_bytes(tokenizer: object, token_id: int) -> bytes | None:
    """The bytes of a byte-level BPE token (GPT-2's byte-to-character table), if it is one."""
    try:
        from transformers.convert_slow_tokenizer import bytes_to_unicode
        piece = tokenizer.convert_ids_to_tokens(token_id)
    except (ImportError, AttributeError, TypeError):
        return None
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    if not isinstance(piece, str) or any(char not in byte_of for char in piece):
        return None
    return bytes(byte_of[char] for char in piece)
