"""A finished search as a person would rather read it, built from the MLflow store alone.

`publish` reads a search's parent run and its trials' runs back from MLflow, then:
- logs the plots (tuning/plots.py) to the parent run under `plots/`;
- writes the parent run's description (`mlflow.note.content`): the closest trials in Markdown,
  beside the paper's figures, linked to their runs;
- writes `RESULTS/report-<run>.html`, one self-contained page (plots inlined), and logs it too.

The search calls it when it ends; `python -m tuning.report` calls it again for any search in the
store, with no Ray.
"""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from trainers import metric_names as names
from trainers.registry import MODELS, ModelSpec
from tuning import closing_table
from tuning.config import TEMPLATE_KEY
from tuning.mlflow_store import (
    CLOSEST_RANK_TAG, DEFAULT_UI, NOTE_TAG, SEARCH_TAG, child_runs, default_tracking_uri, latest_search,
    record_from_run, run_link, sqlite_path,
)
from tuning.trial_records import TrialRecord, best_per_template, pareto_front, rank

CLOSING_ARTIFACT = "closing_table.txt"
PLOTS_FOLDER = "plots"
# MLflow keeps at most 8,000 characters of a tag; the description stays well inside.
NOTE_LIMIT = 7500
# Per-epoch curves are read for this many of the closest trials.
CURVES = 5


@dataclass
class SearchView:
    """One search as MLflow holds it."""

    experiment_id: str
    experiment_name: str
    parent: Any
    spec: ModelSpec
    paper: dict[str, dict[str, Any]]
    searched: dict[str, dict[str, Any]]
    objective: str
    # Every trial in start order, and those with a result ranked as the search ranked them.
    records: list[TrialRecord]
    ranked: list[TrialRecord]
    histories: dict[str, dict[str, list[tuple[int, float]]]]
    max_epochs: int
    top_k: int
    closing_text: str | None = None

    @property
    def run_name(self) -> str:
        return self.parent.info.run_name

    def totals(self) -> dict[str, float]:
        return self.parent.data.metrics


def find_search(client: MlflowClient, experiment_name: str, run_id: str | None = None):
    """(experiment, parent run): the run given, else the experiment's latest search."""
    from tuning.config import UserError

    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise UserError(f"--experiment {experiment_name}: no such experiment in this store (there are: {known})")
    if run_id:
        try:
            parent = client.get_run(run_id)
        except Exception as error:  # MlflowException / RestException for an unknown id, by store
            raise UserError(f"--run {run_id}: no such run ({str(error).splitlines()[0]})") from None
        if parent.info.experiment_id != experiment.experiment_id or parent.data.tags.get(SEARCH_TAG) != "parent":
            raise UserError(f"--run {run_id}: not a search (parent run) of experiment {experiment_name}")
        return experiment, parent
    parent = latest_search(client.tracking_uri, experiment_name)
    if parent is None:
        raise UserError(f"--experiment {experiment_name}: holds no search (no parent run)")
    return experiment, parent


def load_search(client: MlflowClient, experiment_name: str, run_id: str | None = None) -> SearchView:
    experiment, parent = find_search(client, experiment_name, run_id)
    params = parent.data.params
    # A search recorded before the task and the model had one name each kept the model under
    # model_name (and the task under model).
    spec = MODELS[params.get("model_name", params.get("model"))]
    searched = json.loads(params.get("search_space", "{}"))
    children = child_runs(client, experiment.experiment_id, parent.info.run_id)
    records = sorted((record_from_run(client, run, list(searched)) for run in children), key=lambda r: r.started)
    ranked = rank(records)
    # The settings every trial shares (its fixed trainer settings are params of each trial's run).
    shared = children[0].data.params if children else {}
    settings = {}
    if spec.paper_target_key and spec.paper_target_key in shared:
        settings[spec.paper_target_key] = shared[spec.paper_target_key]
    paper = spec.paper_figures(json.loads(params["paper_targets"]), settings)
    histories = {}
    for record in ranked[:CURVES]:
        histories[record.trial_id] = {
            names.PAPER_DISTANCE: [(p.step, p.value) for p in
                                   sorted(client.get_metric_history(record.run_id, names.PAPER_DISTANCE),
                                          key=lambda p: p.step)]}
    epochs = [int(float(run.data.params["epochs"])) for run in children if "epochs" in run.data.params]
    top_k = sum(CLOSEST_RANK_TAG in run.data.tags for run in children) or 5
    closing = None
    # Its progress bar would be the only line of this step on the console.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Absent when the search crashed before its closing table.
    if any(item.path == CLOSING_ARTIFACT for item in client.list_artifacts(parent.info.run_id)):
        with tempfile.TemporaryDirectory(prefix="closing-") as folder:
            closing = Path(client.download_artifacts(parent.info.run_id, CLOSING_ARTIFACT, folder)).read_text()
    return SearchView(experiment_id=experiment.experiment_id, experiment_name=experiment.name, parent=parent,
                      spec=spec, paper=paper, searched=searched, objective=params.get("objective", "distance"),
                      records=records, ranked=ranked, histories=histories,
                      max_epochs=max(epochs, default=1), top_k=top_k, closing_text=closing)


