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

from mlflow.entities import Dataset as MlflowDataset
from mlflow.entities import DatasetInput, InputTag, LoggedModelOutput, LoggedModelStatus, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from trainers import metric_names as names

PARENT_TAG = "mlflow.parentRunId"
# `search`: "parent" on a search's run, "trial" on each trial's.
SEARCH_TAG = "search"
TRIAL_ID_TAG = "trial_id"
# On a trial's run: its place in the order Tune created trials (0 = the first proposal). Two
# runs of one seeded search propose the same settings at each number.
TRIAL_NUMBER_TAG = "trial_number"
ERROR_TAG = "error"
# On a trial's run: the worker group was restarted (a lost node, a resumed search), and from
# which epoch's checkpoint.
RETRIED_TAG = "retried"
RESUMED_FROM_EPOCH_TAG = "resumed_from_epoch"
STOPPED_EARLY_TAG = "stopped_early"
CLOSEST_RANK_TAG = "closest_to_paper_rank"
PARETO_FRONT_TAG = "pareto_front"
# On every trial's run: which model of which task, on which data split (see trial_tags).
TASK_TAG, FAMILY_TAG, MODEL_TAG, DATA_SPLIT_TAG = "task", "family", "model", "data_split"
# On a trial's run: the driver stopped while it ran (SIGKILL, a lost head). The run was closed
# as KILLED when the search resumed, and reopened if the trial resumed with it.
INTERRUPTED_TAG = "interrupted_by_driver_stop"
CHECKPOINT_TAG = "checkpoint_path"
# The MLflow UI opens an experiment in its training view (runs, charts, models) with this kind,
# not in its GenAI view (traces).
EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"
# A run's description in the MLflow UI (Markdown).
NOTE_TAG = "mlflow.note.content"
DATASET_CONTEXT_TAG = "mlflow.data.context"
# The registered checkpoint's name as a logged model of its run (so runs:/RUN_ID/model finds it).
LOGGED_MODEL_NAME = "model"
# Shorter names for the settings a trial's run name shows.
SETTING_ABBREVIATIONS = {"learning_rate": "lr", "batch_size": "batch", "weight_decay": "wd",
                         "lora_dropout": "dropout", "warmup_ratio": "warmup"}
# Result keys worth a per-epoch curve in MLflow; the rest are Ray's bookkeeping.
# Every one is a validation figure: the test split is scored once per trial, after the search,
# and logged under TEST_PREFIX.
EPOCH_METRIC_PREFIXES = ("tool_", names.GOLD_TOOL_COUNT, names.PAPER_DISTANCE, names.BEST_PAPER_DISTANCE, names.TRAIN_LOSS,
                         names.PER_TOOL_RECALL_PREFIX, names.PADDING_WASTE, names.CPU_SECONDS, names.GPU_SECONDS,
                         "plan_", names.STRICT_PLAN_SUCCESS, names.EMPTY_OUTPUT_RATE, names.EVAL_EXAMPLES,
                         names.FULL_VALIDATION_SET, names.RESUMED_FROM_EPOCH, names.EXAMPLES_OVER_MAX_LENGTH,
                         names.PROMPTS_CUT)
TEST_PREFIX = "test_"
# Set on a trial's run when scoring its checkpoint on the test split raised.
TEST_ERROR_TAG = "test_error"
# On a trial's run: its per-example test outcomes (1 = success), in test-split order, for paired
# comparisons between trials (tuning/full_budget.py).
TEST_OUTCOMES_FILE = "test_outcomes.json"
# The parent run's figures of the base before any fine-tuning: untuned_<split>_<metric>.
UNTUNED_PREFIX = "untuned_"
# On a full-budget rerun's run: the trial whose configuration it repeats (tuning/full_budget.py).
RERUN_OF_TAG = "full_budget_rerun_of"
# Best-epoch figures copied to `final_*` metrics when a trial ends (those a model reports).
FINAL_KEYS = (names.TOOL_RECALL, *names.interval(names.TOOL_RECALL), names.TOOL_COUNT, *names.interval(names.TOOL_COUNT),
              names.TOOL_PRECISION, names.GOLD_TOOL_COUNT, names.PLAN_SUCCESS, *names.interval(names.PLAN_SUCCESS), names.TOOL_SET_ACCURACY,
              names.PLAN_PARSE_RATE, names.STRICT_PLAN_SUCCESS, names.EVAL_EXAMPLES, names.PAPER_DISTANCE, names.EPOCH,
              names.FULL_VALIDATION_SET)
