"""Which reruns a search owes, and the comparisons it prints (tuning/full_budget.py)."""

from __future__ import annotations

import math

import pytest

from trainers.stats import mcnemar_exact, paired_difference_interval, wilson_interval
from tuning import full_budget
from tuning.trial_records import TrialRecord

SPACE = {"pos_weight": {"type": "loguniform", "low": 1.0, "high": 150.0},
         "prompt_template": {"type": "choice", "values": ["query", "question", "instruction"]}}
RUNG = "best_paper_distance"


def record(trial_id: str, template: str, pos_weight: float, distance: float, epochs: int, stopped: bool,
           recall: float = 0.5, outcomes: list[int] | None = None) -> TrialRecord:
    best = {"paper_distance": distance, "tool_recall": recall, "epoch": epochs, RUNG: distance}
    r = TrialRecord(trial_id, f"run-{trial_id}", {"pos_weight": pos_weight, "prompt_template": template},
                    epochs=epochs, best=best, last=dict(best), status="FINISHED", stopped_early=stopped)
    if outcomes is not None:
        n = len(outcomes)
        low, high = wilson_interval(sum(outcomes), n)
        r.test = {"tool_recall": sum(outcomes) / n, "tool_recall_ci_low": low, "tool_recall_ci_high": high}
        r.test_outcomes = outcomes
    return r


def test_each_value_without_a_full_budget_trial_reruns_its_deepest_then_best_trial():
    records = [
        record("q1", "query", 60.0, 5.0, 3, stopped=False),  # query is trained to the end
        record("a1", "question", 20.0, 4.0, 1, stopped=True),
        record("a2", "question", 30.0, 6.0, 2, stopped=True),  # went deeper: the better one at rung 2
        record("i1", "instruction", 2.0, 1.0, 1, stopped=True),
        record("i2", "instruction", 40.0, 3.0, 1, stopped=True),
    ]
    reruns = full_budget.reruns_needed(records, SPACE, RUNG)
    assert [(r.reason, r.source_trial) for r in reruns] == [
        ("prompt_template=question", "a2"), ("prompt_template=instruction", "i1")]
    assert reruns[0].config == {"pos_weight": 30.0, "prompt_template": "question"}
    # The lowest pos_weight (2.0, trial i1) is already rerun for its template: not twice.
    assert sum(r.config["pos_weight"] == 2.0 for r in reruns) == 1


def test_a_value_no_trial_tried_borrows_the_closest_trials_configuration_and_the_lowest_weight_is_rerun():
    records = [record("q1", "query", 60.0, 5.0, 3, stopped=False),
               record("q2", "query", 1.5, 9.0, 1, stopped=True),
               record("a1", "question", 20.0, 2.0, 3, stopped=False)]
    reruns = full_budget.reruns_needed(records, SPACE, RUNG)
    assert [(r.reason, r.source_trial, r.config) for r in reruns] == [
        ("prompt_template=instruction", None, {"pos_weight": 20.0, "prompt_template": "instruction"}),
        ("pos_weight lowest", "q2", {"pos_weight": 1.5, "prompt_template": "query"})]
    # Once every value and the lowest weight have full-budget trials, nothing is owed.
    done = records + [record("r1", "instruction", 20.0, 3.0, 3, stopped=False),
                      record("r2", "query", 1.5, 9.0, 3, stopped=False)]
    assert full_budget.reruns_needed(done, SPACE, RUNG) == []


def test_a_trial_scored_on_a_validation_subset_only_is_not_full_budget():
    planner_like = record("p1", "query", 1.0, 1.0, 3, stopped=False)
    planner_like.best["full_validation_set"] = 0.0
    assert not planner_like.full_budget
    assert record("p2", "query", 1.0, 1.0, 3, stopped=False).full_budget
    assert not record("p3", "query", 1.0, 1.0, 1, stopped=True).full_budget


def test_the_template_comparison_pairs_the_best_two_values_on_the_same_test_examples():
    first = [1] * 60 + [0] * 40
    second = [1] * 40 + [0] * 60
    records = [record("a", "instruction", 20.0, 1.0, 3, False, outcomes=first),
               record("b", "query", 20.0, 2.0, 3, False, outcomes=second),
               record("c", "query", 25.0, 3.0, 3, False, outcomes=[0] * 100),  # query's second best: not shown
               record("d", "question", 20.0, 0.5, 1, True, outcomes=[1] * 100)]  # stopped early: not compared
    comparison = full_budget.template_comparison(records, SPACE, "tool_recall")
    assert [s.record.trial_id for s in comparison.sides] == ["a", "b"]
    table = mcnemar_exact([bool(x) for x in first], [bool(x) for x in second])
    assert comparison.p_value == pytest.approx(table["p_value"]) and comparison.p_value < 0.05
    assert comparison.difference == pytest.approx(0.2)
    assert comparison.ci_low < 0.2 < comparison.ci_high
    assert comparison.sentence().startswith("`instruction` beats `query`: +0.200 [")
    assert "McNemar p = " in comparison.sentence() and "100 test examples" in comparison.sentence()
    text = full_budget.format_comparison(comparison, "title")
    assert "test 0.600 [" in text and "(trial a)" in text and "question" not in text
    metrics = full_budget.parent_metrics(comparison, "prompt_template")
    assert metrics["prompt_template_instruction_test_tool_recall"] == pytest.approx(0.6)
    assert "prompt_template_instruction_value" not in metrics  # a template has no number
    assert metrics["prompt_template_mcnemar_p"] == pytest.approx(comparison.p_value)


