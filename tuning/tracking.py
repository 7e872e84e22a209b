"""MLflow tracking of a search: one parent run, one child run per trial, the closest marked.

All logging happens in the search driver (a Tune callback), not in trials: trials run on
other nodes and may be killed, while the driver sees every start, result, stop and error
and can close each run with its true status.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

PARENT_TAG = "mlflow.parentRunId"
# On a trial's run: the driver stopped while it ran (SIGKILL, a lost head). The run was closed
# as KILLED when the search resumed, and reopened if the trial resumed with it.
INTERRUPTED_TAG = "interrupted_by_driver_stop"
CHECKPOINT_TAG = "checkpoint_path"
# Result keys worth a per-epoch curve in MLflow; the rest are Ray's bookkeeping.
# Every one is a validation figure: the test split is scored once per trial, after the search,
# and logged under TEST_PREFIX.
EPOCH_METRIC_PREFIXES = ("tool_", "paper_distance", "best_paper_distance", "train_loss", "recall/",
                         "padding_waste", "cpu_seconds", "gpu_seconds", "plan_", "strict_plan_", "empty_output_rate",
                         "eval_examples", "full_validation_set", "resumed_from_epoch", "examples_over_max_length",
                         "prompts_cut")
TEST_PREFIX = "test_"
# Set on a trial's run when scoring its checkpoint on the test split raised.
TEST_ERROR_TAG = "test_error"
# Best-epoch figures copied to `final_*` metrics when a trial ends (those a model reports).
FINAL_KEYS = ("tool_recall", "tool_recall_ci_low", "tool_recall_ci_high", "tool_count", "tool_count_ci_low",
              "tool_count_ci_high", "tool_precision", "plan_success", "plan_success_ci_low", "plan_success_ci_high",
              "tool_set_accuracy", "plan_parse_rate", "strict_plan_success", "eval_examples", "paper_distance", "epoch")


@dataclass
class TrialRecord:
    trial_id: str
    run_id: str
    params: dict[str, Any]
    started: float = field(default_factory=time.time)
    epochs: int = 0
    best: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    checkpoint_path: str | None = None
    status: str = "RUNNING"
    stopped_early: bool = False
    error: str | None = None
    resumed_from: str | None = None
    # Ended under an earlier driver: Tune may still replay its final result after a resume,
    # which must not touch the run again.
    ended_before_resume: bool = False
    interrupted: bool = False
    # The best checkpoint's figures on the test split (keys without TEST_PREFIX), once scored.
    test: dict[str, float] | None = None

    @property
    def objective(self) -> float:
        return self.best["paper_distance"] if self.best else math.inf


def _better(result: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """Whether `result` should replace a trial's best so far.

    A planner trial's last report scores the whole validation split, the others a subset; the
    whole split wins. Otherwise (every ToolRAG epoch scores the whole split) the lower distance
    wins.
    """
    if best is None:
        return True
    full, best_full = _full_validation(result), _full_validation(best)
    if full != best_full:
        return full
    return result["paper_distance"] < best["paper_distance"]


def _full_validation(result: dict[str, Any]) -> bool:
    """Whether a result scores the whole validation split (every ToolRAG epoch does)."""
    return result.get("full_validation_set", 1.0) == 1.0


class SearchTracker:
    """Owns the parent run and the child runs; `callback()` plugs it into Tune."""

    def __init__(self, tracking_uri: str, experiment_name: str, max_epochs: int, artifact_location: str | None = None):
        """artifact_location: where a new experiment keeps artifacts. Left None, a sqlite store
        puts them in ./mlruns of whatever directory the search was started from."""
        self.client = MlflowClient(tracking_uri=tracking_uri)
        experiment = self.client.get_experiment_by_name(experiment_name)
        self.experiment_id = (experiment.experiment_id if experiment
                              else self.client.create_experiment(experiment_name, artifact_location=artifact_location))
        self.max_epochs = max_epochs
        self.parent_run_id: str | None = None
        self.trials: dict[str, TrialRecord] = {}
        # Trials that had ended before a resume and that Tune restarted only to replay their result.
        self.replayed = 0

    # ----- parent run -------------------------------------------------------------------
    def start_parent(self, run_name: str, params: dict[str, Any], tags: dict[str, str], files: list[Path]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={"search": "parent", **tags, **driver_identity()})
        self.parent_run_id = run.info.run_id
        self._log_params(self.parent_run_id, params)
        for path in files:
            self.client.log_artifact(self.parent_run_id, str(path), artifact_path="config")
        return self.parent_run_id

    def log_parent_metrics(self, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])

    def reattach(self, parent_run_id: str, searched_keys: list[str]) -> dict[str, int]:
        """Continue an interrupted search's parent run, with every trial it already recorded.

        Runs the dead driver left RUNNING are closed as KILLED and tagged; a trial Tune resumes
        reopens its run (`trial_started`). Returns counts of the trials found, by state.
        """
        parent = self.client.get_run(parent_run_id)
        self.parent_run_id = parent_run_id
        resumes = int(parent.data.tags.get("resumed", "0")) + 1
        self.client.log_batch(parent_run_id, tags=[RunTag("resumed", str(resumes)),
                                                   *(RunTag(k, v) for k, v in driver_identity().items())])
        self.client.update_run(parent_run_id, status="RUNNING")
        counts = {"finished": 0, "failed": 0, "interrupted": 0}
        for run in self._child_runs(parent_run_id):
            record = _record_from_run(self.client, run, searched_keys)
            if run.info.status in ("RUNNING", "KILLED"):  # KILLED: closed by an interrupted driver
                record.interrupted = True
                if run.info.status == "RUNNING":
                    self.client.set_tag(run.info.run_id, INTERRUPTED_TAG, "true")
                    self._end_child(record, "KILLED", error="the search driver stopped while this trial ran")
                counts["interrupted"] += 1
            else:
                record.ended_before_resume = True
                counts["failed" if run.info.status == "FAILED" else "finished"] += 1
            self.trials[record.trial_id] = record
        return counts

    def _child_runs(self, parent_run_id: str) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                           max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def lost_trials(self) -> list[TrialRecord]:
        """Trials interrupted with the driver that the resumed search never picked up again:
        they started after Tune last saved its state, so Tune does not know them."""
        return [r for r in self.trials.values() if r.status == "KILLED" and r.interrupted]

    def finish_parent(self, status: str, totals: dict[str, float]) -> None:
        """Close every run still open (as KILLED), then the parent with its totals."""
        for record in self.trials.values():
            if record.status == "RUNNING":
                self._end_child(record, "KILLED", error=record.error or "search ended before the trial did")
        if self.parent_run_id is None:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in totals.items()])
        self.client.set_terminated(self.parent_run_id, status=status)

    # ----- child runs -------------------------------------------------------------------
    def trial_started(self, trial_id: str, params: dict[str, Any], fixed: dict[str, Any]) -> None:
        if trial_id in self.trials:  # a retried or resumed trial keeps its run
            record = self.trials[trial_id]
            if record.ended_before_resume:
                self.replayed += 1
                return
            if record.status != "RUNNING":  # interrupted with the driver, now resumed
                record.interrupted = False
                self.client.log_batch(record.run_id, tags=[RunTag("resumed_after_driver_stop", "true")])
                self.client.update_run(record.run_id, status="RUNNING")
            record.status = "RUNNING"
            self.client.set_tag(record.run_id, "retried", "true")
            return
        run = self.client.create_run(
            self.experiment_id, run_name=f"trial-{trial_id}",
            tags={PARENT_TAG: self.parent_run_id or "", "trial_id": trial_id, "search": "trial"},
        )
        self.trials[trial_id] = TrialRecord(trial_id, run.info.run_id, dict(params))
        self._log_params(run.info.run_id, {**fixed, **params})

    def trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        record = self.trials.get(trial_id)
        if record is None or "epoch" not in result or record.ended_before_resume:
            return
        epoch = int(result["epoch"])
        record.epochs, record.last = epoch, dict(result)
        if _better(result, record.best):
            record.best = dict(result)
        if result.get("checkpoint_path"):  # only best-so-far epochs carry a checkpoint
            record.checkpoint_path = result["checkpoint_path"]
            # Kept on the run so a resumed search can still register this trial's model.
            self.client.set_tag(record.run_id, CHECKPOINT_TAG, record.checkpoint_path)
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, epoch) for k, v in result.items()
                   if k.startswith(EPOCH_METRIC_PREFIXES) and isinstance(v, (int, float)) and math.isfinite(v)]
        self.client.log_batch(record.run_id, metrics=metrics)
        if result.get("resumed_from_epoch"):  # the worker group was restarted: say so, once per restart
            resumed = str(int(result["resumed_from_epoch"]))
            if record.resumed_from != resumed:
                record.resumed_from = resumed
                self.client.log_batch(record.run_id, tags=[RunTag("retried", "true"),
                                                           RunTag("resumed_from_epoch", resumed)])
        if isinstance(result.get("sample_plans"), str):  # what the model wrote, for a person to read
            self.client.log_text(record.run_id, result["sample_plans"], f"sample_plans/epoch-{epoch:03d}.json")

    def trial_ended(self, trial_id: str, status: str, error: str | None = None,
                    params: dict[str, Any] | None = None, fixed: dict[str, Any] | None = None) -> None:
        if trial_id not in self.trials:  # failed before it started: still gets a run
            self.trial_started(trial_id, params or {}, fixed or {})
        record = self.trials[trial_id]
        if record.status == "RUNNING":
            self._end_child(record, status, error)

    def _end_child(self, record: TrialRecord, status: str, error: str | None = None) -> None:
        record.status = status
        record.error = error
        record.stopped_early = status == "FINISHED" and record.epochs < int(record.params.get("epochs", self.max_epochs))
        now = int(time.time() * 1000)
        final: dict[str, float] = {"epochs_completed": record.epochs, "trial_wall_seconds": time.time() - record.started}
        if record.best:
            for key in FINAL_KEYS:
                if key in record.best:
                    final[f"final_{key}"] = record.best[key]
        if record.last:
            for key in ("cpu_seconds", "gpu_seconds", "train_fn_seconds", "data_prep_seconds", "mean_input_tokens"):
                if key in record.last:
                    final[key] = record.last[key]
        tags = [RunTag("stopped_early", str(record.stopped_early).lower()), RunTag("trial_status", status)]
        if error:
            tags.append(RunTag("error", error[-4000:]))
        self.client.log_batch(record.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in final.items()], tags=tags)
        self.client.set_terminated(record.run_id, status=status)

    # ----- the end of the search --------------------------------------------------------
    def record_test(self, trial_id: str, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        """Log a trial's test-split figures (`test_*`, each rate with its interval) on its run."""
        record = self.trials[trial_id]
        record.test = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        now = int(time.time() * 1000)
        self.client.log_batch(record.run_id, metrics=[Metric(TEST_PREFIX + k, v, now, 0) for k, v in record.test.items()])
        if samples:
            self.client.log_text(record.run_id, json.dumps(samples, indent=1), "sample_plans/test.json")

    def record_test_error(self, trial_id: str, error: str) -> None:
        self.client.set_tag(self.trials[trial_id].run_id, TEST_ERROR_TAG, error[-4000:])

    def ranked(self) -> list[TrialRecord]:
        """Trials with at least one evaluated epoch, closest to the paper on validation first;
        trials scored on the whole validation split rank before those stopped while scored on a
        subset only. The test split plays no part."""
        return sorted((r for r in self.trials.values() if r.best is not None),
                      key=lambda r: (not _full_validation(r.best), r.objective))

    def mark_closest(self, k: int, registered_model_name: str, alias: str = "closest-to-paper") -> str | None:
        """Tag the k closest trials (on validation) 1..k and register the closest one's best
        checkpoint.

        Returns the registered model version, or None when no trial has a checkpoint.
        """
        ranked = self.ranked()
        for rank, record in enumerate(ranked[:k], start=1):
            self.client.set_tag(record.run_id, "closest_to_paper_rank", str(rank))
        with_checkpoint = [r for r in ranked if r.checkpoint_path and Path(r.checkpoint_path).is_dir()]
        if not with_checkpoint:
            return None
        best = with_checkpoint[0]
        self.client.log_artifacts(best.run_id, best.checkpoint_path, artifact_path="model")
        try:
            self.client.get_registered_model(registered_model_name)
        except Exception:  # mlflow raises RestException/MlflowException for "not found" by store
            self.client.create_registered_model(registered_model_name)
        source = f"{self.client.get_run(best.run_id).info.artifact_uri}/model"
        tags = {"validation_paper_distance": f"{best.objective:.4f}"}
        if best.test:
            tags["test_paper_distance"] = f"{best.test['paper_distance']:.4f}"
        version = self.client.create_model_version(registered_model_name, source, run_id=best.run_id, tags=tags)
        self.client.set_registered_model_alias(registered_model_name, alias, version.version)
        return version.version

    def tag_pareto_front(self, records: list[TrialRecord]) -> None:
        for record in records:
            self.client.set_tag(record.run_id, "pareto_front", "true")

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(run_id, params=items[start : start + 100])

    def callback(self, fixed_params: dict[str, Any]) -> "MlflowTrialCallback":
        return MlflowTrialCallback(self, fixed_params)