FINAL_PREFIX = "final_"
# Per-trial cost figures copied from the last report when a trial ends.
COST_KEYS = (names.CPU_SECONDS, names.GPU_SECONDS, names.TRAIN_FN_SECONDS, names.DATA_PREP_SECONDS,
             names.MEAN_INPUT_TOKENS)


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
    # Its per-example test outcomes (1 = success, in test-split order), once scored.
    test_outcomes: list[int] | None = None
    # For a full-budget rerun: the trial whose configuration it repeats, or "(no trial tried
    # this value)".
    rerun_of: str | None = None

    @property
    def objective(self) -> float:
        return self.best[names.PAPER_DISTANCE] if self.best else math.inf


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
    return result[names.PAPER_DISTANCE] < best[names.PAPER_DISTANCE]


def rank(records) -> list[TrialRecord]:
    """Trials with a result, closest to the paper on validation first; those scored on the whole
    validation split before those stopped while scored on a subset."""
    return sorted((r for r in records if r.best is not None), key=lambda r: (not _full_validation(r.best), r.objective))


def _full_validation(result: dict[str, Any]) -> bool:
    """Whether a result scores the whole validation split (every ToolRAG epoch does)."""
    return result.get(names.FULL_VALIDATION_SET, 1.0) == 1.0


class SearchTracker:
    """Owns the parent run and the child runs; `callback()` plugs it into Tune."""

    def __init__(self, tracking_uri: str, mlflow_experiment: str, max_epochs: int, artifact_location: str | None = None,
                 trial_tags: dict[str, str] | None = None):
        """artifact_location: where a new experiment keeps artifacts. Left None, a sqlite store
        puts them in ./mlruns of whatever directory the search was started from. trial_tags: set
        on every trial's run (which model, task and data split: see `best_per_family`)."""
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id = model_development_experiment(self.client, mlflow_experiment, artifact_location)
        # Dataset inputs ({context: DatasetInput}): the parent gets every split, a trial's run the
        # splits it trains and selects on, and the test split once it is scored.
        self.datasets: dict[str, DatasetInput] = {}
        self.trial_tags = dict(trial_tags or {})
        self.max_epochs = max_epochs
        self.parent_run_id: str | None = None
        self.trials: dict[str, TrialRecord] = {}
        # Trials that had ended before a resume and that Tune restarted only to replay their result.
        self.replayed = 0
        # Wall time of the full-budget reruns after the search (tuning/full_budget.py).
        self.full_budget_seconds = 0.0
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
        return child_runs(self.client, self.experiment_id, parent_run_id)

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
        record.epochs, record.last = epoch, dict(result)
        if _better(result, record.best):
            record.best = dict(result)
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
        for rank, record in enumerate(ranked[:k], start=1):
            self.client.set_tag(record.run_id, CLOSEST_RANK_TAG, str(rank))
        with_checkpoint = [r for r in ranked if r.checkpoint_path and Path(r.checkpoint_path).is_dir()]
        if not with_checkpoint:
            return None
        best = with_checkpoint[0]
        tags = {"validation_paper_distance": f"{best.objective:.4f}"}
        if best.test:
            tags["test_paper_distance"] = f"{best.test[names.PAPER_DISTANCE]:.4f}"
        # A logged model of the trial's run, so the UI lists it under "Logged models" and
        # runs:/RUN_ID/model still finds its files.
        logged = self.client.create_logged_model(
            self.experiment_id, name=LOGGED_MODEL_NAME, source_run_id=best.run_id, tags=tags,
            params={k: str(v) for k, v in best.params.items()}, model_type=registered_model_name)
        self.client.log_model_artifacts(logged.model_id, best.checkpoint_path)
        self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        # An output of the trial's run: its page lists it under "Logged models".
        self.client.log_outputs(best.run_id, [LoggedModelOutput(logged.model_id, step=int(best.best[names.EPOCH]))])
        try:
            self.client.get_registered_model(registered_model_name)
        except Exception:  # mlflow raises RestException/MlflowException for "not found" by store
            self.client.create_registered_model(registered_model_name)
        # The version's source is the logged model, which the UI links to. MLflow's registry
        # resolves a models:/ source through the process-wide tracking URI, not this client's.
        import mlflow

        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.tracking_uri)
        try:
            version = self.client.create_model_version(registered_model_name, f"models:/{logged.model_id}",
                                                       run_id=best.run_id, tags=tags, model_id=logged.model_id)
        finally:
            mlflow.set_tracking_uri(previous)
        self.client.set_registered_model_alias(registered_model_name, alias, version.version)
        return version.version

    def best_per_family(self, task: str, data_split: str) -> list[dict[str, Any]]:
        """Each model family's closest trial (on validation) among every search of `task` on the
        same data split, in any experiment of this store: a linear and a transformer search land
        side by side whichever experiment each ran in.

        Only trials that ended on the whole validation split count; the returned dicts hold
        family, model, experiment, trial_id, run_id, validation (best-epoch figures, no
        prefix) and test (None when not scored), best family first.
        """
        experiments = {e.experiment_id: e.name for e in self.client.search_experiments()}
        query = (f"tags.{SEARCH_TAG} = 'trial' and tags.{TASK_TAG} = '{task}' "
                 f"and tags.{DATA_SPLIT_TAG} = '{data_split}'")
        runs, token = [], None
        while True:  # every page: a store of many searches holds more runs than one page
            page = self.client.search_runs(list(experiments), query, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
        distance_key = FINAL_PREFIX + names.PAPER_DISTANCE
        full_key = FINAL_PREFIX + names.FULL_VALIDATION_SET
        best: dict[str, Any] = {}
        for run in runs:
            metrics = run.data.metrics
            if distance_key not in metrics or metrics.get(full_key, 1.0) != 1.0:
                continue
            family = run.data.tags.get(FAMILY_TAG, "")
            if family not in best or metrics[distance_key] < best[family].data.metrics[distance_key]:
                best[family] = run
        found = []
        for family, run in best.items():
            metrics = run.data.metrics
            found.append({
                "family": family, "model": run.data.tags.get(MODEL_TAG, family),
                "experiment": experiments.get(run.info.experiment_id, run.info.experiment_id),
                "trial_id": run.data.tags.get(TRIAL_ID_TAG, run.info.run_name), "run_id": run.info.run_id,
                "validation": {k[len(FINAL_PREFIX):]: v for k, v in metrics.items() if k.startswith(FINAL_PREFIX)},
                "test": {k[len(TEST_PREFIX):]: v for k, v in metrics.items() if k.startswith(TEST_PREFIX)} or None,
            })
        return sorted(found, key=lambda b: b["validation"][names.PAPER_DISTANCE])

    def tag_pareto_front(self, records: list[TrialRecord]) -> None:
        for record in records:
            self.client.set_tag(record.run_id, PARETO_FRONT_TAG, "true")

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(run_id, params=items[start : start + 100])

    def callback(self, fixed_params: dict[str, Any]) -> "MlflowTrialCallback":
        return MlflowTrialCallback(self, fixed_params)


TRAIN_CONTEXT, VALIDATION_CONTEXT, TEST_CONTEXT = "training", "validation", "test"


def dataset_input(name: str, context: str, digest: str, source: str, rows: int) -> DatasetInput:
    """One data split as an MLflow dataset input: the runs table shows its name, digest and
    context, and the run page its row count."""
    dataset = MlflowDataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": source}),
                            profile=json.dumps({"num_rows": rows}))
    return DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT_TAG, context)])


