"""What a search prints: the data it found, and the closing table (the closest trials beside
the paper's figures, the Pareto front, the best figure each template reached, and each model
family's best on the same data)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainers import metric_names as names
from trainers.data import Dataset
from trainers.stats import target_value
from trainers.registry import ModelSpec
from tuning.mlflow_store import DEFAULT_UI, run_link
from tuning.trial_records import TrialRecord

if TYPE_CHECKING:
    from tuning.search_plan import Outcome, PreparedSearch


def format_data_summary(dataset: Dataset) -> str:
    """What the splits hold and what could not be prevented."""
    lines = [f"[data] {len(dataset.train)} train / {len(dataset.val)} validation (carved from the training file, "
             f"--val-fraction {dataset.val_fraction:g}) / {len(dataset.test)} test examples; trials select on "
             "validation, and test is scored once per trial after the search"]
    if dataset.skipped_invalid:
        lines.append(f"[data] --skip-invalid: left out {dataset.skipped_invalid} invalid records")
    if dataset.skipped_without_plan:
        lines.append(f"[data] left out {dataset.skipped_without_plan} records without a plan point")
    lines.append(f"[data] {dataset.test_queries_in_train} test queries also occur in train (case and punctuation "
                 "ignored)" + ("; their test figures are partly memory" if dataset.test_queries_in_train else ""))
    if dataset.unparseable_targets:
        kept = dataset.unparseable_targets - dataset.skipped_unparseable
        lines.append(f"[data] {dataset.unparseable_targets} target plans do not parse, or parse to an empty plan, "
                     f"with TinyAgent's parser (first: {dataset.first_unparseable}); "
                     + ("--skip-invalid left them out" if not kept else
                        f"{kept} are kept and every trial fails them (--skip-invalid leaves them out)"))
    else:
        lines.append("[data] every target plan parses with TinyAgent's parser")
    return "\n".join(lines)


def format_targets(spec: ModelSpec, targets: dict[str, dict[str, Any]], generated_data: bool) -> str:
    """Which figures the search measures closeness from, and why, in one line."""
    figures = ", ".join(f"{metric} {paper_text(target)}" for metric, target in targets.items()
                        if metric in spec.target_metrics)
    if generated_data and any(target.get("relative_to") for target in targets.values()):
        return (f"[targets] generated data: closeness is measured from {figures}; an absolute tool count would "
                "reward wrong tools where queries need fewer tools than the published ones "
                "(search_spaces/targets.yaml, generated_data)")
    return f"[targets] the paper's figures: {figures}"


def _inside(value: float, low: float, high: float) -> str:
    return "yes" if low <= value <= high else "no"


def number_text(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3f}"


def interval_cell(figures: dict[str, float] | None, metric: str) -> tuple[str, float | None, float | None]:
    if not figures or metric not in figures:
        return "not scored", None, None
    low, high = figures[f"{metric}_ci_low"], figures[f"{metric}_ci_high"]
    digits = 2 if metric == names.TOOL_COUNT else 3
    return f"{figures[metric]:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]", low, high


def paper_text(target: dict[str, Any]) -> str:
    """A target as the tables show it: '3.97', or 'gold + 1' for one relative to the data."""
    if target.get("relative_to") == names.GOLD_TOOL_COUNT:
        return f"gold + {target['value']:.4g} (tools the queries need + {target['value']:.4g})"
    return f"{target['value']:.4g}"


def paper_line(paper: dict[str, dict[str, Any]]) -> str:
    return "  paper: " + ", ".join(f"{m} {paper_text(t)}" for m, t in paper.items())


def paper_inside(target: dict[str, Any], figures: dict[str, float] | None, low: float | None,
                  high: float | None) -> str:
    """Whether the target lies inside a test interval; a relative target is placed with the
    test split's own figure (its gold tool count)."""
    if low is None or figures is None:
        return "-"
    relative_to = target.get("relative_to")
    if relative_to and relative_to not in figures:
        return "-"
    return _inside(target_value("", target, figures), low, high)


def format_table(records: list[TrialRecord], spec: ModelSpec, paper: dict[str, dict[str, Any]], title: str) -> str:
    """One line per trial, in the order given (ranked on validation): the validation distance
    and figures that ranked it, then its best checkpoint's figures on the test split with 95%
    CIs and whether the paper's figure lies inside each test interval, the model's extra
    columns (validation), and the searched params.

    paper: {headline figure: its target} (ModelSpec.paper_figures).
    """
    figures = spec.headline
    header = f"  {'rank':>4}  {'trial':<11} {'val dist':>8}  "
    header += "".join(f"{'val ' + m:>{len(m) + 4}}  {'test ' + m + ' [95% CI]':<31} {'paper in':>8}  " for m in figures)
    header += "".join(f"{extra:>{max(len(extra), 8)}}  " for extra in spec.extra_columns) + f"{'epoch':>5}  params"
    lines = [title, paper_line({m: paper[m] for m in figures}), header]
    for rank, record in enumerate(records, start=1):
        best = record.best
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(record.params.items()))
        line = f"  {rank:>4}  {record.trial_id:<11} {best[names.PAPER_DISTANCE]:>8.2f}  "
        for metric in figures:
            cell, low, high = interval_cell(record.test, metric)
            inside = paper_inside(paper[metric], record.test, low, high)
            line += f"{best[metric]:>{len(metric) + 4}.3f}  {cell:<31} {inside:>8}  "
        for extra in spec.extra_columns:
            value = best.get(extra)
            line += f"{number_text(value) if value is not None else '-':>{max(len(extra), 8)}}  "
        lines.append(line + f"{record.best_epoch:>5}  {params}")
    return "\n".join(lines)


