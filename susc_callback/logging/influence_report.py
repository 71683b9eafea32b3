"""The influence section of the HTML report, and a page of its own (``susc influence``).

For each query sequence (of the latest checkpoint): its text, the training sequences that
most raise and most lower its loss with their text and score, and, over a series, a figure
of those sequences' influence at every checkpoint with the overlap of consecutive
checkpoints' lists (:mod:`susc_callback.influence.views`).
"""

from __future__ import annotations

import html
from pathlib import Path

from matplotlib.figure import Figure

from susc_callback.data.probes import decode_each
from susc_callback.influence.result import InfluenceResult
from susc_callback.influence.views import (
    InfluenceDynamics,
    influence_dynamics,
    influential_sequences,
)
from susc_callback.logging.page import PAGE, figure_section

SHOWN_CHARACTERS = 240  # of a training sequence's text in the tables


def sequence_texts(ids, mask, tokenizer: object | None) -> list[str]:
    """Each sequence's text: decoded with ``tokenizer``, else its token ids."""
    if ids is None:
        return []
    rows = [row if mask is None else row[mask[i].astype(bool)] for i, row in enumerate(ids)]
    if tokenizer is None:
        return [" ".join(f"<{int(t)}>" for t in row) for row in rows]
    return ["".join(tokens) for tokens in decode_each(rows, tokenizer)]


def texts_of(result: InfluenceResult, tokenizer: object | None) -> tuple[list[str], list[str]]:
    """Training and query texts: stored in the result (``extra``), else decoded."""
    stored = result.extra.get("train_texts"), result.extra.get("query_texts")
    if all(stored):
        return stored
    return (sequence_texts(result.train_input_ids, result.train_attention_mask, tokenizer),
            sequence_texts(result.query_input_ids, result.query_attention_mask, tokenizer))


def influence_section(results: list[InfluenceResult], out_dir: str | Path, *,
                      tokenizer: object | None = None, count: int = 5,
                      posterior: str = "full", max_queries: int = 16) -> str:
    """HTML for the influence results of one series (figures written to
    ``out_dir/figures``)."""
    results = sorted(results, key=lambda r: -1 if r.step is None else r.step)
    latest = results[-1]
    train_texts, query_texts = texts_of(latest, tokenizer)
    queries = range(min(len(latest.query_datasets), max_queries))
    parts = [f"<h2>Influence (Bayesian influence functions) at step {latest.step}</h2>"
             f"<p>{len(latest.train_index)} training sequences, {len(latest.query_datasets)} "
             f"query sequences, posterior <b>{html.escape(posterior)}</b>, "
             f"{int(latest.draws[latest.posterior_names.index(posterior)])} draws. A score is "
             "<code>-Cov(l_train, l_query)</code> of the sequences' mean token losses: "
             "positive, up-weighting the training sequence raises the query's loss; "
             "negative, it lowers it.</p>"]
    for query in queries:
        found = influential_sequences(latest, query, count, posterior)
        parts.append(f"<details{' open' if query == 0 else ''}><summary>query {query} "
                     f"({html.escape(latest.query_datasets[query])}): <code>"
                     f"{html.escape(_short(query_texts, query))}</code></summary>"
                     + _table(found.raising, found.lowering, latest, train_texts))
        if len(results) > 1:
            dynamics = influence_dynamics(results, query, count, posterior)
            parts.append(figure_section(
                f"influence_query{query}", "Influence on this query of the training "
                f"sequences that were among the {count} strongest at some checkpoint; "
                "overlap of consecutive checkpoints' lists: "
                + ", ".join(f"{v:.2f}" for v in dynamics.overlap),
                dynamics_figure(dynamics), Path(out_dir)))
        parts.append("</details>")
    return "\n".join(parts)


def write_influence_report(results: list[InfluenceResult], out_dir: str | Path, *,
                           tokenizer: object | None = None, count: int = 5,
                           posterior: str = "full", title: str = "Influence report") -> Path:
    """``out_dir/report.html`` with the influence section alone; returns its path."""
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    body = f"<h1>{html.escape(title)}</h1>" + influence_section(
        results, out_dir, tokenizer=tokenizer, count=count, posterior=posterior)
    path = out_dir / "report.html"
    path.write_text(PAGE.format(title=html.escape(title), body=body, script=""),
                    encoding="utf-8")
    return path


def dynamics_figure(dynamics: InfluenceDynamics) -> Figure:
    fig = Figure(figsize=(7.5, 3.6), layout="constrained")
    axes = fig.add_subplot()
    for column, sequence in enumerate(dynamics.sequences):
        axes.plot(dynamics.steps, dynamics.scores[:, column], marker="o", markersize=3,
                  label=f"train {sequence}")
    axes.axhline(0, color="grey", linewidth=0.6)
    axes.set_xlabel("training step")
    axes.set_ylabel("influence -Cov")
    axes.set_title(f"Most influential training sequences of query {dynamics.query}",
                   fontsize=10)
    if len(dynamics.sequences) <= 12:
        axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def _table(raising, lowering, result: InfluenceResult, texts: list[str]) -> str:
    def cell(pairs) -> str:
        return "<br>".join(
            f"<b>{score:+.3g}</b> #{int(result.train_index[i])} "
            f"({html.escape(result.train_datasets[i])}): <code>"
            f"{html.escape(_short(texts, i))}</code>" for i, score in pairs) or "(none)"
    return ("<table><tr><th>raise its loss (most positive)</th><th>lower its loss (most "
            f"negative)</th></tr><tr><td>{cell(raising)}</td><td>{cell(lowering)}</td></tr>"
            "</table>")


def _short(texts: list[str], index: int) -> str:
    if index >= len(texts):
        return f"#{index}"
    text = texts[index].replace("\n", "⏎")
    return text if len(text) <= SHOWN_CHARACTERS else text[:SHOWN_CHARACTERS] + "…"