def driver_identity() -> dict[str, str]:
    """Who runs the search, so `--resume` can refuse to start a second driver beside a live one."""
    return {"driver_host": socket.gethostname(), "driver_pid": str(os.getpid())}


def _param_value(text: str) -> Any:
    """A searched param back from MLflow's string: a number when it reads as one."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _record_from_run(client: MlflowClient, run, searched_keys: list[str]) -> TrialRecord:
    """A trial's record rebuilt from its MLflow run: the per-epoch results from the metric
    histories (every reported figure is logged per epoch), the best one chosen as it was live."""
    results: dict[int, dict[str, Any]] = {}
    for key in run.data.metrics:
        if key.startswith(EPOCH_METRIC_PREFIXES):
            for point in client.get_metric_history(run.info.run_id, key):
                results.setdefault(point.step, {"epoch": point.step})[key] = point.value
    params = {k: _param_value(v) for k, v in run.data.params.items() if k in searched_keys}
    record = TrialRecord(run.data.tags.get("trial_id", run.info.run_name), run.info.run_id, params,
                         started=run.info.start_time / 1000, status=run.info.status,
                         checkpoint_path=run.data.tags.get(CHECKPOINT_TAG),
                         stopped_early=run.data.tags.get("stopped_early") == "true",
                         error=run.data.tags.get("error"), resumed_from=run.data.tags.get("resumed_from_epoch"))
    test = {key[len(TEST_PREFIX):]: value for key, value in run.data.metrics.items() if key.startswith(TEST_PREFIX)}
    record.test = test or None
    for epoch in sorted(results):
        result = results[epoch]
        if "paper_distance" not in result:
            continue
        record.epochs, record.last = epoch, result
        if _better(result, record.best):
            record.best = result
    return record


class MlflowTrialCallback(tune.Callback):
    """Forwards Tune's trial events to the SearchTracker, in the driver process."""

    def __init__(self, tracker: SearchTracker, fixed_params: dict[str, Any]):
        self.tracker = tracker
        self.fixed_params = fixed_params

    def on_trial_start(self, iteration, trials, trial, **info):
        self.tracker.trial_started(trial.trial_id, trial.config, self.fixed_params)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.tracker.trial_result(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.tracker.trial_ended(trial.trial_id, "FINISHED", None, trial.config, self.fixed_params)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.tracker.trial_ended(trial.trial_id, "FAILED", _error_text(trial), trial.config, self.fixed_params)


def _error_text(trial) -> str:
    """The trial's error as Tune recorded it. At on_trial_error time it is in the trial's local
    error file; the copy `Trial.get_error` reads from storage is written later."""
    local = getattr(trial, "error_file", None)
    if local and Path(local).is_file():
        return Path(local).read_text()
    error = trial.get_error() if hasattr(trial, "get_error") else None
    return str(error) if error else "trial raised (no error text recorded)"


def latest_search(tracking_uri: str, experiment_name: str):
    """The most recently started search (parent run) of an experiment, or None."""
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], "tags.search = 'parent'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None
