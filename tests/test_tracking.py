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
            "tool_set_accuracy": success, "eval_examples": 200.0 if full else 32.0, "full_validation_set": float(full),
            "paper_distance": abs(success - 0.78) / 0.03, "best_paper_distance": abs(success - 0.78) / 0.03,
            "sample_plans": json.dumps([{"generated": f"epoch {epoch}"}]), **extra}


def test_the_whole_validation_result_is_the_trials_figure_even_when_a_subset_scored_higher(tmp_path):
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


def _killed_driver_state(tmp_path) -> tuple[SearchTracker, str]:
    """What a SIGKILLed driver leaves in MLflow: one trial ended, one RUNNING after 2 epochs,
    and the parent RUNNING."""
    tracker = _tracker(tmp_path)
    tracker.trial_started("done", {"prompt_template": "instruct", "lora_r": 16}, {"model_path": "/m"})
    tracker.trial_result("done", _planner_result(1, 0.2, full=False, checkpoint_path="/ckpt/done-1"))
    tracker.trial_result("done", _planner_result(2, 0.5, full=True))
    tracker.trial_ended("done", "FINISHED")
    tracker.trial_started("mid", {"prompt_template": "chat", "lora_r": 8}, {"model_path": "/m"})
    tracker.trial_result("mid", _planner_result(1, 0.1, full=False, checkpoint_path="/ckpt/mid-1"))
    tracker.trial_result("mid", _planner_result(2, 0.05, full=False))
    return tracker, tracker.parent_run_id


def test_a_resumed_search_rebuilds_its_trials_from_mlflow_and_closes_what_the_dead_driver_left(tmp_path):
    live, parent_id = _killed_driver_state(tmp_path)
    resumed = SearchTracker(f"sqlite:///{tmp_path / 'm.db'}", "exp", max_epochs=3)
    found = resumed.reattach(parent_id, ["prompt_template", "lora_r"])
    assert found == {"finished": 1, "failed": 0, "interrupted": 1}
    done, mid = resumed.trials["done"], resumed.trials["mid"]
    # The same figures the live tracker chose: the whole-set epoch, and the checkpoint to register.
    assert done.best["epoch"] == live.trials["done"].best["epoch"] == 2
    assert done.best["plan_success"] == 0.5 and done.checkpoint_path == "/ckpt/done-1"
    assert done.params == {"prompt_template": "instruct", "lora_r": 16}
    assert mid.best["epoch"] == 1 and mid.epochs == 2
    # The interrupted run is KILLED and says why; the parent is open again, marked resumed.
    run = resumed.client.get_run(mid.run_id)
    assert run.info.status == "KILLED" and run.data.tags["interrupted_by_driver_stop"] == "true"
    parent = resumed.client.get_run(parent_id)
    assert parent.info.status == "RUNNING" and parent.data.tags["resumed"] == "1"
    assert [r.trial_id for r in resumed.lost_trials()] == ["mid"]


def test_a_resumed_trial_reopens_its_run_and_an_ended_one_is_left_alone(tmp_path):
    _, parent_id = _killed_driver_state(tmp_path)
    resumed = SearchTracker(f"sqlite:///{tmp_path / 'm.db'}", "exp", max_epochs=3)
    resumed.reattach(parent_id, ["prompt_template", "lora_r"])
    done_run = resumed.client.get_run(resumed.trials["done"].run_id)
    # Tune restarts both: the interrupted one to continue, the ended one only to replay its result.
    for trial in ("mid", "done"):
        resumed.trial_started(trial, {}, {})
    resumed.trial_result("mid", _planner_result(3, 0.3, full=True, resumed_from_epoch=1))
    resumed.trial_result("done", _planner_result(2, 0.5, full=True, replayed_final_result=1))
    resumed.trial_ended("mid", "FINISHED")
    resumed.trial_ended("done", "FINISHED")
    resumed.finish_parent("FINISHED", {"trials_total": 2})

    mid = resumed.client.get_run(resumed.trials["mid"].run_id)
    assert mid.info.status == "FINISHED" and mid.data.tags["resumed_after_driver_stop"] == "true"
    assert mid.data.metrics["final_plan_success"] == 0.3
    assert resumed.lost_trials() == [] and resumed.replayed == 1
    after = resumed.client.get_run(done_run.info.run_id)
    assert (after.info.end_time, after.data.metrics) == (done_run.info.end_time, done_run.data.metrics)
    assert len(resumed.client.get_metric_history(after.info.run_id, "plan_success")) == 2
    assert resumed.client.get_run(parent_id).info.status == "FINISHED"


