"""The closing table and the Pareto front."""

from __future__ import annotations

from tuning.report import format_table, pareto_front
from tuning.tracking import TrialRecord

TARGETS = {"tool_recall": {"value": 0.99, "tolerance": 0.01}, "tool_count": {"value": 3.97, "tolerance": 0.1}}


def _record(trial_id: str, recall: float, count: float, low: float, high: float) -> TrialRecord:
    record = TrialRecord(trial_id, f"run-{trial_id}", {"pos_weight": 60.0})
    record.best = {"tool_recall": recall, "tool_count": count, "tool_recall_ci_low": low, "tool_recall_ci_high": high,
                   "tool_count_ci_low": count - 0.1, "tool_count_ci_high": count + 0.1, "paper_distance": 1.0,
                   "epoch": 2}
    return record


def test_pareto_front_keeps_only_undominated_trials():
    a = _record("a", 0.99, 4.0, 0.98, 1.0)   # best recall
    b = _record("b", 0.90, 2.5, 0.85, 0.93)  # fewest tools
    c = _record("c", 0.89, 3.0, 0.85, 0.93)  # worse than b on both: dominated
    d = _record("d", 0.99, 4.5, 0.98, 1.0)   # same recall as a, more tools: dominated
    e = _record("e", 0.95, 3.2, 0.93, 0.97)  # between a and b: on the front
    assert [r.trial_id for r in pareto_front([a, b, c, d, e])] == ["a", "e", "b"]


def test_table_says_whether_the_paper_figure_is_inside_each_interval():
    inside = _record("inside", 0.985, 3.95, 0.975, 0.995)
    outside = _record("outside", 0.90, 2.0, 0.88, 0.92)
    lines = format_table([inside, outside], TARGETS, "title").splitlines()
    row_inside = next(line for line in lines if "inside" in line)
    row_outside = next(line for line in lines if "outside" in line)
    assert row_inside.split().count("yes") == 2
    assert row_outside.split().count("no") == 2
