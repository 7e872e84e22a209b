"""MLflow tracking of a search: one parent run, one child run per trial, the closest marked.

All logging happens in the search driver (a Tune callback), not in trials: trials run on
other nodes and may be killed, while the driver sees every start, result, stop and error
and can close each run with its true status.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

PARENT_TAG = "mlflow.parentRunId"
# Result keys worth a per-epoch curve in MLflow; the rest are Ray's bookkeeping.
EPOCH_METRIC_PREFIXES = ("tool_", "paper_distance", "best_paper_distance", "train_loss", "recall/",
                         "padding_waste", "cpu_seconds", "gpu_seconds", "plan_", "empty_output_rate",
                         "eval_examples", "full_test_set", "resumed_from_epoch")
# Best-epoch figures copied to `final_*` metrics when a trial ends (those a model reports).
FINAL_KEYS = ("tool_recall", "tool_recall_ci_low", "tool_recall_ci_high", "tool_count", "tool_count_ci_low",
              "tool_count_ci_high", "tool_precision", "plan_success", "plan_success_ci_low", "plan_success_ci_high",
              "tool_set_accuracy", "plan_parse_rate", "eval_examples", "paper_distance", "epoch")


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

    @property
    def objective(self) -> float:
        return self.best["paper_distance"] if self.best else math.inf


def _better(result: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """Whether `result` should replace a trial's best so far.

    A planner trial's last report scores the whole test set, the others a subset; the whole
    set wins. Otherwise (every ToolRAG epoch scores the whole set) the lower distance wins.
    """
    if best is None:
        return True
    full, best_full = result.get("full_test_set", 1.0) == 1.0, best.get("full_test_set", 1.0) == 1.0
    if full != best_full:
        return full
    return result["paper_distance"] < best["paper_distance"]


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

    # ----- parent run -------------------------------------------------------------------
    def start_parent(self, run_name: str, params: dict[str, Any], tags: dict[str, str], files: list[Path]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={"search": "parent", **tags})
        self.parent_run_id = run.info.run_id
        self._log_params(self.parent_run_id, params)
        for path in files:
            self.client.log_artifact(self.parent_run_id, str(path), artifact_path="config")
        return self.parent_run_id

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
            self.trials[trial_id].status = "RUNNING"
            self.client.set_tag(self.trials[trial_id].run_id, "retried", "true")
            return
        run = self.client.create_run(
            self.experiment_id, run_name=f"trial-{trial_id}",
            tags={PARENT_TAG: self.parent_run_id or "", "trial_id": trial_id, "search": "trial"},
        )
        self.trials[trial_id] = TrialRecord(trial_id, run.info.run_id, dict(params))
        self._log_params(run.info.run_id, {**fixed, **params})

    def trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        record = self.trials.get(trial_id)
        if record is None or "epoch" not in result:
            return
        epoch = int(result["epoch"])
        record.epochs, record.last = epoch, dict(result)
        if _better(result, record.best):
            record.best = dict(result)
        if result.get("checkpoint_path"):  # only best-so-far epochs carry a checkpoint
            record.checkpoint_path = result["checkpoint_path"]
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
    def ranked(self) -> list[TrialRecord]:
        """Trials with at least one evaluated epoch, closest to the paper first; trials scored on
        the whole test set rank before those stopped while scored on a subset only."""
        return sorted((r for r in self.trials.values() if r.best is not None),
                      key=lambda r: (r.best.get("full_test_set", 1.0) != 1.0, r.objective))

    def mark_closest(self, k: int, registered_model_name: str, alias: str = "closest-to-paper") -> str | None:
        """Tag the k closest trials 1..k and register the closest one's best checkpoint.

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
        version = self.client.create_model_version(registered_model_name, source, run_id=best.run_id,
                                                   tags={"paper_distance": f"{best.objective:.4f}"})
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
