"""The ``susc`` command line on checkpoint series made in the test."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONTEXT, VOCAB, tiny_gpt2

import susc_callback.cli as cli
import susc_callback.cli.analyze as analyze_command
from susc_callback import SusceptibilityResult, standardize
from susc_callback.store.run import RunStore, load_results

SGLD = ["--num-chains", "1", "--num-draws", "3", "--batch-size", "4",
        "--observable-sequences", "4", "--eval-batch-size", "8", "--n-beta", "10",
        "--gamma", "100", "--no-progress"]


def write_jsonl(path: Path, ids: torch.Tensor, datasets: list[str]) -> Path:
    path.write_text("\n".join(json.dumps({"input_ids": row, "dataset": d})
                              for row, d in zip(ids.tolist(), datasets)))
    return path


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder with three checkpoints (different weights) and probe / sampling files."""
    run_dir = tmp_path / "run"
    for step, seed in ((10, 0), (20, 1), (30, 2)):
        tiny_gpt2(seed).save_pretrained(run_dir / f"checkpoint-{step}")
    generator = torch.Generator().manual_seed(7)
    write_jsonl(tmp_path / "probe.jsonl", torch.randint(0, VOCAB, (4, CONTEXT),
                generator=generator), ["a", "a", "b", "b"])
    write_jsonl(tmp_path / "train.jsonl", torch.randint(0, VOCAB, (16, CONTEXT),
                generator=generator), ["train"] * 16)
    return run_dir


def analyze(run_dir: Path, *extra: str) -> int:
    root = run_dir.parent
    return cli.main(["analyze", str(run_dir), "--probe", str(root / "probe.jsonl"),
                     "--sampling-data", str(root / "train.jsonl"), *SGLD, *extra])