# MLflow 3.17's UI shows an experiment in the view its GenAI / Model training switch names, which
# a link can set; the experiment's kind tag decides only where that switch is off.
def _settings(record: TrialRecord) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(record.params.items()))


def _rows(view: SearchView, records: list[TrialRecord]) -> tuple[list[str], list[list[str]]]:
    """The closing table's columns and cells: validation figures that ranked each trial, then its
    test figures with 95% intervals, and whether the paper's figure lies inside each."""
    header = ["rank", "trial", "val distance"]
    for metric in view.spec.headline:
        header += [f"val {metric}", f"test {metric} [95% CI]", "paper inside"]
    header += [*view.spec.extra_columns, "epoch", "settings"]
    rows = []
    for position, record in enumerate(records, start=1):
        best = record.best
        row = [str(position), record.trial_id, f"{best[names.PAPER_DISTANCE]:.3f}"]
        for metric in view.spec.headline:
            cell, low, high = closing_table.interval_cell(record.test, metric)
            row += [f"{best[metric]:.3f}", cell, closing_table.paper_inside(view.paper[metric], record.test, low, high)]
        row += [closing_table.number_text(best[c]) if best.get(c) is not None else "-" for c in view.spec.extra_columns]
        row += [str(record.best_epoch), _settings(record)]
        rows.append(row)
    return header, rows


def _template_rows(view: SearchView) -> list[list[str]]:
    """Per template: its best full-budget trial's validation figure with interval, and its test figure."""
    metric = view.spec.headline[0]
    by_id = {r.trial_id: r for r in view.records}
    rows = []
    summary = best_per_template(view.ranked, metric)
    for template, entry in sorted(summary.items(), key=lambda item: item[1]["distance"]):
        if entry["best"] is None:
            rows.append([template, "no full-budget trial (every one stopped early)", "-", "-",
                         str(entry["trials"])])
            continue
        record = by_id[entry["trial_id"]]
        rows.append([template, closing_table.interval_cell(record.best, metric)[0],
                     closing_table.interval_cell(entry["test"], metric)[0], entry["trial_id"], str(entry["trials"])])
    return rows


def _comparisons(view: SearchView) -> dict[str, str]:
    """{compared setting: the answer in words}, as the search tagged its parent run."""
    from tuning.full_budget import COMPARISON_TAG_PREFIX

    tags = view.parent.data.tags
    return {key[len(COMPARISON_TAG_PREFIX):]: value for key, value in sorted(tags.items())
            if key.startswith(COMPARISON_TAG_PREFIX)}


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _summary_line(view: SearchView) -> str:
    totals = view.totals()
    return (f"{int(totals.get('trials_finished', 0))} trials finished ({int(totals.get('trials_stopped_early', 0))} "
            f"stopped early by ASHA), {int(totals.get('trials_failed', 0))} failed, in "
            f"{totals.get('search_wall_seconds', 0):.0f} s; {int(totals.get('trials_scored_on_test', 0))} scored on "
            "the test split")


