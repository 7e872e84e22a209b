"""The comparisons a search exists to answer, each on full-budget trials scored on test.

ASHA stops most trials after their first rung, and which prompt template a stopped trial used
is an accident of the search. So after the search, every value of the compared setting
(the prompt template) that no trial trained to its last epoch gets one rerun of its best
configuration, with early stopping off; so does the lowest `pos_weight` tried, when that
setting is searched. Then:

- `template_comparison`: each template's best full-budget trial (chosen on validation), its
  test figure, and the best two compared on the same test examples (McNemar's exact test and
  Newcombe's paired interval of the difference);
- `contrast`: the headline figure at the lowest `pos_weight` tried against the closest trial's.

Which configuration is a value's best: the trial that went deepest (survived most rungs), then
the lower rung figure at its last epoch, the figure ASHA ranked it by. A value no trial tried
borrows the closest trial's configuration with that value swapped in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trainers import metric_names as names
from trainers.stats import mcnemar_exact, paired_difference_interval
from tuning.config import TEMPLATE_KEY
from tuning.trial_records import TrialRecord, rank

# The categorical setting whose every value is trained to the end, and the numeric setting
# whose lowest value is: the two findings of the reproduction.
COMPARED_SETTING = TEMPLATE_KEY
CONTRASTED_SETTING = "pos_weight"
# Parent-run tags holding each comparison's answer in words (the report page shows them).
COMPARISON_TAG_PREFIX = "comparison_"


@dataclass(frozen=True)
class Rerun:
    reason: str  # e.g. "prompt_template=concat", "pos_weight lowest"
    config: dict[str, Any]
    source_trial: str | None


def _deepest_first(records: list[TrialRecord], rung_metric: str) -> list[TrialRecord]:
    return sorted((r for r in records if r.last), key=lambda r: (-r.epochs, r.last.get(rung_metric, math.inf)))


def reruns_needed(records: list[TrialRecord], param_space: dict[str, dict[str, Any]],
                  rung_metric: str) -> list[Rerun]:
    """The full-budget reruns this search still owes, in a fixed order: the compared setting's
    values in the space's order, then the lowest contrasted value."""
    reruns: list[Rerun] = []
    spec = param_space.get(COMPARED_SETTING)
    ranked = rank(records)
    if spec is not None and spec["type"] == "choice":
        for value in spec["values"]:
            tried = [r for r in records if r.params.get(COMPARED_SETTING) == value]
            if any(r.full_budget for r in tried):
                continue
            deepest = _deepest_first(tried, rung_metric)
            if deepest:
                reruns.append(Rerun(f"{COMPARED_SETTING}={value}", dict(deepest[0].params), deepest[0].trial_id))
            elif ranked:
                borrowed = {**ranked[0].params, COMPARED_SETTING: value}
                reruns.append(Rerun(f"{COMPARED_SETTING}={value}", borrowed, None))
    contrasted = param_space.get(CONTRASTED_SETTING)
    if contrasted is not None and contrasted["type"] != "choice":
        tried = [r for r in records if r.last and CONTRASTED_SETTING in r.params]
        if tried:
            lowest = min(tried, key=lambda r: r.params[CONTRASTED_SETTING])
            same = [r for r in tried if r.params == lowest.params]
            if not any(r.full_budget for r in same) and not any(lowest.params == rerun.config for rerun in reruns):
                reruns.append(Rerun(f"{CONTRASTED_SETTING} lowest", dict(lowest.params), lowest.trial_id))
    return reruns


@dataclass
class Side:
    """One side of a comparison: a full-budget trial and its test figure."""

    label: str
    record: TrialRecord
    metric: str
    # Its name in the parent run's metrics: the template, or "closest" / "lowest".
    key: str = ""

    @property
    def test_cell(self) -> str:
        test = self.record.test or {}
        if self.metric not in test:
            return "not scored on test"
        low, high = names.interval(self.metric)
        return f"{test[self.metric]:.3f} [{test[low]:.3f}, {test[high]:.3f}]"


@dataclass
class Comparison:
    """The best two sides, paired on the same test examples (first = ahead on validation)."""

    setting: str
    metric: str
    sides: list[Side] = field(default_factory=list)
    # Filled when both sides' per-example test outcomes are known.
    difference: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    examples: int = 0
    table: dict[str, int] = field(default_factory=dict)

    def sentence(self) -> str:
        """The answer in words."""
        if len(self.sides) < 2:
            return f"{self.setting}: fewer than two values have a full-budget trial; nothing to compare"
        first, second = self.sides[0].label, self.sides[1].label
        if self.p_value is None:
            return f"{first} and {second}: no paired test figures (a trial was not scored on test)"
        figures = (f"{self.difference:+.3f} [{self.ci_low:+.3f}, {self.ci_high:+.3f}] in test {self.metric}, "
                   f"McNemar p = {self.p_value:.3g}, {self.examples} test examples")
        if self.p_value < 0.05:
            winner, loser = (first, second) if self.difference > 0 else (second, first)
            return f"{winner} beats {loser}: {figures}"
        return f"{first} and {second} are not told apart on test: {figures}"