def test_interrupted_analysis_resumes_to_the_uninterrupted_result(run, tmp_path, monkeypatch,
                                                                   capsys):
    import shutil

    reference = tmp_path / "reference" / "run"
    shutil.copytree(run, reference)
    shutil.copy(tmp_path / "probe.jsonl", reference.parent)
    shutil.copy(tmp_path / "train.jsonl", reference.parent)
    assert analyze(reference) == 0

    calls = []
    load = analyze_command.load_model

    def interrupted_after_one(path, tokenizer):
        calls.append(int(path.name.split("-")[1]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return load(path, tokenizer)

    monkeypatch.setattr(analyze_command, "load_model", interrupted_after_one)
    capsys.readouterr()
    assert analyze(run) == 130  # Ctrl-C: one line, no traceback
    assert capsys.readouterr().err.strip().splitlines() == [
        "susc analyze: interrupted (every finished checkpoint is saved: run the same command "
        "again to continue)"]
    assert sorted(RunStore.of_run(run).saved_steps()) == [10]

    calls.clear()
    monkeypatch.setattr(analyze_command, "load_model", lambda path, tokenizer: (
        calls.append(int(path.name.split("-")[1])), load(path, tokenizer))[1])
    assert analyze(run) == 0
    assert calls == [20, 30]  # the finished checkpoint is skipped
    for step in (10, 20, 30):
        a = SusceptibilityResult.load(run / "susceptibility" / f"step-{step}")
        b = SusceptibilityResult.load(reference / "susceptibility" / f"step-{step}")
        assert np.array_equal(a.chi, b.chi) and a.step == step
    calls.clear()
    assert analyze(run) == 0 and calls == []  # idempotent
    assert any((run / "runs" / "susceptibility").glob("events.out.tfevents.*"))


def test_analysis_refuses_to_mix_settings_unless_forced(run, capsys):
    assert analyze(run, "--checkpoints", "checkpoint-10") == 0
    assert analyze(run, "--checkpoints", "checkpoint-10", "--step-size", "2e-3") == 2
    error = capsys.readouterr().err
    assert "step_size=0.001 (now 0.002)" in error and "--out DIR" in error
    assert analyze(run, "--checkpoints", "checkpoint-10", "--step-size", "2e-3", "--force") == 0


def test_run_only_settings_may_change_between_runs(run, capsys):
    """workers, batch_chains, ... say how an estimate is run, not what it is: a finished
    checkpoint is kept when only they change (every SGLDConfig field is a flag)."""
    assert analyze(run, "--checkpoints", "checkpoint-10", "--workers", "1") == 0
    saved = SusceptibilityResult.load(run / "susceptibility" / "step-10").config
    assert saved["workers"] == 1 and saved["on_divergence"] == "mark"
    capsys.readouterr()
    assert analyze(run, "--checkpoints", "checkpoint-10", "--workers", "auto",
                   "--batch-chains", "off", "--max-batched-chains", "2") == 0
    assert "step 10: done already" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        analyze(run, "--workers", "many")
    assert "must be an integer or one of auto, got 'many'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        analyze(run, "--anchor", "middle")
    assert "invalid choice: 'middle'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        analyze(run, "--unbiased-observable", "maybe")
    assert "must be true or false, got 'maybe'" in capsys.readouterr().err


def test_boolean_and_auto_flags(run):
    """A bool field takes true/false; steps_between_draws takes an integer or auto."""
    assert analyze(run, "--checkpoints", "checkpoint-10", "--unbiased-observable", "false",
                   "--steps-between-draws", "auto") == 0
    saved = SusceptibilityResult.load(run / "susceptibility" / "step-10")
    assert saved.config["unbiased_observable"] is False
    assert saved.config["steps_between_draws"] == "auto"
    assert saved.extra["draw_spacing"]["steps_between_draws"] >= 1


class Spans(HTMLParser):
    """Collects (token index, value, background) of the token view's inline colours."""

    def __init__(self) -> None:
        super().__init__()
        self.spans = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "data-token" in attrs:
            rgb = tuple(int(v) for v in re.findall(r"\d+", attrs["style"]))
            self.spans.append((int(attrs["data-token"]), float(attrs["data-value"]), rgb))


def test_report_token_colours_follow_the_saved_numbers(run, tmp_path):
    assert analyze(run) == 0
    assert cli.main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.html").read_text()
    # self-contained: no URL to load (a bare "http" can occur inside base64 image data)
    assert "structural-inference" in page and re.search(
        r"https?://|(src|href)=[\"']//", page) is None
    for name in ("heatmap", "pc_loadings", "explained_variance", "tokens_pc1_pc2_by_step",
                 "llc"):
        assert (tmp_path / "report" / "figures" / f"{name}.png").is_file()
    results = [SusceptibilityResult.load(run / "susceptibility" / f"step-{s}")
               for s in (10, 20, 30)]
    last = results[-1]
    # The inline colours: the last snapshot, first component, default quantity.
    chi = last.chi - last.chi.mean(axis=1, keepdims=True)  # structural-inference
    u = (last.chi - last.chi_covariance) / last.mean_phi[:, None]
    layers = [name[:2] for name in last.component_names]  # l0h*, l1h*
    relative = np.stack([last.chi[c] - last.mean_phi[c] * u[[i for i, n in enumerate(layers)
                                                              if n == layers[c]]].mean(0)
                         for c in range(len(layers))])
    expected = relative - relative.mean(axis=1, keepdims=True)
    assert np.allclose(standardize(last.chi).T, chi)
    parser = Spans()
    parser.feed(page)
    assert len(parser.spans) == expected.shape[1]
    strongest = np.abs(expected[0]).max()
    for token, value, rgb in parser.spans:
        assert value == pytest.approx(expected[0, token], rel=1e-5, abs=1e-12)
        visible = abs(value) > 0.05 * strongest  # fainter shades round to near-white
        if visible and value > 0:
            assert rgb[1] > rgb[0] and rgb[1] > rgb[2]  # green
        elif visible and value < 0:
            assert rgb[0] > rgb[1] and rgb[0] > rgb[2]  # red
        if abs(value) == pytest.approx(strongest, rel=1e-5):
            assert rgb in ((26, 152, 80), (215, 48, 39))  # full colour at the largest value
        whiteness = min(rgb)
        assert whiteness == pytest.approx(255 - abs(value) / strongest * (255 - (26 if value > 0
                                          else 39)), abs=1.0)
    # Every snapshot and quantity is embedded, each row within 1 % of its largest value.
    data = json.loads(re.search(r'<script type="application/json" id="token-data">(.*?)'
                                r"</script>", page, re.S).group(1))
    assert data["steps"] == ["10", "20", "30"] and data["default"] == "relative-to-layer"
    for result in results:
        wanted = {"chi": result.chi - result.chi.mean(axis=1, keepdims=True),
                  "covariance": result.chi_covariance
                  - result.chi_covariance.mean(axis=1, keepdims=True)}
        for quantity, values in wanted.items():
            entry = data["values"][f"{result.step}|{quantity}"]
            decoded = np.array(entry["rows"]) / 100 * np.array(entry["scale"])[:, None]
            assert np.abs(decoded - values).max() <= 0.0051 * np.abs(values).max()


def test_compare_a_result_with_itself(run, capsys):
    assert analyze(run, "--checkpoints", "checkpoint-10") == 0
    result = str(run / "susceptibility" / "step-10")
    capsys.readouterr()
    assert cli.main(["compare", result, result, "--figure", str(run / "stability.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    values = [float(line.split()[1]) for line in lines[1:5]]
    assert len(values) == 4 and all(v == pytest.approx(1.0) for v in values)
    assert lines[6].startswith("token clusters: adjusted Rand index 1.000")
    assert (run / "stability.png").is_file()


def test_clear_errors(run, tmp_path, capsys):
    assert cli.main(["analyze", str(tmp_path), "--probe", "p", "--sampling-data", "s"]) == 2
    assert "no checkpoints found: looked for checkpoint-<step> folders in" in \
        capsys.readouterr().err

    broken = run / "checkpoint-15"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert analyze(run) == 2
    assert "checkpoint-15 is unreadable" in capsys.readouterr().err
    assert analyze(run, "--keep-going") == 1
    assert sorted(RunStore.of_run(run).saved_steps()) == [10, 20, 30]
    assert "checkpoint-15" in capsys.readouterr().err


def char_tokenizer(size: int):
    """A character-level tokenizer of ``size`` tokens, built locally (no hub)."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = string.ascii_letters + " ():=+.,1-_" + "".join(chr(192 + i) for i in range(64))
    alphabet = list(characters[:size - 1])
    vocab = {"<unk>": 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                   pad_token="<unk>")


def test_text_probe_with_the_run_tokenizer(run, tmp_path, capsys):
    char_tokenizer(VOCAB).save_pretrained(run)
    texts = [("def f(x): return x", "code"), ("The cat sat on it.", "prose"),
             ("if a: b = c + 1", "code"), ("A dog ran far away", "prose")]
    (tmp_path / "probe.jsonl").write_text("\n".join(
        json.dumps({"text": t, "dataset": d}) for t, d in texts))
    assert analyze(run, "--checkpoints", "checkpoint-10", "--max-length", str(CONTEXT)) == 0
    result = SusceptibilityResult.load(run / "susceptibility" / "step-10")
    assert result.dataset_names == ["code", "prose"]
    assert "".join(result.extra["probe_tokens"][0]) == "def f(x): return x"[:CONTEXT]
    assert cli.main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.html").read_text()
    assert "def f(x): return" in re.sub(r"<[^>]+>", "", page)  # the text, token by token

    char_tokenizer(VOCAB + 30).save_pretrained(run)  # more tokens than the model knows
    capsys.readouterr()
    assert analyze(run, "--checkpoints", "checkpoint-20", "--max-length", str(CONTEXT)) == 2
    assert "mismatched tokenizer" in capsys.readouterr().err


def test_analysis_refuses_other_components_in_the_series(run, capsys):
    assert analyze(run, "--checkpoints", "checkpoint-10") == 0
    assert analyze(run, "--checkpoints", "checkpoint-10", "--components", "mlp") == 2
    assert "holds components 'heads', not 'mlp'" in capsys.readouterr().err


def test_report_survives_components_failing_at_different_steps(tmp_path):
    """No component is finite at every step: the common-basis figures are left out, the
    rest of the report is written."""
    from susc_callback.logging.report import write_report

    results = []
    for step, broken in ((1, None), (2, 2), (3, 0)):
        rng = np.random.default_rng(step)
        chi = rng.normal(size=(3, 8))
        failed = {}
        if broken is not None:
            chi[broken] = np.nan
            failed = {f"h{broken}": "diverged"}
        results.append(SusceptibilityResult(
            component_names=["h0", "h1", "h2"], chi=chi, dataset_names=["a"],
            dataset_chi=chi.mean(axis=1, keepdims=True), rllc=np.ones(3),
            llc_full=1.0, mean_phi=np.ones(3), anchor_loss=np.ones(3),
            loss_traces=np.ones((3, 1, 1)), full_loss_trace=np.ones((1, 1)),
            token_sequence=np.zeros(8, np.int64), token_position=np.arange(8),
            probe_input_ids=np.arange(9)[None], probe_attention_mask=np.ones((1, 9), np.int64),
            sequence_datasets=["a"], config={}, step=step, failed=failed))
    page = write_report(results, tmp_path / "report").read_text()
    assert "explained_variance" in page and "tokens_pc1_pc2" not in page


def test_damaged_results_are_named_and_skipped_on_request(run, tmp_path, capsys):
    assert analyze(run) == 0
    damaged = run / "susceptibility" / "step-20"
    (damaged / "arrays.safetensors").write_bytes(b"garbage")
    capsys.readouterr()
    assert cli.main(["report", str(run), "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(damaged) in error and "checksum" in error
    assert cli.main(["compare", str(damaged), str(run / "susceptibility" / "step-10")]) == 2
    assert str(damaged) in capsys.readouterr().err

    assert cli.main(["report", str(run), "--out", str(tmp_path / "r"), "--keep-going"]) == 0
    assert "step 20: skipped" in capsys.readouterr().err
    skipped = []
    kept = load_results(run, lambda step, error: skipped.append(step))
    assert [r.step for r in kept] == [10, 30] and skipped == [20]

    assert analyze(run) == 0  # the store is a cache: a damaged step is computed again
    assert "step 20: saved result is damaged" in capsys.readouterr().err
    assert len(RunStore.of_run(run).load_all()) == 3


def test_a_mixed_series_is_refused_before_anything_is_computed(run, tmp_path, capsys,
                                                              monkeypatch):
    assert analyze(run, "--checkpoints", "checkpoint-10") == 0
    calls = []
    monkeypatch.setattr(analyze_command, "estimate_chains", lambda *a, **k: calls.append(1))
    capsys.readouterr()
    assert analyze(run, "--num-draws", "5") == 2  # new checkpoints, other settings
    assert calls == [] and list(RunStore.of_run(run).saved_steps()) == [10]
    assert "num_draws=3 (now 5)" in capsys.readouterr().err
    assert analyze(run, "--checkpoints", "checkpoint-20", "--num-draws", "5", "--force") == 2
    assert calls == []  # --force recomputes checkpoint-20 only: step 10 would stay mixed
    monkeypatch.undo()

    out = tmp_path / "other-series"
    assert analyze(run, "--num-draws", "5", "--out", str(out)) == 0  # a new series
    assert sorted(RunStore.of_run(out).saved_steps()) == [10, 20, 30]
    assert any((out / "runs" / "susceptibility").glob("events.out.tfevents.*"))
    assert list(RunStore.of_run(run).saved_steps()) == [10]


def test_report_refuses_a_mixed_series(run, tmp_path, capsys):
    assert analyze(run, "--checkpoints", "checkpoint-10") == 0
    other = tmp_path / "other"
    assert analyze(run, "--checkpoints", "checkpoint-20", "--num-draws", "5", "--out",
                   str(other)) == 0
    shutil.copytree(other / "susceptibility" / "step-20", run / "susceptibility" / "step-20")
    capsys.readouterr()
    assert cli.main(["report", str(run), "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err
    assert "step 20, against step 10" in error and "num_draws=5 (now 3)" in error


def test_context_hint_names_the_flag(run, tmp_path, capsys):
    long_probe = write_jsonl(tmp_path / "long.jsonl",
                             torch.zeros(2, CONTEXT + 5, dtype=torch.long), ["a", "b"])
    code = cli.main(["analyze", str(run), "--probe", str(long_probe), "--sampling-data",
                     str(tmp_path / "train.jsonl"), *SGLD])
    error = capsys.readouterr().err
    assert code == 2 and "more than the model's context" in error
    assert f"--max-length {CONTEXT} in susc analyze" in error
