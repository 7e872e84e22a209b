"""The figures of a finished search: which are drawn, and that each plots the trials' own figures."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import pytest

from trainers.registry import MODELS
from tuning.plots import (
    CLOSEST_LABEL,
    FRONT_LABEL,
    RUNNING_BEST_LABEL,
    STOPPED_LABEL,
    TEST_LABEL,
    TRIAL_LABEL,
    VALIDATION_LABEL,
    PlotInput,
    figure_png,
    search_figures,
)
from tuning.trial_records import pareto_front
from tuning.trial_records import TrialRecord

TOOLRAG = MODELS["toolrag"]
PLANNER = MODELS["planner"]
TOOLRAG_TARGETS = {"tool_recall": {"value": 0.99, "tolerance": 0.01}, "tool_count": {"value": 3.97, "tolerance": 0.1}}
PLANNER_TARGETS = {"plan_success": {"value": 0.78, "tolerance": 0.03},
                   "plan_success_with_toolrag": {"value": 0.8006, "tolerance": 0.03}}
TOOLRAG_SPACE = {"pos_weight": {"type": "loguniform", "low": 1.0, "high": 150.0},
                 "learning_rate": {"type": "loguniform", "low": 1e-5, "high": 3e-4},
                 "batch_size": {"type": "choice", "values": [16, 32, 64, 128]}}
PLANNER_SPACE = {"learning_rate": {"type": "loguniform", "low": 1e-5, "high": 3e-4},
                 "prompt_template": {"type": "choice", "values": ["concat", "instruct", "chat"]},
                 "lora_r": {"type": "randint", "low": 4, "high": 64}}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _interval(figures: dict, metric: str, value: float, half: float) -> dict:
    figures.update({metric: value, f"{metric}_ci_low": value - half, f"{metric}_ci_high": value + half})
    return figures


def _toolrag_trial(trial_id: str, started: float, distance: float, pos_weight: float, recall: float, count: float,
                   stopped_early: bool = False, learning_rate: float = 4e-5, batch_size: int = 32) -> TrialRecord:
    record = TrialRecord(trial_id, f"run-{trial_id}",
                         {"pos_weight": pos_weight, "learning_rate": learning_rate, "batch_size": batch_size},
                         started=started, status="FINISHED", stopped_early=stopped_early)
    best = {"paper_distance": distance, "gold_tool_count": 3.0, "epoch": 2, "full_validation_set": 1.0}
    record.best = _interval(_interval(best, "tool_recall", recall, 0.01), "tool_count", count, 0.1)
    return record


def _planner_trial(trial_id: str, started: float, distance: float, template: str, success: float,
                   full: bool = True, test_success: float | None = None, learning_rate: float = 7e-5,
                   lora_r: int = 16) -> TrialRecord:
    record = TrialRecord(trial_id, f"run-{trial_id}",
                         {"learning_rate": learning_rate, "prompt_template": template, "lora_r": lora_r},
                         started=started, status="FINISHED", stopped_early=not full)
    record.best = _interval({"paper_distance": distance, "epoch": 3, "full_validation_set": 1.0 if full else 0.0},
                            "plan_success", success, 0.04)
    if test_success is not None:
        record.test = _interval({"paper_distance": distance + 0.5}, "plan_success", test_success, 0.05)
    return record


def _ranked(records: list[TrialRecord]) -> list[TrialRecord]:
    return sorted((r for r in records if r.best), key=lambda r: r.objective)


def _toolrag_trials() -> list[TrialRecord]:
    """Five trials, in start order, that differ in every searched setting; c was stopped by ASHA."""
    return [
        _toolrag_trial("a", 100.0, 4.0, 60.0, 0.97, 3.9, learning_rate=4e-5, batch_size=128),
        _toolrag_trial("b", 200.0, 9.0, 5.0, 0.90, 2.1, learning_rate=2e-4, batch_size=16),
        _toolrag_trial("c", 300.0, 12.0, 2.0, 0.88, 1.9, stopped_early=True, learning_rate=1e-5, batch_size=32),
        _toolrag_trial("d", 400.0, 1.5, 90.0, 0.985, 4.1, learning_rate=6e-5, batch_size=64),
        _toolrag_trial("e", 500.0, 6.0, 20.0, 0.95, 3.2, learning_rate=1e-4, batch_size=16),
    ]


def _toolrag_input(records: list[TrialRecord], objective: str = "distance", paper: dict | None = None,
                   searched: dict | None = None) -> PlotInput:
    ranked = _ranked(records)
    histories = {r.trial_id: {"paper_distance": [(1, r.objective + 1.0), (2, r.objective)]} for r in ranked}
    return PlotInput(records=records, ranked=ranked, spec=TOOLRAG,
                     paper=paper or TOOLRAG.paper_figures(TOOLRAG_TARGETS, {}),
                     searched=TOOLRAG_SPACE if searched is None else searched, objective=objective,
                     histories=histories, max_epochs=3)


def _planner_input(records: list[TrialRecord], objective: str = "distance") -> PlotInput:
    ranked = _ranked(records)
    return PlotInput(records=records, ranked=ranked, spec=PLANNER, paper=PLANNER.paper_figures(PLANNER_TARGETS, {}),
                     searched=PLANNER_SPACE, objective=objective,
                     histories={r.trial_id: {"paper_distance": [(3, r.objective)]} for r in ranked}, max_epochs=3)


def _collection(ax, label: str):
    return next(c for c in ax.collections if c.get_label() == label)


def _container(ax, label: str):
    return next(c for c in ax.containers if c.get_label() == label)


def test_a_recall_count_model_gets_its_pos_weight_figure_and_the_pareto_one_only_under_that_objective():
    common = {"optimisation_history", "param_importances", "slices", "pos_weight", "epoch_curves"}
    assert set(search_figures(_toolrag_input(_toolrag_trials()))) == common
    assert set(search_figures(_toolrag_input(_toolrag_trials(), objective="pareto"))) == common | {"pareto"}
    without_pos_weight = {k: v for k, v in TOOLRAG_SPACE.items() if k != "pos_weight"}
    assert "pos_weight" not in search_figures(_toolrag_input(_toolrag_trials(), searched=without_pos_weight))


def test_a_model_with_a_searched_template_gets_the_template_figure_and_no_pareto_without_pareto_figures():
    records = [_planner_trial("p1", 1.0, 1.0, "instruct", 0.75, learning_rate=7e-5, lora_r=16),
               _planner_trial("p2", 2.0, 3.0, "concat", 0.69, learning_rate=2e-4, lora_r=8),
               _planner_trial("p3", 3.0, 2.0, "instruct", 0.72, learning_rate=3e-5, lora_r=64)]
    figures = search_figures(_planner_input(records, objective="pareto"))
    assert set(figures) == {"optimisation_history", "param_importances", "slices", "templates", "epoch_curves"}


def test_nothing_is_drawn_empty():
    failed = TrialRecord("f", "run-f", {}, started=1.0, status="FAILED")
    assert search_figures(_toolrag_input([failed])) == {}
    # One scored trial: a history, but no slices (nothing to compare) and no importances.
    assert set(search_figures(_toolrag_input([failed, _toolrag_trials()[0]]))) == {
        "optimisation_history", "pos_weight", "epoch_curves"}
    assert "slices" not in search_figures(_toolrag_input(_toolrag_trials(), searched={}))


def test_importances_need_three_whole_validation_trials_and_a_setting_that_varies():
    trials = _toolrag_trials()
    assert "param_importances" not in search_figures(_toolrag_input(trials[:2]))
    same = [_toolrag_trial(t, float(i), float(i + 1), 60.0, 0.9, 3.0) for i, t in enumerate("xyz")]
    assert "param_importances" not in search_figures(_toolrag_input(same))
    # Settings vary but every distance is equal: nothing to attribute.
    level = [_toolrag_trial(t, float(i), 2.0, 5.0 * (i + 1), 0.9, 3.0) for i, t in enumerate("xyz")]
    assert "param_importances" not in search_figures(_toolrag_input(level))
    subset = trials[:3]
    subset[2].best["full_validation_set"] = 0.0  # scored on the per-epoch subset: does not count
    assert "param_importances" not in search_figures(_toolrag_input(subset))
    # Only pos_weight varies: it is the one bar.
    varied = [_toolrag_trial(t, float(i), d, w, 0.9, 3.0) for i, (t, d, w) in enumerate(
        [("x", 1.0, 60.0), ("y", 5.0, 5.0), ("z", 3.0, 20.0), ("w", 2.0, 40.0)])]
    (ax,) = search_figures(_toolrag_input(varied))["param_importances"].axes
    assert [label.get_text() for label in ax.get_yticklabels()] == ["pos_weight"]
    assert [patch.get_width() for patch in ax.patches] == pytest.approx([1.0])
    (ax,) = search_figures(_toolrag_input(trials))["param_importances"].axes
    assert {label.get_text() for label in ax.get_yticklabels()} == set(TOOLRAG_SPACE)
    assert sum(patch.get_width() for patch in ax.patches) == pytest.approx(1.0)


def test_history_draws_the_running_best_in_start_order_and_marks_early_stopped_trials():
    trials = _toolrag_trials()
    failed = TrialRecord("f", "run-f", {}, started=250.0, status="FAILED")
    records = [trials[3], failed, trials[0], trials[4], trials[2], trials[1]]  # not in start order
    (ax,) = search_figures(_toolrag_input(records))["optimisation_history"].axes
    # Start order: a, b, f (failed, number 3), c, d, e.
    numbers, distances = [1, 2, 4, 5, 6], [4.0, 9.0, 12.0, 1.5, 6.0]
    running = next(line for line in ax.lines if line.get_label() == RUNNING_BEST_LABEL)
    assert list(running.get_xdata()) == numbers
    assert list(running.get_ydata()) == list(itertools.accumulate(distances, min))
    assert _collection(ax, STOPPED_LABEL).get_offsets().tolist() == [[4, 12.0]]
    assert sorted(_collection(ax, TRIAL_LABEL).get_offsets().tolist()) == [[1, 4.0], [2, 9.0], [5, 1.5], [6, 6.0]]
    assert "lower is closer to the paper" in ax.get_title() and "1 trial(s) without a result" in ax.get_title()


def test_pos_weight_panels_plot_each_trials_best_figures_against_the_paper_band():
    trials = _toolrag_trials()
    recall_ax, count_ax = search_figures(_toolrag_input(trials))["pos_weight"].axes
    points = _container(recall_ax, TRIAL_LABEL).lines[0]
    ranked = _ranked(trials)
    assert list(points.get_xdata()) == [r.params["pos_weight"] for r in ranked]
    assert list(points.get_ydata()) == [r.best["tool_recall"] for r in ranked]
    assert recall_ax.get_xscale() == "log" and recall_ax.get_shared_x_axes().joined(recall_ax, count_ax)
    (band,) = recall_ax.patches
    assert (band.get_y(), band.get_y() + band.get_height()) == pytest.approx((0.98, 1.0))
    assert _collection(recall_ax, CLOSEST_LABEL).get_offsets().tolist() == [[90.0, 0.985]]
    counts = _container(count_ax, TRIAL_LABEL).lines[0]
    assert list(counts.get_ydata()) == [r.best["tool_count"] for r in ranked]


def test_a_count_target_relative_to_the_gold_count_is_placed_with_the_trials_mean_gold_count():
    trials = _toolrag_trials()
    trials[0].best["gold_tool_count"] = 2.0  # the others need 3.0 tools: mean 2.8
    paper = {"tool_recall": TOOLRAG_TARGETS["tool_recall"],
             "tool_count": {"value": 1.0, "tolerance": 0.1, "relative_to": "gold_tool_count"}}
    _, count_ax = search_figures(_toolrag_input(trials, paper=paper))["pos_weight"].axes
    (band,) = count_ax.patches
    assert (band.get_y(), band.get_y() + band.get_height()) == pytest.approx((3.7, 3.9))


def test_pareto_highlights_exactly_the_front():
    trials = _toolrag_trials()
    trials.append(_toolrag_trial("g", 600.0, 20.0, 3.0, 0.80, 5.0))  # dominated by every other trial
    (ax,) = search_figures(_toolrag_input(trials, objective="pareto"))["pareto"].axes
    front_line = next(line for line in ax.lines if line.get_label() == FRONT_LABEL)
    front = pareto_front(_ranked(trials), TOOLRAG.pareto)
    assert sorted(zip(front_line.get_xdata(), front_line.get_ydata())) == sorted(
        (r.best["tool_count"], r.best["tool_recall"]) for r in front)
    assert len(front) < len(trials) and "g" not in {r.trial_id for r in front}
    assert len(_collection(ax, TRIAL_LABEL).get_offsets()) == len(trials)


def test_templates_show_each_templates_best_whole_validation_figure_and_its_test_one():
    records = [_planner_trial("p1", 1.0, 2.0, "instruct", 0.74, test_success=0.71),
               _planner_trial("p2", 2.0, 1.0, "instruct", 0.77, test_success=0.76),
               _planner_trial("p3", 3.0, 4.0, "concat", 0.66),
               _planner_trial("p4", 4.0, 3.0, "chat", 0.80, full=False)]  # only scored on the subset
    (ax,) = search_figures(_planner_input(records))["templates"].axes
    assert [label.get_text() for label in ax.get_xticklabels()] == ["concat", "instruct", "chat"]
    validation = _container(ax, VALIDATION_LABEL).lines[0]
    assert [round(x) for x in validation.get_xdata()] == [0, 1]
    assert list(validation.get_ydata()) == [0.66, 0.77]
    test = _container(ax, TEST_LABEL).lines[0]
    assert [round(x) for x in test.get_xdata()] == [1] and list(test.get_ydata()) == [0.76]
    (label,) = [text for text in ax.texts if text.get_text() == "stopped early"]
    assert label.get_position()[0] == 2
    (band,) = ax.patches
    assert (band.get_y(), band.get_y() + band.get_height()) == pytest.approx((0.75, 0.81))
    assert "plan_success" in ax.get_title()


def test_slices_put_choices_at_their_positions_and_ring_the_closest_trial():
    trials = _toolrag_trials()
    axes = search_figures(_toolrag_input(trials))["slices"].axes
    pos_weight_ax, _, batch_ax = (ax for ax in axes if ax.get_visible())
    assert pos_weight_ax.get_xscale() == "log"
    assert _collection(pos_weight_ax, STOPPED_LABEL).get_offsets().tolist() == [[2.0, 12.0]]
    assert _collection(batch_ax, CLOSEST_LABEL).get_offsets().tolist() == [[2, 1.5]]  # d: batch 64, third choice
    assert [label.get_text() for label in batch_ax.get_xticklabels()] == ["16", "32", "64", "128"]


def test_epoch_curves_draw_the_five_closest_trials_by_epoch():
    trials = _toolrag_trials() + [_toolrag_trial("f", 600.0, 30.0, 1.0, 0.5, 1.0)]
    data = _toolrag_input(trials)
    (ax,) = search_figures(data)["epoch_curves"].axes
    assert [line.get_label() for line in ax.lines] == [r.trial_id for r in data.ranked[:5]]
    assert [list(zip(line.get_xdata(), line.get_ydata())) for line in ax.lines] == [
        data.histories[r.trial_id]["paper_distance"] for r in data.ranked[:5]]


def test_figures_are_png_ready_and_never_go_through_pyplot():
    figures = search_figures(_toolrag_input(_toolrag_trials()))
    assert figure_png(figures["optimisation_history"]).startswith(b"\x89PNG\r\n\x1a\n")
    assert plt.get_fignums() == []  # no pyplot figure (no window, nothing left open)
    for fig in figures.values():
        plt.close(fig)

