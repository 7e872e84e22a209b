"""Shared fixtures: synthetic data made once per session, and a local Ray started per test module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trainers import synthetic

# Tests never reach the hub: a hub name must fail at once, not after network retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run_in_process(train_fn, loop_config: dict, run_dir: Path, stop_after_epoch: int | None = None) -> list[dict]:
    """The epochs one in-process run reports (the search's in-process trial runner, without
    Tune), figures only. With stop_after_epoch the run dies right after that epoch's report, as
    a trial does when its process is killed."""
    from trainers.epoch_loop import InProcessSession

    reports = []

    class Killed(Exception):
        pass

    def relay(metrics):
        reports.append({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
        if stop_after_epoch is not None and metrics["epoch"] == stop_after_epoch:
            raise Killed

    import torch

    threads = torch.get_num_threads()  # the session sets this process's threads to its CPUs
    try:
        train_fn(loop_config, session=InProcessSession(str(run_dir), relay=relay, cpus=1))
    except Killed:
        pass
    finally:
        torch.set_num_threads(threads)
    return reports


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

    from tuning.cluster import start_ray

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


@pytest.fixture(scope="session")
def toolrag_checkpoint(tmp_path_factory) -> Path:
    """A ToolRAG checkpoint folder as a trial writes it: the tiny preset's model, untrained."""
    import yaml
    from transformers import AutoTokenizer

    from trainers import toolrag
    from trainers.models import resolve_source

    project = Path(__file__).resolve().parent.parent
    preset = yaml.safe_load((project / "search_spaces" / "presets" / "toolrag" / "tiny.yaml").read_text())
    minilm = resolve_source(preset["model"]["name_or_path"], "model", "--model-path")
    folder = tmp_path_factory.mktemp("toolrag-checkpoint")
    config = toolrag.ToolRAGConfig(
        model_path=str(minilm), architecture=preset["model"]["architecture"], cache_dir=str(folder / "cache"),
        max_length=48, targets={"tool_recall": {"value": 0.99, "tolerance": 0.01},
                                "tool_count": {"value": 3.97, "tolerance": 0.1}})
    toolrag._save_checkpoint(toolrag.build_classifier(config), AutoTokenizer.from_pretrained(minilm), config,
                             str(folder / "model"))
    return folder / "model"