def markdown_note(view: SearchView, report_file: Path | None) -> str:
    """The parent run's description: the answer first, then the closest trials, linked."""
    if not view.ranked:
        return f"**No trial produced a result.** {_summary_line(view)}."
    closest = view.ranked[0]
    ids = {r.trial_id: r.run_id for r in view.ranked}
    header, rows = _rows(view, view.ranked[: view.top_k])
    for row in rows:
        row[1] = f"[{row[1]}]({run_link('', view.experiment_id, ids[row[1]])})"
    parts = [
        f"**Closest to the paper (chosen on validation):** trial "
        f"[{closest.trial_id}]({run_link('', view.experiment_id, closest.run_id)}), {_settings(closest)}.",
        "",
        "**Paper:** " + ", ".join(f"{m} {closing_table.paper_text(t)}" for m, t in view.paper.items()),
        "",
        _markdown_table(header, rows),
    ]
    if TEMPLATE_KEY in view.searched:
        parts += ["", f"**Best {view.spec.headline[0]} per {TEMPLATE_KEY}** (validation, then test):", "",
                  _markdown_table([TEMPLATE_KEY, "validation [95% CI]", "test [95% CI]", "trial", "trials"],
                                  _template_rows(view))]
    for setting, sentence in _comparisons(view).items():
        parts += ["", f"**{setting}, on full-budget trials:** {sentence}."]
    parts += ["", _summary_line(view) + ".", "", f"Plots: the `{PLOTS_FOLDER}/` artifacts of this run."]
    if report_file is not None:
        parts.append(f"Report page: `{report_file}` (also an artifact of this run).")
    note = "\n".join(parts)
    return note if len(note) <= NOTE_LIMIT else note[: NOTE_LIMIT - 40] + "\n\n(cut; see the report page)"


def _html_table(header: list[str], rows: list[list[str]], links: dict[int, list[str]] | None = None) -> str:
    """links: {column: one URL per row} turns that column's cells into links."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, cell in enumerate(row):
            text = html.escape(cell)
            if links and j in links:
                text = f'<a href="{html.escape(links[j][i])}" target="_blank">{text}</a>'
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:last-child, th:last-child { text-align: left; }
.answer { background: #eef6ee; border-left: 4px solid #3a7; padding: 0.6em 1em; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; flex: 0 1 calc(50% - 0.5em); }
figure.wide { flex-basis: 100%; }
figure img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.8em; }
"""


