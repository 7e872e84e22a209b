"""SearchTracker against a real MLflow sqlite store, fed the results a trial reports."""

from __future__ import annotations

import json
import re

from tuning.mlflow_store import best_per_family
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

    bests = best_per_family(transformer.client, "toolrag", "split-a")
    assert [(b["family"], b["trial_id"], b["experiment"]) for b in bests] == [
        ("linear", "l-near", "linear-search"), ("transformer", "t-near", "transformer-search")]
    assert bests[0]["validation"]["paper_distance"] == 2.0 and bests[0]["test"] is None
    assert bests[1]["test"] == {"tool_recall": 0.98, "paper_distance": 5.0}


def test_the_experiment_opens_in_the_training_view_and_trials_are_named_by_their_settings(tmp_path):
    from tuning.mlflow_store import model_development_experiment
    from tuning.tracking import trial_run_name

    tracker = _tracker(tmp_path)
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # An experiment made before (or by hand) gets the tag too.
    other = tracker.client.create_experiment("made-elsewhere")
    assert model_development_experiment(tracker.client, "made-elsewhere") == other
    assert tracker.client.get_experiment(other).tags["mlflow.experimentKind"] == "custom_model_development"

    params = {"pos_weight": 15.64114, "learning_rate": 0.000601, "batch_size": 8, "prompt_template": "instruction"}
    assert trial_run_name("44286e02", params) == "instruction batch=8 lr=0.0006 pos_weight=15.6 (44286e02)"
    tracker.trial_started("44286e02", params, {})
    assert tracker.client.get_run(tracker.trials["44286e02"].run_id).info.run_name == trial_run_name("44286e02", params)


def test_the_splits_are_dataset_inputs_of_the_parent_and_of_each_trial_as_it_uses_them(tmp_path):
    from tuning.mlflow_store import TEST_CONTEXT, TRAIN_CONTEXT, VALIDATION_CONTEXT, dataset_input

    datasets = {context: dataset_input(f"data/{context}", context, f"digest-{context}", "/data", rows=rows)
                for context, rows in ((TRAIN_CONTEXT, 90), (VALIDATION_CONTEXT, 10), (TEST_CONTEXT, 50))}
    tracker = SearchTracker(f"sqlite:///{tmp_path / 'm.db'}", "exp", max_epochs=3, datasets=datasets)
    tracker.start_parent("parent", {}, {}, [])

    def inputs(run_id):
        found = tracker.client.get_run(run_id).inputs.dataset_inputs
        return {d.dataset.digest: (d.tags[0].value, json.loads(d.dataset.profile)["num_rows"]) for d in found}

    assert inputs(tracker.parent_run_id) == {"digest-training": ("training", 90), "digest-validation": ("validation", 10),
                                             "digest-test": ("test", 50)}
    tracker.trial_started("t1", {}, {})
    run_id = tracker.trials["t1"].run_id
    assert set(inputs(run_id)) == {"digest-training", "digest-validation"}, "no test data before it is scored"
    tracker.record_test("t1", {"paper_distance": 1.0}, [])
    assert set(inputs(run_id)) == {"digest-training", "digest-validation", "digest-test"}


def test_search_progress_counts_trials_and_estimates_what_is_left(tmp_path):
    import io

    from tuning.console import SearchProgress

    tracker = _tracker(tmp_path)
    out = io.StringIO()
    progress = SearchProgress(tracker, total=6, max_concurrent=2, time_budget_s=None, log_file=None,
                              started=__import__("time").time() - 120, out=out)

    class Trial:
        def __init__(self, trial_id):
            self.trial_id, self.error_file = trial_id, None

    for trial_id, success, full in (("a", 0.70, True), ("b", 0.50, False), ("c", 0.60, True)):
        tracker.trial_started(trial_id, {"prompt_template": "instruct", "learning_rate": 0.002}, {})
        progress.on_trial_start(0, [], Trial(trial_id))
        tracker.trial_result(trial_id, _planner_result(3, success, full))
    tracker.trial_ended("a", "FINISHED")
    progress.on_trial_complete(0, [], Trial("a"))
    tracker.trial_ended("b", "FAILED", "Traceback ...\nValueError: no_such_proj")
    progress.on_trial_error(0, [], Trial("b"))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[search] 1/6 trials ended (0 stopped early, 0 failed), 2 running")
    assert "closest so far: distance 2.667, trial a (learning_rate=0.002, prompt_template=instruct)" in lines[0]
    assert lines[1] == "[trial b] failed: ValueError: no_such_proj (full log: the MLflow run)"
    assert lines[2].startswith("[search] 2/6 trials ended (0 stopped early, 1 failed), 1 running")
    # 2 trials ended in about 120 s: the 4 left take about 240 s more.
    assert re.search(r"\| 2m0\ds elapsed, ~(3m5\d|4m0\d)s left$", lines[2]), lines[2]
    assert progress.remaining_s(done=2, elapsed=120) == 240
    assert "\r" not in out.getvalue(), "no live line when the output is not a terminal"

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    live = SearchProgress(tracker, total=6, max_concurrent=2, time_budget_s=None, log_file=None, out=terminal)
    live.on_step_end(0, [])
    live.on_step_end(0, [])  # within a second: not redrawn
    assert terminal.getvalue().count("\r\033[K[search] 2/6 trials ended") == 1 and not terminal.getvalue().endswith("\n")
    live.on_trial_complete(0, [], Trial("c"))
    # The live line is wiped before the ended trial's line is written on its own line.
    assert terminal.getvalue().endswith("\r\033[K" + live.line() + "\n")
    budgeted = SearchProgress(tracker, total=6, max_concurrent=2, time_budget_s=150, log_file=None)
    assert budgeted.remaining_s(done=2, elapsed=120) == 30


def test_the_untuned_base_row_is_logged_on_the_parent_and_read_back_on_resume(tmp_path):
    tracker = _tracker(tmp_path)
    val = {"plan_success": 0.05, "eval_examples": 200.0}
    test = {"plan_success": 0.1, "plan_success_ci_low": 0.06, "plan_success_ci_high": 0.15, "eval_examples": 200.0,
            "prompts_cut": 200.0, "per_example": float("nan")}
    tracker.record_untuned({"val": val, "test": test}, {"test": [{"generated": "1. join()"}], "val": []})
    parent = tracker.client.get_run(tracker.parent_run_id)
    assert parent.data.metrics["untuned_val_plan_success"] == 0.05
    assert parent.data.metrics["untuned_test_plan_success_ci_high"] == 0.15
    assert "untuned_test_per_example" not in parent.data.metrics  # only finite figures
    resumed = SearchTracker(tracker.tracking_uri, "exp", max_epochs=3)
    resumed.reattach(tracker.parent_run_id, ["prompt_template"])
    assert resumed.untuned == {"val": val, "test": {k: v for k, v in test.items() if k != "per_example"}}


def test_a_stopped_search_says_why_until_it_is_resumed(tmp_path):
    tracker, parent_id = _killed_driver_state(tmp_path)
    tracker.finish_parent("KILLED", {}, reason="the search was stopped by SIGTERM; --resume continues it")
    assert "--resume" in tracker.client.get_run(parent_id).data.tags["stopped_because"]
    assert tracker.client.get_run(tracker.trials["mid"].run_id).data.tags["error"].startswith("the search was stopped")
    resumed = SearchTracker(f"sqlite:///{tmp_path / 'm.db'}", "exp", max_epochs=3)
    resumed.reattach(parent_id, ["prompt_template", "lora_r"])
    assert "stopped_because" not in resumed.client.get_run(parent_id).data.tags
