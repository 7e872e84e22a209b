"""Training on a multi-node Ray cluster, faked in one machine with ray.cluster_utils.Cluster.

The head holds no CPU (like cluster.yaml's head), two worker nodes hold one CPU and one logical
GPU each, so a 2-worker trial must put one DDP rank on each node. Storage is one shared folder,
standing in for S3. Removing a node while a trial trains on it must restart the worker group
from the trial's last checkpoint, not from epoch 0, and a whole search that loses a node must
still account for every trial.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from trainers.data import load_dataset_dir

PROJECT = Path(__file__).resolve().parent.parent
TINY_TOOLRAG = yaml.safe_load((PROJECT / "search_spaces" / "presets" / "toolrag" / "tiny.yaml").read_text())
TARGETS = {"tool_recall": {"value": 0.99, "tolerance": 0.01}, "tool_count": {"value": 3.97, "tolerance": 0.1}}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    from tuning.cluster import LOCAL_RAY_ENV

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1"})
    workers = [cluster.add_node(num_cpus=1, num_gpus=1, resources={f"slot_{i}": 1}) for i in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address,
             runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT), **LOCAL_RAY_ENV}})
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def _toolrag_loop(data_dir: Path, cache: Path, **overrides) -> dict:
    """The tiny preset's ToolRAG settings, as the driver would hand them to a trial."""
    from trainers.models import resolve_source
    from trainers.toolrag import ToolRAGConfig

    dataset = load_dataset_dir(data_dir)
    data = {split: {"queries": [e.query for e in examples], "labels": [e.label_vector for e in examples]}
            for split, examples in (("train", dataset.train), ("val", dataset.val))}
    model_path = resolve_source(TINY_TOOLRAG["model"]["name_or_path"], "model", "--model-path")
    settings = {**TINY_TOOLRAG["trainer"], "model_path": str(model_path),
                "architecture": TINY_TOOLRAG["model"]["architecture"], "cache_dir": str(cache), "targets": TARGETS,
                "max_train_examples": None, "max_eval_examples": None, "learning_rate": 3e-3, "batch_size": 16,
                "pos_weight": 5.0, **overrides}
    return {"trainer": ToolRAGConfig.model_validate(settings).model_dump(), "data": data, "data_fingerprint": "mn"}


