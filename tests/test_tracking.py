"""SearchTracker against a real MLflow sqlite store, fed the results a trial reports."""

from __future__ import annotations

import json

from tuning.tracking import SearchTracker


def _tracker(tmp_path) -> SearchTracker:
    tracker = SearchTracker(f"sqlite:///{tmp_path / 'm.db'}", "exp", max_epochs=3,
                            artifact_location=(tmp_path / "artifacts").as_uri())
    tracker.start_parent("parent", {"model": "planner"}, {}, [])
    return tracker


def _planner_result(epoch: int, success: float, full: bool, **extra) -> dict:
    return {"epoch": epoch, "plan_success": success, "plan_success_ci_low": 0.0, "plan_success_ci_high": 1.0,
            "tool_set_accuracy": success, "eval_examples": 200.0 if full else 32.0, "full_test_set": float(full),
            "paper_distance": abs(success - 0.78) / 0.03, "best_paper_distance": abs(success - 0.78) / 0.03,
            "sample_plans": json.dumps([{"generated": f"epoch {epoch}"}]), **extra}


def test_the_whole_test_set_result_is_the_trials_figure_even_when_a_subset_scored_higher(tmp_path):
    tracker = _tracker(tmp_path)
    tracker.trial_started("t1", {"prompt_template": "instruct"}, {})
    tracker.trial_result("t1", _planner_result(1, 0.30, full=False))  # a lucky 32-example subset
    tracker.trial_result("t1", _planner_result(2, 0.20, full=True))
    tracker.trial_ended("t1", "FINISHED")
    assert tracker.trials["t1"].best["epoch"] == 2
    run = tracker.client.get_run(tracker.trials["t1"].run_id)
    assert run.data.metrics["final_plan_success"] == 0.20 and run.data.metrics["final_eval_examples"] == 200
    artifacts = {a.path for a in tracker.client.list_artifacts(run.info.run_id, "sample_plans")}
    assert artifacts == {"sample_plans/epoch-001.json", "sample_plans/epoch-002.json"}


def test_trials_scored_on_the_whole_set_rank_before_early_stopped_ones(tmp_path):
    tracker = _tracker(tmp_path)
    for trial, result in (("stopped", _planner_result(1, 0.75, full=False)), ("done", _planner_result(3, 0.5, full=True))):
        tracker.trial_started(trial, {}, {})
        tracker.trial_result(trial, result)
    assert [r.trial_id for r in tracker.ranked()] == ["done", "stopped"]


def test_a_resumed_worker_group_is_tagged_as_a_retry(tmp_path):
    tracker = _tracker(tmp_path)
    tracker.trial_started("t1", {}, {})
    tracker.trial_result("t1", _planner_result(1, 0.1, full=False))
    run_id = tracker.trials["t1"].run_id
    assert "retried" not in tracker.client.get_run(run_id).data.tags
    tracker.trial_result("t1", _planner_result(2, 0.1, full=False, resumed_from_epoch=1))
    tags = tracker.client.get_run(run_id).data.tags
    assert tags["retried"] == "true" and tags["resumed_from_epoch"] == "1"


def test_a_trial_that_raised_is_failed_with_its_reason_and_nothing_stays_running(tmp_path):
    tracker = _tracker(tmp_path)
    tracker.trial_started("ok", {}, {})
    tracker.trial_ended("bad", "FAILED", "ValueError: Target modules {'no_such_proj'} not found")
    tracker.finish_parent("FINISHED", {"trials_total": 2})
    bad = tracker.client.get_run(tracker.trials["bad"].run_id)
    assert bad.info.status == "FAILED" and "no_such_proj" in bad.data.tags["error"]
    assert tracker.client.get_run(tracker.trials["ok"].run_id).info.status == "KILLED"