def _pair(comparison: Comparison) -> Comparison:
    if len(comparison.sides) < 2:
        return comparison
    first, second = (side.record.test_outcomes for side in comparison.sides[:2])
    if first is None or second is None or len(first) != len(second):
        return comparison
    first_b, second_b = [bool(x) for x in first], [bool(x) for x in second]
    comparison.difference, comparison.ci_low, comparison.ci_high = paired_difference_interval(first_b, second_b)
    table = mcnemar_exact(first_b, second_b)
    comparison.p_value = table.pop("p_value")
    comparison.table = {k: int(v) for k, v in table.items()}
    comparison.examples = len(first)
    return comparison


def template_comparison(records: list[TrialRecord], param_space: dict[str, dict[str, Any]],
                        metric: str) -> Comparison | None:
    """Each value's best full-budget trial, closest to the paper on validation first; the best
    two paired on test. None when the compared setting is not searched."""
    spec = param_space.get(COMPARED_SETTING)
    if spec is None or spec["type"] != "choice":
        return None
    comparison = Comparison(COMPARED_SETTING, metric)
    for record in rank([r for r in records if r.full_budget]):
        value = record.params.get(COMPARED_SETTING)
        if value not in [side.record.params.get(COMPARED_SETTING) for side in comparison.sides]:
            comparison.sides.append(Side(f"`{value}`", record, metric, key=str(value)))
    return _pair(comparison)


def contrast(records: list[TrialRecord], param_space: dict[str, dict[str, Any]], metric: str) -> Comparison | None:
    """The closest full-budget trial against the full-budget trial at the lowest value tried of
    the contrasted setting. None when that setting is not searched or nothing is to compare."""
    spec = param_space.get(CONTRASTED_SETTING)
    finished = [r for r in records if r.full_budget and CONTRASTED_SETTING in r.params]
    if spec is None or spec["type"] == "choice" or not finished:
        return None
    closest = rank(finished)[0]
    lowest_value = min(r.params[CONTRASTED_SETTING] for r in records if r.last and CONTRASTED_SETTING in r.params)
    at_lowest = rank([r for r in finished if r.params[CONTRASTED_SETTING] == lowest_value])
    if not at_lowest or at_lowest[0] is closest:
        return None
    comparison = Comparison(CONTRASTED_SETTING, metric, sides=[
        Side(f"{CONTRASTED_SETTING} {closest.params[CONTRASTED_SETTING]:.3g} (closest trial)", closest, metric,
             key="closest"),
        Side(f"{CONTRASTED_SETTING} {lowest_value:.3g} (lowest tried)", at_lowest[0], metric, key="lowest")])
    return _pair(comparison)


def parent_metrics(comparison: Comparison, prefix: str) -> dict[str, float]:
    """The comparison's figures for the parent run: each side's validation and test figure, the
    paired difference, its interval and McNemar's p."""
    metrics: dict[str, float] = {}
    for side in comparison.sides:
        key = side.key
        if comparison.setting in side.record.params and not isinstance(side.record.params[comparison.setting], str):
            metrics[f"{prefix}_{key}_value"] = side.record.params[comparison.setting]
        metrics[f"{prefix}_{key}_val_distance"] = side.record.objective
        metrics[f"{prefix}_{key}_val_{comparison.metric}"] = side.record.best.get(comparison.metric, math.nan)
        for name in (comparison.metric, *names.interval(comparison.metric)):
            if side.record.test and name in side.record.test:
                metrics[f"{prefix}_{key}_test_{name}"] = side.record.test[name]
    if comparison.p_value is not None:
        metrics.update({f"{prefix}_difference": comparison.difference, f"{prefix}_difference_ci_low": comparison.ci_low,
                        f"{prefix}_difference_ci_high": comparison.ci_high, f"{prefix}_mcnemar_p": comparison.p_value})
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


def format_comparison(comparison: Comparison, title: str) -> str:
    """The table of sides (validation, then test with its interval) and the sentence."""
    lines = [title]
    for side in comparison.sides:
        best = side.record.best
        source = side.record.rerun_of
        rerun = ("" if source is None else f", a full-budget rerun of trial {source}" if source and source[0] != "("
                 else ", the closest trial's settings with this value, trained to the end")
        lines.append(f"  {side.label:<34} validation {comparison.metric} {best.get(comparison.metric, math.nan):.3f} "
                     f"(distance {side.record.objective:.2f}), test {side.test_cell} (trial {side.record.trial_id}"
                     f"{rerun})")
    lines.append(f"  => {comparison.sentence()}")
    return "\n".join(lines)
