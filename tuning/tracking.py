"""MLflow tracking of a search, as it runs: one parent run, one child run per trial, the
closest marked. It writes; tuning/mlflow_store.py names what it writes and reads it back, and
tuning/registration.py registers the closest trial's checkpoint.

All logging happens in the search driver (a Tune callback), not in trials: trials run on
other nodes and may be killed, while the driver sees every start, result, stop and error
and can close each run with its true status.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from mlflow.entities import DatasetInput, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from trainers import metric_names as names
from tuning.mlflow_store import (
    CHECKPOINT_TAG, CLOSEST_RANK_TAG, COST_KEYS, EPOCH_METRIC_PREFIXES, ERROR_TAG, FINAL_KEYS, FINAL_PREFIX,
    INTERRUPTED_TAG, PARENT_TAG, PARETO_FRONT_TAG, RERUN_OF_TAG, RESUMED_FROM_EPOCH_TAG, RETRIED_TAG, SEARCH_TAG,
    STOPPED_BECAUSE_TAG, STOPPED_EARLY_TAG, TEST_CONTEXT, TEST_ERROR_TAG, TEST_OUTCOMES_FILE, TEST_PREFIX, TRAIN_CONTEXT, TRIAL_ID_TAG,
    TRIAL_NUMBER_TAG, UNTUNED_PREFIX, VALIDATION_CONTEXT, child_runs, driver_identity, model_development_experiment,
    read_test_outcomes, record_from_run, untuned_figures,
)
from tuning.registration import register
from tuning.trial_records import TrialRecord, rank

# Shorter names for the settings a trial's run name shows.
SETTING_ABBREVIATIONS = {"learning_rate": "lr", "batch_size": "batch", "weight_decay": "wd",
                         "lora_dropout": "dropout", "warmup_ratio": "warmup"}


class SearchTracker:
    """Owns the parent run and the child runs; `callback()` plugs it into Tune."""

    def __init__(self, tracking_uri: str, mlflow_experiment: str, max_epochs: int, artifact_location: str | None = None,
                 *, trial_tags: dict[str, str] | None = None, datasets: dict[str, DatasetInput] | None = None):
        """artifact_location: where a new experiment keeps artifacts. Left None, a sqlite store
        puts them in ./mlruns of whatever directory the search was started from. trial_tags: set
        on every trial's run (which model, task and data split: see `best_per_family`).
        datasets: MLflow dataset inputs by context (train, validation, test)."""
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id = model_development_experiment(self.client, mlflow_experiment, artifact_location)
        # Dataset inputs ({context: DatasetInput}): the parent gets every split, a trial's run the
        # splits it trains and selects on, and the test split once it is scored.
        self.datasets: dict[str, DatasetInput] = dict(datasets or {})
        self.trial_tags = dict(trial_tags or {})
        self.max_epochs = max_epochs
        self.parent_run_id: str | None = None
        self.trials: dict[str, TrialRecord] = {}
        # Trials that had ended before a resume and that Tune restarted only to replay their result.
        self.replayed = 0
        # The base before any fine-tuning, per split ({"val": figures, "test": figures}), or None.
        self.untuned: dict[str, dict[str, float]] | None = None

    # ----- parent run -------------------------------------------------------------------
    def start_parent(self, run_name: str, params: dict[str, Any], tags: dict[str, str], files: list[Path]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={SEARCH_TAG: "parent", **tags, **driver_identity()})
        self.parent_run_id = run.info.run_id
        self._log_params(self.parent_run_id, params)
        if self.datasets:
            self.client.log_inputs(self.parent_run_id, datasets=list(self.datasets.values()))
        for path in files:
            self.client.log_artifact(self.parent_run_id, str(path), artifact_path="config")
        return self.parent_run_id

    def log_parent_metrics(self, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])

    def set_parent_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.parent_run_id, key, value)

    def reattach(self, parent_run_id: str, searched_keys: list[str]) -> dict[str, int]:
        """Continue an interrupted search's parent run, with every trial it already recorded.

        Runs the dead driver left RUNNING are closed as KILLED and tagged; a trial Tune resumes
        reopens its run (`trial_started`). Returns counts of the trials found, by state.
        """
        parent = self.client.get_run(parent_run_id)
        self.parent_run_id = parent_run_id
        self.untuned = untuned_figures(parent.data.metrics)
        resumes = int(parent.data.tags.get("resumed", "0")) + 1
        self.client.log_batch(parent_run_id, tags=[RunTag("resumed", str(resumes)),
                                                   *(RunTag(k, v) for k, v in driver_identity().items())])
        self.client.update_run(parent_run_id, status="RUNNING")
        if STOPPED_BECAUSE_TAG in parent.data.tags:  # it runs again: the stop's reason no longer holds
            self.client.delete_tag(parent_run_id, STOPPED_BECAUSE_TAG)
        counts = {"finished": 0, "failed": 0, "interrupted": 0}
        for run in self._child_runs(parent_run_id):
            record = record_from_run(self.client, run, searched_keys)
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
        return child_runs(self.client, self.experiment_id, parent_run_id)

    def lost_trials(self) -> list[TrialRecord]:
        """Trials interrupted with the driver that the resumed search never picked up again:
        they started after Tune last saved its state, so Tune does not know them."""
        return [r for r in self.trials.values() if r.status == "KILLED" and r.interrupted]

    def finish_parent(self, status: str, totals: dict[str, float], reason: str | None = None) -> None:
        """Close every run still open (as KILLED, with `reason` or "search ended before the
        trial did"), then the parent with its totals (and `reason` as its `stopped_because` tag)."""
        for record in self.trials.values():
            if record.status == "RUNNING":
                self._end_child(record, "KILLED", error=record.error or reason or "search ended before the trial did")
        if self.parent_run_id is not None and reason:
            self.client.set_tag(self.parent_run_id, STOPPED_BECAUSE_TAG, reason)
        if self.parent_run_id is None:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in totals.items()])
        self.client.set_terminated(self.parent_run_id, status=status)

    # ----- child runs -------------------------------------------------------------------
    def trial_started(self, trial_id: str, params: dict[str, Any], fixed: dict[str, Any],
                      number: int | None = None) -> None:
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
            self.client.set_tag(record.run_id, RETRIED_TAG, "true")
            return
        run = self.client.create_run(
            self.experiment_id, run_name=trial_run_name(trial_id, params),
            tags={PARENT_TAG: self.parent_run_id or "", TRIAL_ID_TAG: trial_id, SEARCH_TAG: "trial", **self.trial_tags,
                  **({TRIAL_NUMBER_TAG: str(number)} if number is not None else {})},
        )
        self.trials[trial_id] = TrialRecord(trial_id, run.info.run_id, dict(params))
        self._log_params(run.info.run_id, {**fixed, **params})
        trained_on = [self.datasets[c] for c in (TRAIN_CONTEXT, VALIDATION_CONTEXT) if c in self.datasets]
        if trained_on:
            self.client.log_inputs(run.info.run_id, datasets=trained_on)

    def trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        record = self.trials.get(trial_id)
        if record is None or names.EPOCH not in result or record.ended_before_resume:
            return
        epoch = int(result[names.EPOCH])
        record.take_result(result)
        if result.get(names.CHECKPOINT_PATH):  # only best-so-far epochs carry a checkpoint
            record.checkpoint_path = result[names.CHECKPOINT_PATH]
            # Kept on the run so a resumed search can still register this trial's model.
            self.client.set_tag(record.run_id, CHECKPOINT_TAG, record.checkpoint_path)
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, epoch) for k, v in result.items()
                   if k.startswith(EPOCH_METRIC_PREFIXES) and isinstance(v, (int, float)) and math.isfinite(v)]
        self.client.log_batch(record.run_id, metrics=metrics)
        if result.get(names.RESUMED_FROM_EPOCH):  # the worker group was restarted: say so, once per restart
            resumed = str(int(result[names.RESUMED_FROM_EPOCH]))
            if record.resumed_from != resumed:
                record.resumed_from = resumed
                self.client.log_batch(record.run_id, tags=[RunTag(RETRIED_TAG, "true"),
                                                           RunTag(RESUMED_FROM_EPOCH_TAG, resumed)])
        if isinstance(result.get(names.SAMPLE_PLANS), str):  # what the model wrote, for a person to read
            self.client.log_text(record.run_id, result[names.SAMPLE_PLANS], f"sample_plans/epoch-{epoch:03d}.json")

    def trial_ended(self, trial_id: str, status: str, error: str | None = None,
                    params: dict[str, Any] | None = None, *, fixed: dict[str, Any] | None = None) -> None:
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
                    final[FINAL_PREFIX + key] = record.best[key]
        if record.last:
            for key in COST_KEYS:
                if key in record.last:
                    final[key] = record.last[key]
        tags = [RunTag(STOPPED_EARLY_TAG, str(record.stopped_early).lower()), RunTag("trial_status", status)]
        if error:
            tags.append(RunTag(ERROR_TAG, error[-4000:]))
        self.client.log_batch(record.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in final.items()], tags=tags)
        self.client.set_terminated(record.run_id, status=status)

    # ----- the end of the search --------------------------------------------------------
    def record_test(self, trial_id: str, metrics: dict[str, float], samples: list[dict[str, Any]],
                    outcomes: list[int] | None = None) -> None:
        """Log a trial's test-split figures (`test_*`, each rate with its interval) on its run,
        and its per-example outcomes as TEST_OUTCOMES_FILE."""
        record = self.trials[trial_id]
        record.test = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        now = int(time.time() * 1000)
        self.client.log_batch(record.run_id, metrics=[Metric(TEST_PREFIX + k, v, now, 0) for k, v in record.test.items()])
        if outcomes is not None:
            record.test_outcomes = [int(x) for x in outcomes]
            self.client.log_text(record.run_id, json.dumps(record.test_outcomes), TEST_OUTCOMES_FILE)
        if TEST_CONTEXT in self.datasets:
            self.client.log_inputs(record.run_id, datasets=[self.datasets[TEST_CONTEXT]])
        if samples:
            self.client.log_text(record.run_id, json.dumps(samples, indent=1), "sample_plans/test.json")

    def record_untuned(self, metrics: dict[str, dict[str, float]], samples: dict[str, list[dict[str, Any]]]) -> None:
        """Log the untuned base's figures per split on the parent run (`untuned_<split>_*`), and
        its sample plans."""
        self.untuned = {split: {k: float(v) for k, v in figures.items()
                                if isinstance(v, (int, float)) and math.isfinite(v)}
                        for split, figures in metrics.items()}
        self.log_parent_metrics({f"{UNTUNED_PREFIX}{split}_{k}": v for split, figures in self.untuned.items()
                                 for k, v in figures.items()})
        for split, plans in samples.items():
            if plans:
                self.client.log_text(self.parent_run_id, json.dumps(plans, indent=1),
                                     f"sample_plans/untuned_{split}.json")

    def load_test_outcomes(self, records: list[TrialRecord]) -> None:
        """Fill in the per-example test outcomes of trials scored under an earlier driver."""
        for record in records:
            if record.test is not None and record.test_outcomes is None:
                record.test_outcomes = read_test_outcomes(self.client, record.run_id)

    def mark_rerun(self, trial_id: str, reason: str, source_trial: str | None) -> None:
        """Tag a full-budget rerun's run with why it ran and whose configuration it repeats."""
        record = self.trials[trial_id]
        record.rerun_of = source_trial or "(no trial tried this value)"
        self.client.log_batch(record.run_id, tags=[RunTag("full_budget_for", reason),
                                                   RunTag(RERUN_OF_TAG, source_trial or "(no trial tried this value)")])

    def record_test_error(self, trial_id: str, error: str) -> None:
        self.client.set_tag(self.trials[trial_id].run_id, TEST_ERROR_TAG, error[-4000:])

    def ranked(self) -> list[TrialRecord]:
        """Trials with at least one evaluated epoch, closest to the paper on validation first;
        trials scored on the whole validation split rank before those stopped while scored on a
        subset only. The test split plays no part."""
        return rank(self.trials.values())

    def mark_closest(self, k: int, registered_model_name: str, alias: str = "closest-to-paper") -> str | None:
        """Tag the k closest trials (on validation) 1..k and register the closest one's best
        checkpoint.

        Returns the registered model version, or None when no trial has a checkpoint.
        """
        ranked = self.ranked()
        for position, record in enumerate(ranked[:k], start=1):
            self.client.set_tag(record.run_id, CLOSEST_RANK_TAG, str(position))
        with_checkpoint = [r for r in ranked if r.checkpoint_path and Path(r.checkpoint_path).is_dir()]
        if not with_checkpoint:
            return None
        return register(self.client, self.tracking_uri, self.experiment_id, with_checkpoint[0],
                        registered_model_name=registered_model_name, alias=alias)

    def tag_pareto_front(self, records: list[TrialRecord]) -> None:
        for record in records:
            self.client.set_tag(record.run_id, PARETO_FRONT_TAG, "true")

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(run_id, params=items[start : start + 100])

    def callback(self, fixed_params: dict[str, Any]) -> "MlflowTrialCallback":
        return MlflowTrialCallback(self, fixed_params)


