"""The MLflow store as searches lay it out: the names of the tags, metrics and files a search
writes (tuning/tracking.py writes them), and reading it back: a search's trials, the latest
search, the best of each model family, links into the UI.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset as MlflowDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient

from trainers import metric_names as names
from trainers import selection
from tuning.trial_records import TrialRecord

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
# On a parent run a stop (SIGTERM, Ctrl+C) closed: why, and how to continue. Cleared on resume.
STOPPED_BECAUSE_TAG = "stopped_because"
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
                         names.BEST_SO_FAR, names.BEST_EPOCH,
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
              names.BEST_EPOCH, names.FULL_VALIDATION_SET)
FINAL_PREFIX = "final_"
# Per-trial cost figures copied from the last report when a trial ends.
COST_KEYS = (names.CPU_SECONDS, names.GPU_SECONDS, names.TRAIN_FN_SECONDS, names.DATA_PREP_SECONDS,
             names.MEAN_INPUT_TOKENS)

# The MLflow UI a search's links point to: `mlflow ui --host 127.0.0.1 --port 5000`.
DEFAULT_UI = "http://127.0.0.1:5000/"
# The UI opens a run in its training view (metrics, charts, models), not its GenAI view.
TRAINING_VIEW = "workflowType=machine_learning"
TRAIN_CONTEXT, VALIDATION_CONTEXT, TEST_CONTEXT = "training", "validation", "test"


def dataset_input(name: str, context: str, digest: str, source: str, *, rows: int) -> DatasetInput:
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


def default_tracking_uri(results_dir: Path) -> str:
    """The store a search uses without --tracking-uri: RESULTS_DIR/mlflow.db, by absolute path."""
    return f"sqlite:///{Path(results_dir).expanduser().resolve() / 'mlflow.db'}"


def run_link(ui_base: str, experiment_id: str, run_id: str | None = None) -> str:
    """A run's (or the experiment's) page in the MLflow UI's training view; its router lives
    after '#', so '' as ui_base gives a link relative to the UI page it is shown on."""
    path = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{ui_base}{path}?{TRAINING_VIEW}"


def driver_identity() -> dict[str, str]:
    """Who runs the search, so `--resume` can refuse to start a second driver beside a live one."""
    return {"driver_host": socket.gethostname(), "driver_pid": str(os.getpid())}


def param_value(text: str) -> Any:
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


def record_from_run(client: MlflowClient, run, searched_keys: list[str]) -> TrialRecord:
    """A trial's record rebuilt from its MLflow run: the per-epoch results from the metric
    histories (every reported figure is logged per epoch), the best one chosen as it was live."""
    results: dict[int, dict[str, Any]] = {}
    for key in run.data.metrics:
        if key.startswith(EPOCH_METRIC_PREFIXES):
            for point in client.get_metric_history(run.info.run_id, key):
                results.setdefault(point.step, {names.EPOCH: point.step})[key] = point.value
    params = {k: param_value(v) for k, v in run.data.params.items() if k in searched_keys}
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
        if names.PAPER_DISTANCE in results[epoch]:
            record.take_result(results[epoch])
    return record


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    """Every trial run of a search."""
    return all_pages(client, [experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'")


def best_per_family(client: MlflowClient, task: str, data_split: str) -> list[dict[str, Any]]:
    """Each model family's closest trial (on validation, `selection.trial_key`) among every search
    of `task` on the same data split, in any experiment of this store: a linear and a transformer
    search land side by side whichever experiment each ran in.

    Only trials that ended on the whole validation split count; the returned dicts hold
    family, model, experiment, trial_id, run_id, validation (best-epoch figures, no
    prefix) and test (None when not scored), best family first.
    """
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    query = (f"tags.{SEARCH_TAG} = 'trial' and tags.{TASK_TAG} = '{task}' "
             f"and tags.{DATA_SPLIT_TAG} = '{data_split}'")
    found = []
    for run in all_pages(client, list(experiments), query):
        figures = {k[len(FINAL_PREFIX):]: v for k, v in run.data.metrics.items() if k.startswith(FINAL_PREFIX)}
        if names.PAPER_DISTANCE not in figures or not selection.scored_on_whole_validation(figures):
            continue
        found.append({
            "family": run.data.tags.get(FAMILY_TAG, ""), "model": run.data.tags.get(MODEL_TAG, ""),
            "experiment": experiments.get(run.info.experiment_id, run.info.experiment_id),
            "trial_id": run.data.tags.get(TRIAL_ID_TAG, run.info.run_name), "run_id": run.info.run_id,
            "validation": figures,
            "test": {k[len(TEST_PREFIX):]: v for k, v in run.data.metrics.items() if k.startswith(TEST_PREFIX)} or None,
        })
    best: dict[str, dict[str, Any]] = {}
    for entry in sorted(found, key=lambda e: selection.trial_key(e["validation"])):
        best.setdefault(entry["family"], entry)
    for entry in best.values():
        entry["model"] = entry["model"] or entry["family"]
    return list(best.values())


def all_pages(client: MlflowClient, experiment_ids: list[str], query: str) -> list:
    """Every run `query` matches, over as many pages as the store returns: a store of many
    searches holds more runs than one page."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, query, max_results=1000, page_token=token)
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