def test_test_figures_are_logged_once_and_play_no_part_in_the_ranking(tmp_path):
    """The closest trial is chosen on validation even when another trial does better on test,
    and a resumed search finds the test figures again instead of scoring twice."""
    tracker = _tracker(tmp_path)
    for trial, validation in (("val-best", 0.70), ("val-worse", 0.50)):
        tracker.trial_started(trial, {}, {})
        tracker.trial_result(trial, _planner_result(3, validation, full=True))
        tracker.trial_ended(trial, "FINISHED")
    tracker.record_test("val-best", {"plan_success": 0.40, "plan_success_ci_low": 0.3, "plan_success_ci_high": 0.5,
                                     "paper_distance": 12.7, "eval_examples": 200.0}, [{"generated": "x"}])
    tracker.record_test("val-worse", {"plan_success": 0.78, "plan_success_ci_low": 0.7, "plan_success_ci_high": 0.85,
                                      "paper_distance": 0.0, "eval_examples": 200.0}, [])
    assert [r.trial_id for r in tracker.ranked()] == ["val-best", "val-worse"]
    run = tracker.client.get_run(tracker.trials["val-best"].run_id)
    assert run.data.metrics["test_plan_success"] == 0.40 and run.data.metrics["test_plan_success_ci_low"] == 0.3
    assert run.data.metrics["final_plan_success"] == 0.70, "the final_* figures stay the validation ones"
    assert "sample_plans/test.json" in {a.path for a in tracker.client.list_artifacts(run.info.run_id, "sample_plans")}
    parent_id = tracker.parent_run_id
    resumed = SearchTracker(f"sqlite:///{tmp_path / 'm.db'}", "exp", max_epochs=3)
    resumed.reattach(parent_id, [])
    assert resumed.trials["val-best"].test["plan_success"] == 0.40
    assert resumed.trials["val-worse"].test["paper_distance"] == 0.0


def _toolrag_trial(tracker: SearchTracker, trial_id: str, distance: float, full: bool = True) -> None:
    tracker.trial_started(trial_id, {"pos_weight": 60.0}, {})
    tracker.trial_result(trial_id, {"epoch": 1, "tool_recall": 0.99, "tool_count": 3.0, "paper_distance": distance,
                                    "full_validation_set": float(full)})
    tracker.trial_ended(trial_id, "FINISHED")


def test_each_familys_best_is_found_across_experiments_on_the_same_data_split_only(tmp_path):
    """The closing table's side-by-side comparison: every search of the task on the same data
    split counts, whichever experiment it ran in; other data and other tasks do not."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"

    def search(experiment: str, family: str, split: str, task: str = "toolrag") -> SearchTracker:
        tracker = SearchTracker(uri, experiment, max_epochs=1, trial_tags={
            "model": f"{task}-{family}", "task": task, "family": family, "data_split": split})
        tracker.start_parent("parent", {}, {}, [])
        return tracker

    transformer = search("transformer-search", "transformer", "split-a")
    _toolrag_trial(transformer, "t-far", 9.0)
    _toolrag_trial(transformer, "t-near", 4.0)
    transformer.record_test("t-near", {"tool_recall": 0.98, "paper_distance": 5.0}, [])
    linear = search("linear-search", "linear", "split-a")
    _toolrag_trial(linear, "l-near", 2.0)
    _toolrag_trial(linear, "l-subset", 0.5, full=False)  # scored on a subset only: never the best
    other_data = search("other-data", "linear", "split-b")
    _toolrag_trial(other_data, "l-other-data", 0.1)
    other_task = search("planner-search", "transformer", "split-a", task="planner")
    _toolrag_trial(other_task, "p-other-task", 0.1)

    bests = transformer.best_per_family("toolrag", "split-a")
    assert [(b["family"], b["trial_id"], b["experiment"]) for b in bests] == [
        ("linear", "l-near", "linear-search"), ("transformer", "t-near", "transformer-search")]
    assert bests[0]["validation"]["paper_distance"] == 2.0 and bests[0]["test"] is None
    assert bests[1]["test"] == {"tool_recall": 0.98, "paper_distance": 5.0}
