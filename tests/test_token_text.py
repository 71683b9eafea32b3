"""Token text that reaches tables, TSV files and pages is printable and unambiguous."""

from __future__ import annotations

from transformers.convert_slow_tokenizer import bytes_to_unicode

from susc_callback.analysis.attribution import visible
from susc_callback.data.probes import decode_each, token_text


class ByteLevelStub:
    """Token 0 is the bytes e2 80 (the start of a 3-byte UTF-8 character), token 1 'a'."""

    pieces = {0: "".join(bytes_to_unicode()[b] for b in b"\xe2\x80"), 1: "a"}

    def decode(self, ids):
        return b"".join(b"\xe2\x80" if i == 0 else b"a" for i in ids).decode(
            "utf-8", errors="replace")

    def convert_ids_to_tokens(self, token_id):
        return self.pieces[token_id]


def test_partial_utf8_tokens_are_shown_by_their_bytes():
    tokenizer = ByteLevelStub()
    assert tokenizer.decode([0]) == "\ufffd"  # what a plain decode would show
    assert token_text(tokenizer, 0) == "<e2 80>" and token_text(tokenizer, 1) == "a"
    assert decode_each([[0, 1, 0]], tokenizer) == [["<e2 80>", "a", "<e2 80>"]]


def test_control_characters_are_escaped():
    assert visible("a\x00b\\c\nd\x7f\te") == "a\\x00b\\\\c\\nd\\x7f\\te"
    assert visible("naïve — ok") == "naïve — ok"


def test_no_control_characters_in_the_report(gpt2, probe, sampling_ids, config, tmp_path):
    from conftest import estimate

    from susc_callback.logging.report import write_report

    result = estimate(gpt2, probe, sampling_ids, config, step=1)
    ids = result.probe_input_ids
    result.extra["probe_tokens"] = [["\x00" if t % 2 else "x\x07" for t in row] for row in ids]
    page = write_report([result], tmp_path).read_text(encoding="utf-8")
    assert "\x00" not in page and "\x07" not in page and "\\x00" in page