def model_development_experiment(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, created if needed, tagged so the MLflow UI opens on its training runs."""
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        name, artifact_location=artifact_location)
    if experiment is None or experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_DEVELOPMENT:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
    return experiment_id


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


def redact_uri(uri: str) -> str:
    """A URI safe to log: no user:password@, and no query values (S3 URIs can carry keys)."""
    from urllib.parse import urlsplit, urlunsplit

    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None and not parts.query:
        return uri
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    query = "&".join(f"{item.split('=', 1)[0]}=REDACTED" for item in parts.query.split("&") if item)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a sqlite:/// tracking URI, or None for another store."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):])
    return None


def driver_identity() -> dict[str, str]:
    """Who runs the search, so `--resume` can refuse to start a second driver beside a live one."""
    return {"driver_host": socket.gethostname(), "driver_pid": str(os.getpid())}


def _param_value(text: str) -> Any:
    """A searched param back from MLflow's string: a number when it reads as one."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def untuned_figures(parent_metrics: dict[str, float]) -> dict[str, dict[str, float]] | None:
    """The untuned base's figures per split from a parent run's metrics, or None."""
    figures: dict[str, dict[str, float]] = {}
    for key, value in parent_metrics.items():
        if key.startswith(UNTUNED_PREFIX):
            split, _, metric = key.removeprefix(UNTUNED_PREFIX).partition("_")
            figures.setdefault(split, {})[metric] = value
    return figures or None


def read_test_outcomes(client: MlflowClient, run_id: str) -> list[int] | None:
    """A trial's per-example test outcomes from its run, or None when it has none."""
    import tempfile

    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, TEST_OUTCOMES_FILE, folder)
        except (MlflowException, OSError):
            return None
        return [int(x) for x in json.loads(Path(path).read_text())]