def format_untuned(spec: ModelSpec, untuned: dict[str, dict[str, float]], paper: dict[str, dict[str, Any]]) -> str:
    """The paper's untuned row: the base before any fine-tuning, on the same validation and test
    examples as the trials, with the dataset's own prompt."""
    val, test = untuned.get("val", {}), untuned.get("test", {})
    parts = []
    for metric in spec.headline:
        cell, low, high = interval_cell(test, metric)
        shown = f"{val[metric]:.3f}" if metric in val else "-"
        parts.append(f"val {metric} {shown}, test {cell}, paper in: {paper_inside(paper[metric], test, low, high)}")
    cut = int(test.get(names.PROMPTS_CUT, 0))
    return ("The base before any fine-tuning (the dataset's own prompt, the base's own format): " + "; ".join(parts)
            + f"; {int(test.get(names.EVAL_EXAMPLES, 0))} test examples"
            + (f", {cut} of their prompts cut to the base's context" if cut else "") + ".")


def format_family_comparison(bests: list[dict[str, Any]], spec: ModelSpec, paper: dict[str, dict[str, Any]]) -> str:
    """Each model family's closest trial (on validation) over every search of this task on the
    same data split in the MLflow store, side by side; empty with fewer than two families."""
    if len(bests) < 2:
        return ""
    lines = ["Best of each model on the same data split, across the searches in this MLflow store (closest to "
             "the paper on validation; test scored once):",
             paper_line(paper)]
    header = f"  {'model':<16} {'val dist':>8}  "
    header += "".join(f"{'val ' + m:>{len(m) + 4}}  {'test ' + m + ' [95% CI]':<31} " for m in spec.headline)
    lines.append(header + "experiment / trial")
    for best in bests:
        line = f"  {best['model']:<16} {best['validation'][names.PAPER_DISTANCE]:>8.2f}  "
        for metric in spec.headline:
            value = best["validation"].get(metric)
            shown = f"{value:.3f}" if value is not None else "-"
            line += f"{shown:>{len(metric) + 4}}  {interval_cell(best['test'], metric)[0]:<31} "
        lines.append(line + f"{best['experiment']} / {best['trial_id']}")
    return "\n".join(lines)


def format_closing(prepared: "PreparedSearch", outcome: "Outcome", tracker) -> str:
    """Everything printed after the search: the tables, the totals, where to look next."""
    spec, request, ranked, totals = prepared.spec, prepared.request, outcome.ranked, outcome.totals
    paper = spec.paper_figures(prepared.targets, request.trainer_base)
    parts = ["", format_table(ranked[: prepared.top_k], spec, paper,
                              f"Closest to the paper on validation (best epoch of each trial, {len(ranked)} trials "
                              "ranked), with each trial's test figures, scored once:")]
    if tracker.untuned:
        parts.append(format_untuned(spec, tracker.untuned, paper))
    parts.extend(outcome.comparison_lines)
    if request.objective == "pareto":
        parts.append(format_table(outcome.front, spec, paper, "Pareto front (recall up, tools retrieved down):"))
    comparison = format_family_comparison(outcome.family_bests, spec, paper)
    if comparison:
        parts.append(comparison)
    parts.append(f"\n{totals['trials_finished']} finished ({totals['trials_stopped_early']} stopped early by ASHA), "
                 f"{totals['trials_failed']} failed, in {totals['search_wall_seconds']:.0f} s; "
                 f"{totals['trials_scored_on_test']} scored on the test split.")
    unscored = [r.trial_id for r in ranked if r.checkpoint_path and r.test is None]
    if unscored:
        parts.append(f"Not scored on test: {', '.join(unscored)} (the reason is in each run's test_error tag).")
    found = outcome.resumed_counts
    if found is not None:
        lost = tracker.lost_trials()
        parts.append(
            f"Resumed: {found['finished'] + found['failed']} trials had ended before the driver stopped and were not "
            f"trained again ({tracker.replayed} only replayed a result the saved state had missed); "
            f"{found['interrupted'] - len(lost)} interrupted trials continued; {len(lost)} were lost"
            + (f" ({', '.join(r.trial_id for r in lost)}: they started after the search last saved its state, "
               "so Tune ran new trials in their place)" if lost else "") + ".")
    if outcome.registered_version:
        parts.append(f"Registered {spec.registered_model} version {outcome.registered_version} as alias "
                     "'closest-to-paper'.")
    parts.append(f"MLflow: mlflow ui --backend-store-uri {prepared.tracking_uri} --host 127.0.0.1 --port 5000")
    if tracker.parent_run_id:
        parts.append(f"  then open {run_link(DEFAULT_UI, tracker.experiment_id, tracker.parent_run_id)}")
    budget = outcome.budget
    if budget is not None and budget.exhausted:
        parts.append(f"The search stopped early: {budget.failed} trials failed (--max-failed-trials {budget.limit}). "
                     "Each FAILED run in MLflow holds its error in the `error` tag.")
    elif not ranked:
        parts.append("No trial produced a result; see the errors above and the FAILED runs in MLflow.")
    return "\n".join(parts)