def trial_run_name(trial_id: str, params: dict[str, Any]) -> str:
    """A trial's run name that shows its settings, e.g. 'instruction lr=6e-04 batch=8 pos_weight=15.6 (44286e02)':
    a category by its value alone, numbers with their (shortened) setting name."""
    parts = []
    for key, value in sorted(params.items(), key=lambda item: (not isinstance(item[1], str), item[0])):
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, float):
            parts.append(f"{SETTING_ABBREVIATIONS.get(key, key)}={value:.2g}" if value < 0.01
                         else f"{SETTING_ABBREVIATIONS.get(key, key)}={value:.3g}")
        else:
            parts.append(f"{SETTING_ABBREVIATIONS.get(key, key)}={value}")
    return " ".join([*parts, f"({trial_id})"])


class MlflowTrialCallback(tune.Callback):
    """Forwards Tune's trial events to the SearchTracker, in the driver process."""

    def __init__(self, tracker: SearchTracker, fixed_params: dict[str, Any]):
        self.tracker = tracker
        self.fixed_params = fixed_params

    def on_trial_start(self, iteration, trials, trial, **info):
        self.tracker.trial_started(trial.trial_id, trial.config, self.fixed_params, _trial_number(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.tracker.trial_result(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.tracker.trial_ended(trial.trial_id, "FINISHED", None, trial.config, fixed=self.fixed_params)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.tracker.trial_ended(trial.trial_id, "FAILED", _error_text(trial), trial.config, fixed=self.fixed_params)


def _trial_number(trial) -> int | None:
    """The order Tune created the trial in: its experiment tag starts with a 1-based counter."""
    head = str(getattr(trial, "experiment_tag", "")).split("_", 1)[0]
    return int(head) - 1 if head.isdigit() else None


def _error_text(trial) -> str:
    """The trial's error as Tune recorded it. At on_trial_error time it is in the trial's local
    error file; the copy `Trial.get_error` reads from storage is written later."""
    local = getattr(trial, "error_file", None)
    if local and Path(local).is_file():
        return Path(local).read_text()
    error = trial.get_error() if hasattr(trial, "get_error") else None
    return str(error) if error else "trial raised (no error text recorded)"
