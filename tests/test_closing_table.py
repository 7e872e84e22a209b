"""The closing table and the Pareto front."""

from __future__ import annotations

from trainers.registry import MODELS
from tuning.closing_table import format_table
from tuning.trial_records import pareto_front
from tuning.trial_records import TrialRecord

TARGETS = {"tool_recall": {"value": 0.99, "tolerance": 0.01}, "tool_count": {"value": 3.97, "tolerance": 0.1}}
TOOLRAG = MODELS["toolrag"]
PAPER = TOOLRAG.paper_figures(TARGETS, {})


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
    assert [r.trial_id for r in pareto_front([a, b, c, d, e], TOOLRAG.pareto)] == ["a", "e", "b"]


def _tested(record: TrialRecord, recall: float, count: float, low: float, high: float) -> TrialRecord:
    record.test = {"tool_recall": recall, "tool_count": count, "tool_recall_ci_low": low, "tool_recall_ci_high": high,
                   "tool_count_ci_low": count - 0.1, "tool_count_ci_high": count + 0.1, "paper_distance": 2.0}
    return record


def test_a_relative_count_target_is_placed_with_the_test_splits_own_gold_count():
    """On generated data the count target is gold + 1: a test interval [3.9, 4.1] holds it when
    the test examples need 3.0 tools, not when they need 2.5 (where 3.97 would have been 'inside')."""
    relative = {"tool_recall": TARGETS["tool_recall"],
                "tool_count": {"value": 1.0, "tolerance": 0.1, "relative_to": "gold_tool_count"}}
    paper = TOOLRAG.paper_figures(relative, {})
    needs_three = _tested(_record("three", 0.99, 4.0, 0.98, 1.0), 0.99, 4.0, 0.98, 1.0)
    needs_three.test["gold_tool_count"] = 3.0
    needs_less = _tested(_record("less", 0.99, 4.0, 0.98, 1.0), 0.99, 4.0, 0.98, 1.0)
    needs_less.test["gold_tool_count"] = 2.5
    lines = format_table([needs_three, needs_less], TOOLRAG, paper, "title").splitlines()
    assert "tool_count gold + 1" in lines[1]
    assert next(line for line in lines if "three" in line).split().count("yes") == 2
    row_less = next(line for line in lines if " less " in line).split()
    assert row_less.count("yes") == 1 and row_less.count("no") == 1


def test_table_says_whether_the_paper_figure_is_inside_each_test_interval():
    """The paper-in-CI verdict is about the test interval, never the validation one the trial
    was selected on: here the validation figures would say the opposite."""
    inside = _tested(_record("inside", 0.90, 2.0, 0.88, 0.92), 0.985, 3.95, 0.975, 0.995)
    outside = _tested(_record("outside", 0.985, 3.95, 0.975, 0.995), 0.90, 2.0, 0.88, 0.92)
    untested = _record("untested", 0.985, 3.95, 0.975, 0.995)
    lines = format_table([inside, outside, untested], TOOLRAG, PAPER, "title").splitlines()
    row_inside = next(line for line in lines if "inside" in line)
    row_outside = next(line for line in lines if "outside" in line)
    row_untested = next(line for line in lines if "untested" in line)
    assert row_inside.split().count("yes") == 2 and "0.985 [0.975, 0.995]" in row_inside
    assert row_outside.split().count("no") == 2 and "0.900 [0.880, 0.920]" in row_outside
    assert "not scored" in row_untested and "yes" not in row_untested.split()


def test_the_untuned_row_shows_both_splits_the_interval_and_the_cut_prompts():
    from tuning.closing_table import format_untuned

    planner = MODELS["planner"]
    paper = planner.paper_figures({"plan_success": {"value": 0.78, "tolerance": 0.03}}, {})
    line = format_untuned(planner, {"val": {"plan_success": 0.05},
                                    "test": {"plan_success": 0.1, "plan_success_ci_low": 0.06,
                                             "plan_success_ci_high": 0.15, "eval_examples": 200.0,
                                             "prompts_cut": 12.0}}, paper)
    assert "val plan_success 0.050, test 0.100 [0.060, 0.150], paper in: no" in line
    assert "200 test examples, 12 of their prompts cut to the base's context" in line
