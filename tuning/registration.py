"""Registering a trial's best checkpoint in the MLflow model registry: a logged model of the
trial's run (its files, its settings) and a registered version under an alias."""

from __future__ import annotations

from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.tracking import MlflowClient

from trainers import metric_names as names
from tuning.mlflow_store import LOGGED_MODEL_NAME
from tuning.trial_records import TrialRecord


def register(client: MlflowClient, tracking_uri: str, experiment_id: str, record: TrialRecord,
             *, registered_model_name: str, alias: str) -> str:
    """Register `record`'s checkpoint (the epoch its trainer chose, `record.best_epoch`) as a new
    version of `registered_model_name`, under `alias`; returns the version."""
    tags = {"validation_paper_distance": f"{record.objective:.4f}", "epoch": str(record.best_epoch)}
    if record.test:
        tags["test_paper_distance"] = f"{record.test[names.PAPER_DISTANCE]:.4f}"
    # A logged model of the trial's run, so the UI lists it under "Logged models" and
    # runs:/RUN_ID/model still finds its files.
    logged = client.create_logged_model(
        experiment_id, name=LOGGED_MODEL_NAME, source_run_id=record.run_id, tags=tags,
        params={k: str(v) for k, v in record.params.items()}, model_type=registered_model_name)
    client.log_model_artifacts(logged.model_id, record.checkpoint_path)
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    # An output of the trial's run, at the epoch it holds: the run's page lists it.
    client.log_outputs(record.run_id, [LoggedModelOutput(logged.model_id, step=record.best_epoch)])
    try:
        client.get_registered_model(registered_model_name)
    except Exception:  # mlflow raises RestException/MlflowException for "not found" by store
        client.create_registered_model(registered_model_name)
    # The version's source is the logged model, which the UI links to. MLflow's registry
    # resolves a models:/ source through the process-wide tracking URI, not this client's.
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        version = client.create_model_version(registered_model_name, f"models:/{logged.model_id}",
                                              run_id=record.run_id, tags=tags, model_id=logged.model_id)
    finally:
        mlflow.set_tracking_uri(previous)
    client.set_registered_model_alias(registered_model_name, alias, version.version)
    return version.version