def test_one_template_with_a_full_budget_trial_is_shown_but_not_compared():
    comparison = full_budget.template_comparison([record("a", "query", 20.0, 1.0, 3, False, outcomes=[1, 0])],
                                                 SPACE, "tool_recall")
    assert [s.record.trial_id for s in comparison.sides] == ["a"] and comparison.p_value is None
    assert "fewer than two values have a full-budget trial" in comparison.sentence()
    assert "prompt_template_mcnemar_p" not in full_budget.parent_metrics(comparison, "prompt_template")


def test_a_difference_within_chance_is_said_so():
    same = [1, 0] * 50
    shifted = [0, 1] * 50
    comparison = full_budget.template_comparison(
        [record("a", "query", 20.0, 1.0, 3, False, outcomes=same),
         record("b", "question", 20.0, 2.0, 3, False, outcomes=[1] + shifted[1:])], SPACE, "tool_recall")
    assert "are not told apart on test" in comparison.sentence()


def test_the_pos_weight_contrast_sets_the_lowest_weight_against_the_closest_trial():
    records = [record("best", "query", 15.6, 1.0, 3, False, outcomes=[1] * 95 + [0] * 5),
               record("low", "query", 1.1, 9.0, 3, False, outcomes=[1] * 30 + [0] * 70),
               record("lower-but-stopped", "query", 1.05, 8.0, 1, True, outcomes=[0] * 100)]
    # The lowest tried (1.05) has no full-budget trial yet: no contrast until its rerun.
    assert full_budget.contrast(records, SPACE, "tool_recall") is None
    records.append(record("rerun", "query", 1.05, 9.5, 3, False, outcomes=[1] * 20 + [0] * 80))
    comparison = full_budget.contrast(records, SPACE, "tool_recall")
    assert [s.record.trial_id for s in comparison.sides] == ["best", "rerun"]
    assert comparison.sides[1].label == "pos_weight 1.05 (lowest tried)"
    assert comparison.difference == pytest.approx(0.75)
    assert comparison.sentence().startswith("pos_weight 15.6 (closest trial) beats pos_weight 1.05 (lowest tried)")
    metrics = full_budget.parent_metrics(comparison, "pos_weight")
    assert metrics["pos_weight_lowest_value"] == 1.05 and metrics["pos_weight_closest_value"] == 15.6
    assert metrics["pos_weight_lowest_test_tool_recall"] == pytest.approx(0.2)


def test_the_paired_interval_matches_the_wald_interval_when_the_sample_is_large():
    # 10,000 pairs: 5,000 both, 1,500 first only, 1,000 second only, 2,500 neither.
    first = [True] * 5000 + [True] * 1500 + [False] * 1000 + [False] * 2500
    second = [True] * 5000 + [False] * 1500 + [True] * 1000 + [False] * 2500
    difference, low, high = paired_difference_interval(first, second)
    n, b, c = 10_000, 1500, 1000
    wald_half = 1.959963984540054 * math.sqrt((b + c) / n - ((b - c) / n) ** 2) / math.sqrt(n)
    assert difference == pytest.approx(0.05)
    assert low == pytest.approx(0.05 - wald_half, abs=5e-4) and high == pytest.approx(0.05 + wald_half, abs=5e-4)
    # Swapping the sides mirrors the interval.
    assert paired_difference_interval(second, first) == pytest.approx((-0.05, -high, -low))


def test_the_paired_interval_stays_inside_its_bounds_where_wald_does_not():
    # One discordant pair in 20 (10 both, 1 first only, 9 neither). By hand from Newcombe's
    # formula: Wilson 11/20 = [0.3421, 0.7418], 10/20 = [0.2993, 0.7007], phi = 90 / sqrt(9900)
    # = 0.9045, so 0.05 - sqrt(0.2079^2 - 2 phi 0.2079 0.2007 + 0.2007^2) = -0.0396 and
    # 0.05 + sqrt(0.1918^2 - 2 phi 0.1918 0.2007 + 0.2007^2) = 0.1362. Wald's would be
    # [-0.0455, 0.1455].
    difference, low, high = paired_difference_interval([True] * 11 + [False] * 9, [True] * 10 + [False] * 10)
    assert (difference, low, high) == pytest.approx((0.05, -0.0396, 0.1362), abs=2e-4)
    # All first-only: the difference is 1 and the interval stays below 1 but above 0.
    difference, low, high = paired_difference_interval([True] * 20, [False] * 20)
    assert difference == 1.0 and high == 1.0 and 0.7 < low < 1.0
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference_interval([True], [True, False])
