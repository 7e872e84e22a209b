"""The closing table: the closest trials beside the paper's figures, the Pareto front, and the
best figure each prompt template reached."""

from __future__ import annotations

from typing import Any

from tuning.tracking import TrialRecord

RECALL, COUNT = "tool_recall", "tool_count"
# The headline figures of each model's table, and extra columns shown after them.
FIGURES = {"toolrag": (RECALL, COUNT), "planner": ("plan_success",)}
EXTRAS = {"toolrag": (), "planner": ("tool_set_accuracy", "plan_parse_rate", "eval_examples")}


def pareto_front(records: list[TrialRecord]) -> list[TrialRecord]:
    """Trials no other trial beats on both recall (higher) and tools retrieved (lower)."""
    points = [(r, r.best[RECALL], r.best[COUNT]) for r in records if r.best]
    front = []
    for record, recall, count in points:
        dominated = any(
            (other_recall >= recall and other_count <= count) and (other_recall > recall or other_count < count)
            for _, other_recall, other_count in points
        )
        if not dominated:
            front.append(record)
    return sorted(front, key=lambda r: -r.best[RECALL])


def _inside(value: float, low: float, high: float) -> str:
    return "yes" if low <= value <= high else "no"


def _number(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3f}"


def _interval_cell(figures: dict[str, float] | None, metric: str) -> tuple[str, float | None, float | None]:
    if not figures or metric not in figures:
        return "not scored", None, None
    low, high = figures[f"{metric}_ci_low"], figures[f"{metric}_ci_high"]
    digits = 2 if metric == COUNT else 3
    return f"{figures[metric]:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]", low, high


def format_table(records: list[TrialRecord], targets: dict[str, dict[str, float]], title: str,
                 model: str = "toolrag", paper_figures: dict[str, float] | None = None) -> str:
    """One line per trial, in the order given (ranked on validation): the validation distance
    and figures that ranked it, then its best checkpoint's figures on the test split with 95%
    CIs and whether the paper's figure lies inside each test interval, the model's extra
    columns (validation), and the searched params.

    paper_figures: {metric: paper value} when a metric is scored against a differently named
    target (the planner's plan_success against 0.78 or 0.8006); default: targets[metric].
    """
    figures = FIGURES[model]
    paper = {m: (paper_figures or {}).get(m, targets.get(m, {}).get("value")) for m in figures}
    header = f"  {'rank':>4}  {'trial':<11} {'val dist':>8}  "
    header += "".join(f"{'val ' + m:>{len(m) + 4}}  {'test ' + m + ' [95% CI]':<31} {'paper in':>8}  " for m in figures)
    header += "".join(f"{extra:>{max(len(extra), 8)}}  " for extra in EXTRAS[model]) + f"{'epoch':>5}  params"
    lines = [title, "  paper: " + ", ".join(f"{m} {paper[m]:.4g}" for m in figures), header]
    for rank, record in enumerate(records, start=1):
        best = record.best
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(record.params.items()))
        line = f"  {rank:>4}  {record.trial_id:<11} {best['paper_distance']:>8.2f}  "
        for metric in figures:
            cell, low, high = _interval_cell(record.test, metric)
            inside = "-" if low is None else _inside(paper[metric], low, high)
            line += f"{best[metric]:>{len(metric) + 4}.3f}  {cell:<31} {inside:>8}  "
        for extra in EXTRAS[model]:
            value = best.get(extra)
            line += f"{_number(value) if value is not None else '-':>{max(len(extra), 8)}}  "
        lines.append(line + f"{int(best['epoch']):>5}  {params}")
    return "\n".join(lines)


def best_per_template(records: list[TrialRecord], metric: str) -> dict[str, dict[str, Any]]:
    """For each prompt template tried: the best validation value of `metric`, that trial's test
    figure, and how many trials tried it.

    Only whole-validation-split results count, so a trial stopped on a subset does not compete."""
    summary: dict[str, dict[str, Any]] = {}
    for record in records:
        template = record.params.get("prompt_template")
        if template is None or not record.best:
            continue
        entry = summary.setdefault(template, {"trials": 0, "best": None, "trial_id": None, "test": None})
        entry["trials"] += 1
        if record.best.get("full_validation_set", 1.0) == 1.0 and metric in record.best:
            if entry["best"] is None or record.best[metric] > entry["best"]:
                entry["best"], entry["trial_id"] = record.best[metric], record.trial_id
                entry["test"] = record.test
    return summary


def format_template_summary(summary: dict[str, dict[str, Any]], metric: str) -> str:
    lines = [f"Best {metric} per prompt template (chosen on the whole validation split; its test figure after):"]
    for template, entry in sorted(summary.items(), key=lambda item: -(item[1]["best"] or -1.0)):
        figure = (f"validation {entry['best']:.3f}, test {_interval_cell(entry['test'], metric)[0]} "
                  f"(trial {entry['trial_id']})" if entry["best"] is not None
                  else "none scored on the whole validation split (stopped early)")
        lines.append(f"  {template:<12} {figure}, {entry['trials']} trial(s)")
    return "\n".join(lines)