def _fit(loop: dict, workers: int, storage: Path, name: str, retries: int = 0, reports: Path | None = None):
    """Fit a Train run; with `reports`, every report's figures are appended there as JSON lines
    (Result.metrics holds only the last checkpoint's, i.e. the best epoch's)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
    from ray.train.torch import TorchTrainer

    from trainers.toolrag import train_fn_per_worker

    class Recorder(UserCallback):  # runs in the Train controller
        def after_report(self, run_context, metrics, checkpoint):
            with open(reports, "a") as out:
                out.write(json.dumps({k: v for k, v in metrics[0].items() if isinstance(v, (int, float))}) + "\n")

    trainer = TorchTrainer(
        train_fn_per_worker, train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=str(storage), checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=retries),
                             callbacks=[Recorder()] if reports else None),
    )
    return trainer.fit()


def _add_a_spare_node(head_cluster) -> None:
    """Room for the restarted workers, whichever node is lost."""
    head_cluster.add_node(num_cpus=1)
    head_cluster.wait_for_nodes()


def _remove_the_training_node(head_cluster, train_storage: Path, timeout_s: float = 300) -> str:
    """Once a Train run under train_storage has registered a checkpoint, remove the node its
    (only) live worker runs on; returns that run's folder name.

    It waits for the controller's snapshot to list the checkpoint, not merely for one on disk:
    a restart before that would rightly start from epoch 0.
    """
    from ray.util.state import list_actors

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        snapshots = list(train_storage.glob("*/checkpoint_manager_snapshot.json"))
        if snapshots and "checkpoint_" in snapshots[0].read_text():
            break
        time.sleep(0.1)
    else:
        raise AssertionError("no checkpoint registered")
    worker = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])[0]
    head_cluster.remove_node(next(node for node in head_cluster.list_all_nodes() if node.node_id == worker.node_id))
    return snapshots[0].parent.name


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_on_two_nodes_match_one_worker(cluster, small_data_dir, tmp_path):
    import ray
    from ray.util.state import list_actors

    # Without dropout and length grouping, a global batch of 16 split into two ranks of 8 holds
    # the same examples as one worker's batch of 16, and DDP's mean of the two ranks' gradients
    # is that batch's gradient: the two runs must train the same model, up to float rounding.
    loop = _toolrag_loop(small_data_dir, tmp_path / "cache", epochs=3, length_grouping=1,
                         architecture={**TINY_TOOLRAG["model"]["architecture"], "hidden_dropout_prob": 0.0,
                                       "attention_probs_dropout_prob": 0.0, "cls_dropout": 0.0})
    assert len(loop["data"]["train"]["queries"]) % 2 == 0  # else rank 1 repeats an example
    nodes_seen: list[set[str]] = []
    stop = threading.Event()

    def watch() -> None:  # which nodes host Train workers while the 2-worker run trains
        while not stop.is_set():
            alive = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            nodes_seen.append({actor.node_id for actor in alive})
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    two = _fit(loop, 2, tmp_path / "shared", "two-nodes", reports=tmp_path / "two.jsonl").metrics
    stop.set()
    watcher.join()
    one = _fit(loop, 1, tmp_path / "shared", "one-node", reports=tmp_path / "one.jsonl").metrics
    worker_nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU")}
    assert any(seen == worker_nodes for seen in nodes_seen), nodes_seen  # one rank on each node
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["eval_examples"] == one["eval_examples"]
    reports = {name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
               for name in ("one", "two")}
    assert len(reports["one"]) == len(reports["two"]) == 3
    for one_epoch, two_epoch in zip(reports["one"], reports["two"]):
        assert two_epoch["train_loss"] == pytest.approx(one_epoch["train_loss"], rel=1e-4), reports
        for metric in ("tool_recall", "tool_count", "tool_precision"):
            assert two_epoch[metric] == pytest.approx(one_epoch[metric], abs=1e-9), (metric, reports)
    assert reports["two"][-1]["train_loss"] < reports["two"][0]["train_loss"]  # and it trains
    assert list((tmp_path / "shared" / "two-nodes").glob("checkpoint_*"))  # written to the shared folder


@pytest.mark.ray
@pytest.mark.slow
def test_a_lost_node_resumes_the_trial_from_its_last_checkpoint(cluster, small_data_dir, tmp_path):
    head_cluster, _ = cluster
    _add_a_spare_node(head_cluster)
    # Enough epochs (about a second each) that the run is still training when the node goes:
    # the node is removed only after the controller has registered a checkpoint.
    loop = _toolrag_loop(small_data_dir, tmp_path / "cache", epochs=20)
    storage = tmp_path / "shared"
    outcome: dict = {}
    reports = tmp_path / "reports.jsonl"
    runner = threading.Thread(target=lambda: outcome.update(
        result=_fit(loop, 1, storage, "node-loss", retries=2, reports=reports)))
    runner.start()
    _remove_the_training_node(head_cluster, storage)
    runner.join(timeout=300)
    result = outcome["result"]
    assert result.error is None
    epochs = [json.loads(line) for line in reports.read_text().splitlines()]
    assert epochs[-1]["epoch"] == 20, "the run trained to its last epoch"
    # The restarted worker group read the checkpoint: it went on after that epoch.
    resumed = [e for e in epochs if e["resumed_from_epoch"] >= 1]
    assert resumed and resumed[0]["epoch"] == resumed[0]["resumed_from_epoch"] + 1
    print(f"\n[node-loss] the restarted worker group resumed after epoch {resumed[0]['resumed_from_epoch']}")


def _search_on(cluster_address: str, tmp_path: Path, epochs: int, num_samples: int, *flags: str):
    """A tiny ToolRAG search as `search.py --address` runs it, prepared in this process (which is
    connected to the fake cluster) so the test can act on the cluster while it runs."""
    from tuning.prepare import prepare
    from tuning.search import parse_args

    preset = {**TINY_TOOLRAG, "trainer": {**TINY_TOOLRAG["trainer"], "epochs": epochs},
              "search": {**TINY_TOOLRAG["search"], "num_samples": num_samples}}
    preset_file = tmp_path / "preset.yaml"
    preset_file.write_text(yaml.safe_dump(preset))
    results = tmp_path / "results"
    return prepare(parse_args(["--model", "toolrag", "--preset", str(preset_file), "--address", cluster_address,
                               "--results-dir", str(results), "--experiment-name", "multinode",
                               # What is tested is where trials run and how they survive a lost node.
                               "--no-full-budget-reruns", *flags]))


def _in_background(prepared) -> tuple[threading.Thread, dict[str, Any]]:
    from tuning.execute import execute

    outcome: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: outcome.update(code=execute(prepared)), daemon=True)
    runner.start()
    return runner, outcome


@pytest.mark.ray
@pytest.mark.slow
def test_the_gpu_request_is_checked_against_the_nodes_logical_gpus(cluster):
    from tuning.cluster import infeasible_request

    assert infeasible_request(1, 1, 1) is None  # each worker node has one logical GPU
    problem = infeasible_request(1, 1, 2)
    assert problem is not None and "--gpus-per-worker 2" in problem and "1 GPU" not in problem.split("(")[0]


@pytest.mark.ray
@pytest.mark.slow
def test_trials_run_on_the_only_node_that_holds_their_request(cluster, tmp_path, mlflow_runs):
    import ray
    from ray.util.state import list_actors

    head_cluster, _ = cluster
    big = head_cluster.add_node(num_cpus=2)
    head_cluster.wait_for_nodes()
    prepared = _search_on(head_cluster.address, tmp_path, 2, 2, "--cpus-per-worker", "2")
    # 4 CPUs in all, but only one node holds a 2-CPU worker: one trial at a time, not two whose
    # second waits for a worker group that cannot start.
    from tuning.cluster import default_concurrency

    request = prepared.request
    assert default_concurrency(workers_per_trial=request.workers_per_trial, cpus_per_worker=request.cpus_per_worker,
                               gpus_per_worker=request.gpus_per_worker) == 1
    runner, outcome = _in_background(prepared)
    nodes_seen: set[str] = set()
    deadline = time.time() + 600
    while runner.is_alive():
        assert time.time() < deadline, "the search did not end within 10 minutes"
        alive = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        nodes_seen.update(actor.node_id for actor in alive)
        time.sleep(0.3)
    head_cluster.remove_node(big)
    assert outcome["code"] == 0
    assert nodes_seen == {big.node_id}, (nodes_seen, big.node_id)
    _, runs = mlflow_runs(prepared.tracking_uri, "multinode", "trial")
    searched = [run for run in runs if "full_budget_for" not in run.data.tags]
    assert len(searched) == 2 and all(run.info.status == "FINISHED" for run in runs)
    assert ray.is_initialized()  # the search joined this cluster; it did not start its own Ray


@pytest.mark.ray
@pytest.mark.slow
def test_a_search_that_loses_a_node_resumes_the_trial_and_accounts_for_every_trial(cluster, tmp_path, mlflow_runs):
    head_cluster, _ = cluster
    _add_a_spare_node(head_cluster)
    # One trial at a time, so the node to remove is the one node training.
    prepared = _search_on(head_cluster.address, tmp_path, 6, 3, "--max-concurrent", "1")
    assert prepared.request.retries_per_trial == 2  # the default with --address
    runner, outcome = _in_background(prepared)
    hit_run = _remove_the_training_node(head_cluster, Path(prepared.request.storage_path) / "train")
    hit_trial = hit_run.rsplit("-", 1)[1]
    runner.join(timeout=600)
    assert not runner.is_alive() and outcome["code"] == 0

    client, runs = mlflow_runs(prepared.tracking_uri, "multinode", "trial")
    assert all(run.info.status == "FINISHED" for run in runs), [r.info.status for r in runs]
    searched = [run for run in runs if "full_budget_for" not in run.data.tags]
    assert len(searched) == 3
    (hit,) = [run for run in runs if run.data.tags["trial_id"] == hit_trial]
    # The retry is visible, and the trial went on from its checkpoint to the last epoch.
    assert hit.data.tags["retried"] == "true" and int(hit.data.tags["resumed_from_epoch"]) >= 1
    assert hit.data.metrics["epochs_completed"] == 6
    (parent,) = mlflow_runs(prepared.tracking_uri, "multinode", "parent")[1]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_total"] == 3 + parent.data.metrics["full_budget_reruns"]
    assert parent.data.metrics["trials_failed"] == 0
    print(f"\n[node-loss search] trial {hit_trial} resumed after epoch {hit.data.tags['resumed_from_epoch']}; "
          f"3 of 3 trials finished")
