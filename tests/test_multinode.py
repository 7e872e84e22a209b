"""Training on a multi-node Ray cluster, faked in one machine with ray.cluster_utils.Cluster.

The head holds no CPU (like cluster.yaml's head), two worker nodes hold one CPU each, so a
2-worker trial must put one DDP rank on each node. Storage is one shared folder, standing in
for S3. Removing a node while a trial trains on it must restart the worker group from the
trial's last checkpoint, not from epoch 0.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

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

    from tuning.driver import LOCAL_RAY_ENV

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1"})
    workers = [cluster.add_node(num_cpus=1, resources={f"slot_{i}": 1}) for i in range(2)]
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
            for split, examples in (("train", dataset.train), ("test", dataset.test))}
    model_path = resolve_source(TINY_TOOLRAG["model"]["name_or_path"], "model", "--model-path")
    settings = {**TINY_TOOLRAG["trainer"], "model_path": str(model_path),
                "architecture": TINY_TOOLRAG["model"]["architecture"], "cache_dir": str(cache), "targets": TARGETS,
                "max_train_examples": None, "max_eval_examples": None, "learning_rate": 3e-3, "batch_size": 16,
                "pos_weight": 5.0, **overrides}
    return {"trainer": ToolRAGConfig.model_validate(settings).model_dump(), "data": data, "data_fingerprint": "mn"}


def _fit(loop: dict, workers: int, storage: Path, name: str, retries: int = 0):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainers.toolrag import train_fn_per_worker

    trainer = TorchTrainer(
        train_fn_per_worker, train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=str(storage), checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=retries)),
    )
    return trainer.fit()


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_on_two_nodes_match_one_worker(cluster, small_data_dir, tmp_path):
    import ray
    from ray.util.state import list_actors

    loop = _toolrag_loop(small_data_dir, tmp_path / "cache", epochs=3)
    nodes_seen: list[set[str]] = []
    stop = threading.Event()

    def watch() -> None:  # which nodes host Train workers while the 2-worker run trains
        while not stop.is_set():
            alive = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            nodes_seen.append({actor.node_id for actor in alive})
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    two = _fit(loop, 2, tmp_path / "shared", "two-nodes").metrics
    stop.set()
    watcher.join()
    one = _fit(loop, 1, tmp_path / "shared", "one-node").metrics
    worker_nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU")}
    assert any(seen == worker_nodes for seen in nodes_seen), nodes_seen  # one rank on each node
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["eval_examples"] == one["eval_examples"]
    # Same data and steps per epoch, split across two ranks: the same model quality within noise.
    assert abs(two["tool_recall"] - one["tool_recall"]) < 0.15
    assert abs(two["tool_count"] - one["tool_count"]) < 1.0
    assert list((tmp_path / "shared" / "two-nodes").glob("checkpoint_*"))  # written to the shared folder


@pytest.mark.ray
@pytest.mark.slow
def test_a_lost_node_resumes_the_trial_from_its_last_checkpoint(cluster, small_data_dir, tmp_path):
    from ray.util.state import list_actors

    head_cluster, _ = cluster
    head_cluster.add_node(num_cpus=1)  # room for the restarted worker whichever node is lost
    head_cluster.wait_for_nodes()
    loop = _toolrag_loop(small_data_dir, tmp_path / "cache", epochs=8)
    storage = tmp_path / "shared"
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=_fit(loop, 1, storage, "node-loss", retries=2)))
    runner.start()
    # Wait until the controller has registered a checkpoint (it records each in this snapshot),
    # not merely until one is on disk: a restart before that would rightly start from epoch 0.
    snapshot = storage / "node-loss" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 240
    while not (snapshot.exists() and "checkpoint_" in snapshot.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    assert time.time() < deadline, "no checkpoint registered"
    worker = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])[0]
    lost = next(node for node in head_cluster.list_all_nodes() if node.node_id == worker.node_id)
    head_cluster.remove_node(lost)
    runner.join(timeout=300)
    result = outcome["result"]
    assert result.error is None
    assert result.metrics["epoch"] == 8
    # The restarted worker group read the checkpoint: it went on after that epoch.
    assert result.metrics["resumed_from_epoch"] >= 1
    print(f"\n[node-loss] the restarted worker group resumed after epoch {result.metrics['resumed_from_epoch']}")
