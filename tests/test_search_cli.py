"""The real CLI as a user types it, each search in a fresh process that starts its own Ray.

Kept apart from test_search.py: that module holds a Ray for its whole run, and a second
local Ray on the same machine (its dashboard cannot take the same ports) fails to release
finished trials' placement groups, so the later trials wait for CPUs forever.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

PROJECT = Path(__file__).resolve().parent.parent



@pytest.mark.ray
@pytest.mark.slow
def test_the_readme_smoke_command_exits_0(tmp_path):
    """The documented command, as a user types it, in a fresh process with its own Ray."""
    uri = f"sqlite:///{tmp_path / 'x.db'}"
    completed = subprocess.run(
        [sys.executable, "tuning/search.py", "--model", "toolrag", "--smoke", "--tracking-uri", uri,
         "--storage", str(tmp_path / "storage"), "--results-dir", str(tmp_path / "results")],
        cwd=PROJECT, capture_output=True, text=True, timeout=900, env={**os.environ},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Closest to the paper" in completed.stdout
    client = MlflowClient(uri)
    assert client.get_model_version_by_alias("tinyagent-toolrag", "closest-to-paper")


@pytest.mark.ray
@pytest.mark.slow
def test_pareto_objective_runs_multi_objective_optuna_and_tags_the_front(tmp_path, mlflow_runs):
    uri = f"sqlite:///{tmp_path / 'p.db'}"
    completed = subprocess.run(
        [sys.executable, "tuning/search.py", "--model", "toolrag", "--smoke", "--objective", "pareto",
         "--num-samples", "3", "--tracking-uri", uri, "--results-dir", str(tmp_path / "results"),
         "--experiment-name", "pareto"],
        cwd=PROJECT, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Pareto front (recall up, tools retrieved down)" in completed.stdout
    _, trials = mlflow_runs(uri, "pareto", "trial")
    front = [run for run in trials if run.data.tags.get("pareto_front") == "true"]
    assert front
    # No trial outside the front beats a front member on both recall and tools retrieved.
    for member in front:
        for other in trials:
            better_recall = other.data.metrics["final_tool_recall"] > member.data.metrics["final_tool_recall"]
            fewer_tools = other.data.metrics["final_tool_count"] < member.data.metrics["final_tool_count"]
            assert not (better_recall and fewer_tools)
