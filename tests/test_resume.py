"""A search whose driver is SIGKILLed mid-way, then continued with `--resume`: through the real
CLI, each in a fresh process that starts its own Ray (the kill takes that Ray down with it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

PROJECT = Path(__file__).resolve().parent.parent
SEARCH = [sys.executable, str(PROJECT / "tuning" / "search.py")]
EXPERIMENT = "tinyagent-toolrag-tiny"
SEARCHED = ("pos_weight", "learning_rate", "batch_size", "prompt_template")
NUM_SAMPLES = 6


def _runs(client: MlflowClient, kind: str):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], f"tags.search = '{kind}'")


def _snapshot(client: MlflowClient) -> dict[str, dict]:
    """Per trial: its run, status, end time and how many epochs it has logged."""
    return {
        run.data.tags["trial_id"]: {
            "run_id": run.info.run_id, "status": run.info.status, "end_time": run.info.end_time,
            "epochs": len(client.get_metric_history(run.info.run_id, "paper_distance")),
            "tags": dict(run.data.tags),
        }
        for run in _runs(client, "trial")
    }


def _wait_for_a_mid_search_moment(client: MlflowClient, process: subprocess.Popen, timeout_s: float = 480) -> None:
    """Until two trials have ended while another runs with at least one epoch (so a checkpoint)
    behind it, and no trial started in the last 4 s (Tune saves its state every 2 s: a trial
    younger than that may be unknown to the saved state, which is the case `trials_lost` counts,
    not the one tested here)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert process.poll() is None, "the search ended before it could be interrupted"
        trials = _snapshot(client)
        ended = [t for t in trials.values() if t["status"] != "RUNNING"]
        running = [t for t in trials.values() if t["status"] == "RUNNING"]
        newest = max((r.info.start_time for r in _runs(client, "trial")), default=0) / 1000
        if len(ended) >= 2 and any(t["epochs"] >= 1 for t in running) and time.time() - newest > 4:
            return
        time.sleep(0.3)
    raise AssertionError("no moment with two ended trials and one running trial past its first epoch")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("runner", ["in-process", "ray-train"])
def test_a_killed_search_resumes_without_rerunning_or_losing_trials(tmp_path, runner):
    results = tmp_path / "results"
    command = [*SEARCH, "--model", "toolrag", "--smoke", "--num-samples", str(NUM_SAMPLES), "--max-concurrent", "2",
               "--results-dir", str(results), "--trial-runner", runner]
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    with open(tmp_path / "first.log", "w") as log:
        # Its own session, so the kill reaches the driver and the Ray it started, as when the
        # machine running the driver dies.
        first = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while not (results / "mlflow.db").exists():
                time.sleep(0.5)
            _wait_for_a_mid_search_moment(client, first)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    before = _snapshot(client)
    (parent_before,) = _runs(client, "parent")
    assert parent_before.info.status == "RUNNING"  # nobody was left to close it
    ended_before = {trial: t for trial, t in before.items() if t["status"] != "RUNNING"}
    interrupted = {trial: t for trial, t in before.items() if t["status"] == "RUNNING"}
    assert len(ended_before) >= 2 and interrupted

    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = _snapshot(client)

    # The parent run continues: the same run, finished now, marked as resumed once.
    (parent,) = _runs(client, "parent")
    assert parent.info.run_id == parent_before.info.run_id
    assert parent.info.status == "FINISHED" and parent.data.tags["resumed"] == "1"
    # No run is left RUNNING; each interrupted trial's run was closed as KILLED and reopened
    # when its trial resumed.
    assert all(t["status"] in ("FINISHED", "FAILED", "KILLED") for t in after.values())
    for trial in interrupted:
        assert after[trial]["tags"].get("interrupted_by_driver_stop") == "true"
    lost = [trial for trial, t in after.items() if t["status"] == "KILLED"]
    # Every requested trial is accounted for, none lost and none added.
    assert lost == [] and len(after) == NUM_SAMPLES, (lost, len(after))
    # Ended trials were not trained again: their runs were not touched.
    for trial, t in ended_before.items():
        assert (after[trial]["end_time"], after[trial]["epochs"]) == (t["end_time"], t["epochs"]), trial
    # Interrupted trials continued from their checkpoint, not from epoch 0.
    resumed_at = {}
    for trial, t in interrupted.items():
        assert after[trial]["tags"].get("resumed_after_driver_stop") == "true"
        history = client.get_metric_history(after[trial]["run_id"], "resumed_from_epoch")
        resumed_at[trial] = max(point.value for point in history)
        if t["epochs"] >= 1:
            assert resumed_at[trial] >= 1, (trial, t["epochs"], resumed_at[trial])
    # The searcher kept its history: a fresh one would propose the warm start again.
    configs = [json.dumps({k: after_run.data.params[k] for k in SEARCHED}, sort_keys=True)
               for after_run in _runs(client, "trial")]
    assert len(set(configs)) == len(configs), configs
    assert "interrupted trials continued; 0 were lost." in resumed.stdout
    print(f"\n[resume] {len(ended_before)} trials had ended before the kill (re-run after resume: 0), "
          f"{len(interrupted)} interrupted (resumed after epoch {resumed_at}), lost: {len(lost)}")