def html_page(view: SearchView, pngs: dict[str, bytes], ui_base: str) -> str:
    """One self-contained page: the answer, the paper's figures, the tables, the plots."""
    title = f"{view.experiment_name}: {view.run_name}"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>Search status {html.escape(view.parent.info.status)}; {html.escape(_summary_line(view))}. "
             f"<a href='{html.escape(run_link(ui_base, view.experiment_id, view.parent.info.run_id))}' "
             "target='_blank'>The search in MLflow</a>.</p>",
             "<h2>The paper's figures</h2><p>" + html.escape(
                 ", ".join(f"{m} {closing_table.paper_text(t)}" for m, t in view.paper.items())) + "</p>"]
    if view.ranked:
        closest = view.ranked[0]
        parts.append(f"<p class='answer'><b>Closest to the paper (chosen on validation):</b> trial "
                     f"{html.escape(closest.trial_id)}, {html.escape(_settings(closest))}.</p>")
        shown = view.ranked[: view.top_k]
        header, rows = _rows(view, shown)
        parts += ["<h2>Closest trials</h2><p>Ranked on the validation split (each trial's best epoch); test "
                  "figures scored once, after the search.</p>",
                  _html_table(header, rows, {1: [run_link(ui_base, view.experiment_id, r.run_id) for r in shown]})]
        if TEMPLATE_KEY in view.searched:
            parts += [f"<h2>Best {html.escape(view.spec.headline[0])} per {TEMPLATE_KEY}</h2>",
                      _html_table([TEMPLATE_KEY, "validation [95% CI]", "test [95% CI]", "trial", "trials"],
                                  _template_rows(view))]
        for setting, sentence in _comparisons(view).items():
            parts.append(f"<p class='answer'><b>{html.escape(setting)}, on full-budget trials:</b> "
                         f"{html.escape(sentence)}.</p>")
        if view.objective == "pareto" and view.spec.pareto:
            front = pareto_front(view.ranked, view.spec.pareto)
            header, rows = _rows(view, front)
            parts += ["<h2>Pareto front (recall up, tools retrieved down)</h2>",
                      _html_table(header, rows, {1: [run_link(ui_base, view.experiment_id, r.run_id) for r in front]})]
    else:
        parts.append("<p class='answer'>No trial produced a result.</p>")
    if pngs:
        parts.append("<h2>Plots</h2><div class='plots'>")
        for name, png in pngs.items():
            data = base64.b64encode(png).decode()
            # A figure of several panels gets the page's width; the others go two a row.
            wide = " class='wide'" if _png_width(png) > WIDE_PNG else ""
            parts.append(f"<figure{wide}><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(name)}</figcaption></figure>")
        parts.append("</div>")
    if view.closing_text:
        parts.append("<h2>The search's closing table, as printed</h2><pre>" + html.escape(view.closing_text) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


WIDE_PNG = 900


def _png_width(png: bytes) -> int:
    """The width a PNG's header gives (bytes 16-20 of its IHDR chunk)."""
    return int.from_bytes(png[16:20], "big")


def report_path(results_dir: Path, run_name: str) -> Path:
    return results_dir / f"report-{run_name}.html"


def publish(tracking_uri: str, experiment_name: str, run_id: str | None, results_dir: Path,
            *, ui_base: str = DEFAULT_UI, closing_text: str | None = None) -> Path:
    """Plots, description and report page for one search; returns the page's path."""
    import matplotlib.pyplot as plt

    from tuning import plots

    client = MlflowClient(tracking_uri)
    if closing_text is not None and run_id is not None:
        client.log_text(run_id, closing_text, CLOSING_ARTIFACT)
    view = load_search(client, experiment_name, run_id)
    parent_id = view.parent.info.run_id
    figures = plots.search_figures(plots.PlotInput(
        records=view.records, ranked=view.ranked, spec=view.spec, paper=view.paper, searched=view.searched,
        objective=view.objective, histories=view.histories, max_epochs=view.max_epochs))
    pngs = {}
    for name, figure in figures.items():
        client.log_figure(parent_id, figure, f"{PLOTS_FOLDER}/{name}.png")
        pngs[name] = plots.figure_png(figure)
        plt.close(figure)
    page = report_path(results_dir, view.run_name)
    page.parent.mkdir(parents=True, exist_ok=True)
    # Written whole or not at all: a reader never opens half a page.
    partial = page.with_name(page.name + ".partial")
    partial.write_text(html_page(view, pngs, ui_base), encoding="utf-8")
    os.replace(partial, page)
    client.log_artifact(parent_id, str(page))
    client.set_tag(parent_id, NOTE_TAG, markdown_note(view, page))
    return page


def main(argv: list[str] | None = None) -> int:
    """python -m tuning.report --experiment NAME [--run ID]: rebuild a search's plots, MLflow
    description and report page from the MLflow store alone (no Ray)."""
    import argparse
    import sys
    from pathlib import Path

    from tuning.config import UserError

    parser = argparse.ArgumentParser(prog="python -m tuning.report", description=main.__doc__.split(":", 1)[1].strip())
    parser.add_argument("--experiment", required=True, help="the MLflow experiment of the search")
    parser.add_argument("--run", help="the search's parent run id (default: the experiment's latest search)")
    parser.add_argument("--results-dir", default="results", help="where the page goes (default: results)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: sqlite:////abs/RESULTS_DIR/mlflow.db)")
    parser.add_argument("--mlflow-url", default=DEFAULT_UI,
                        help=f"where the MLflow UI serves this store, for the page's links (default: {DEFAULT_UI})")
    args = parser.parse_args(argv)
    results_dir = Path(args.results_dir).expanduser().resolve()
    tracking_uri = args.tracking_uri or default_tracking_uri(results_dir)
    database = sqlite_path(tracking_uri)
    try:
        if database is not None and not database.is_file():  # MLflow would create an empty store there
            raise UserError(f"--tracking-uri {tracking_uri}: no MLflow store at {database} (pass the search's "
                            "--results-dir or --tracking-uri)")
        page = publish(tracking_uri, args.experiment, args.run, results_dir, ui_base=args.mlflow_url)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"[report] {page} (plots and description logged to the search's parent run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
