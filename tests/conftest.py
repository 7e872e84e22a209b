"""Shared fixtures: synthetic data made once per session, and a local Ray started per test module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trainers import synthetic

# Tests never reach the hub: a hub name must fail at once, not after network retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset in the published format (300 train / 100 test records)."""
    folder = tmp_path_factory.mktemp("data")
    synthetic.write_dataset(folder, num_train=300, num_test=100, seed=7)
    return folder


@pytest.fixture(scope="module")
def ray_2_cpus():
    """A local Ray with 2 CPUs and the dashboard (Train needs it to clean up placement groups)."""
    import ray

    from tuning.ray_search import start_ray

    start_ray(address=None, num_cpus=2)
    yield ray
    ray.shutdown()


def _trial_or_parent_runs(uri: str, experiment: str, kind: str):
    """(client, runs) of one experiment whose tag `search` is 'trial' or 'parent'."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client, client.search_runs([experiment_id], f"tags.search = '{kind}'")


@pytest.fixture
def mlflow_runs():
    return _trial_or_parent_runs
