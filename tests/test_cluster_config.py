"""cluster.yaml checked the way `ray up` checks it (Ray's schema and validator), with no cloud call."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

PROJECT = Path(__file__).resolve().parent.parent
CLUSTER = yaml.safe_load((PROJECT / "cluster.yaml").read_text())


def _validate(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_validator():
    prepared = _validate(CLUSTER)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert {"gpu_toolrag", "gpu_planner"} <= set(types)
    for name in ("gpu_toolrag", "gpu_planner"):
        assert types[name]["min_workers"] == 0 and types[name]["max_workers"] >= 1


def test_a_misspelt_key_fails_validation():
    broken = copy.deepcopy(CLUSTER)
    broken["available_node_types"]["gpu_planner"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        _validate(broken)


def test_nothing_listens_on_all_interfaces_and_ssh_is_the_only_opening():
    text = (PROJECT / "cluster.yaml").read_text()
    assert "0.0.0.0" not in text
    head = " ".join(CLUSTER["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert re.search(r"mlflow server .*--host 127\.0\.0\.1", head)
    rules = CLUSTER["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    assert all(ip["CidrIp"].endswith("/32") for r in rules for ip in r["IpRanges"])


def test_setup_installs_the_readme_pins():
    setup = " ".join(CLUSTER["setup_commands"])
    assert "torch==2.13.0" in setup and "-e" in setup and "constraints.txt" in setup
    dependencies = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in dependencies
    assert "ray[default,tune,train]==2.60.0" in dependencies