def _record_from_run(client: MlflowClient, run, searched_keys: list[str]) -> TrialRecord:
    """A trial's record rebuilt from its MLflow run: the per-epoch results from the metric
    histories (every reported figure is logged per epoch), the best one chosen as it was live."""
    results: dict[int, dict[str, Any]] = {}
    for key in run.data.metrics:
        if key.startswith(EPOCH_METRIC_PREFIXES):
            for point in client.get_metric_history(run.info.run_id, key):
                results.setdefault(point.step, {names.EPOCH: point.step})[key] = point.value
    params = {k: _param_value(v) for k, v in run.data.params.items() if k in searched_keys}
    record = TrialRecord(run.data.tags.get(TRIAL_ID_TAG, run.info.run_name), run.info.run_id, params,
                         started=run.info.start_time / 1000, status=run.info.status,
                         checkpoint_path=run.data.tags.get(CHECKPOINT_TAG),
                         stopped_early=run.data.tags.get(STOPPED_EARLY_TAG) == "true",
                         error=run.data.tags.get(ERROR_TAG), resumed_from=run.data.tags.get(RESUMED_FROM_EPOCH_TAG))
    if RERUN_OF_TAG in run.data.tags:
        record.rerun_of = run.data.tags[RERUN_OF_TAG]
    test = {key[len(TEST_PREFIX):]: value for key, value in run.data.metrics.items() if key.startswith(TEST_PREFIX)}
    record.test = test or None
    for epoch in sorted(results):
        result = results[epoch]
        if names.PAPER_DISTANCE not in result:
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
        self.tracker.trial_started(trial.trial_id, trial.config, self.fixed_params, _trial_number(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.tracker.trial_result(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.tracker.trial_ended(trial.trial_id, "FINISHED", None, trial.config, self.fixed_params)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.tracker.trial_ended(trial.trial_id, "FAILED", _error_text(trial), trial.config, self.fixed_params)


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


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    """Every trial run of a search, over as many pages as the store returns."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def latest_search(tracking_uri: str, mlflow_experiment: str):
    """The most recently started search (parent run) of an experiment, or None."""
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(mlflow_experiment)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], f"tags.{SEARCH_TAG} = 'parent'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None
