"""Ray's cluster plumbing (tuning/cluster.py), on a real local Ray: the private Ray APIs the
project wraps still answer as it expects, and no other module reaches for them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent


def test_only_tuning_cluster_touches_rays_private_apis():
    users = []
    for path in sorted([*PROJECT.glob("tuning/*.py"), *PROJECT.glob("trainers/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            text = ast.unparse(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.Attribute)) else ""
            if re.search(r"\bray\._private\b|ray\._private|\._local_tuner\b", text):
                users.append(path.name)
                break
    assert users == ["cluster.py"]


@pytest.mark.ray
def test_the_wrapped_private_apis_still_answer(ray_2_cpus, tmp_path):
    import ray
    from ray import tune

    from tuning import cluster

    gcs = ray.get_runtime_context().gcs_address
    assert cluster.bootstrap_address(gcs) == gcs
    assert re.fullmatch(r"127\.0\.0\.1:\d+", cluster.dashboard_address() or ""), cluster.dashboard_address()
    logs = cluster.session_logs_dir()
    assert logs is not None and logs.is_dir() and any(logs.iterdir())
    tuner = tune.Tuner(lambda config: None, run_config=tune.RunConfig(name="probe", storage_path=str(tmp_path)))
    assert isinstance(cluster.tuner_run_config(tuner), tune.RunConfig)
    assert cluster.tuner_run_config(tuner).name == "probe"


@pytest.mark.ray
def test_a_lone_cpu_rerun_takes_the_idle_lanes_cpus_up_to_one_node(ray_2_cpus):
    from tuning.cluster import rerun_cpu_share

    laptop = {"trial_runner": "in-process", "gpus_per_worker": 0, "cpus_per_worker": 1.0}
    assert rerun_cpu_share(**laptop, lanes=2, reruns=1) == 2
    assert rerun_cpu_share(**laptop, lanes=2, reruns=2) == 1
    assert rerun_cpu_share(**laptop, lanes=2, reruns=3) == 1
    # More lanes than one node's CPUs: a trial cannot span nodes, so the node caps the share.
    assert rerun_cpu_share(**laptop, lanes=4, reruns=1) == 2
    assert rerun_cpu_share(**{**laptop, "cpus_per_worker": 2.0}, lanes=2, reruns=1) == 1
    # GPU trials and Train worker groups keep their size.
    assert rerun_cpu_share(**{**laptop, "gpus_per_worker": 1.0}, lanes=2, reruns=1) == 1
    assert rerun_cpu_share(**{**laptop, "trial_runner": "ray-train"}, lanes=2, reruns=1) == 1
