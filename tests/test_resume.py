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
    if runner == "ray-train":  # the reruns' resume is covered in-process; a TorchTrainer each costs ~20 s
        command.append("--no-full-budget-reruns")
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
    # Every requested trial is accounted for, none lost and none added (beside the full-budget
    # reruns the search owes after its trials, which repeat a searched configuration).
    searched = {trial: t for trial, t in after.items() if "full_budget_for" not in t["tags"]}
    assert lost == [] and len(searched) == NUM_SAMPLES, (lost, len(searched))
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
               for after_run in _runs(client, "trial") if "full_budget_for" not in after_run.data.tags]
    assert len(set(configs)) == len(configs), configs
    assert "interrupted trials continued; 0 were lost." in resumed.stdout
    print(f"\n[resume] {len(ended_before)} trials had ended before the kill (re-run after resume: 0), "
          f"{len(interrupted)} interrupted (resumed after epoch {resumed_at}), lost: {len(lost)}")


def _trial_processes() -> list[int]:
    """Ray worker processes running an in-process trial (Tune's function trainable)."""
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in listing.splitlines()
            if len(line.split(None, 1)) == 2 and line.split(None, 1)[1].startswith("ray::ImplicitFunc")]


@pytest.mark.ray
@pytest.mark.slow
def test_an_in_process_trial_whose_process_dies_is_retried_from_its_checkpoint(tmp_path):
    """The in-process runner's retries: the trial's process is killed (as the kernel's OOM killer
    would) after two epochs; Tune starts the trial again, which goes on from its checkpoint."""
    import yaml

    preset = yaml.safe_load((PROJECT / "search_spaces" / "presets" / "toolrag" / "tiny.yaml").read_text())
    preset["trainer"]["epochs"] = 8
    preset["search"].update(num_samples=1, grace_period=8)
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(preset))
    results = tmp_path / "results"
    command = [*SEARCH, "--model", "toolrag", "--preset", str(tmp_path / "long.yaml"), "--retries-per-trial", "1",
               "--no-full-budget-reruns",
               "--trial-runner", "in-process", "--results-dir", str(results), "--experiment-name", EXPERIMENT]
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    search = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        killed = None
        deadline = time.time() + 300
        while killed is None and time.time() < deadline:
            assert search.poll() is None, "the search ended before its trial could be killed"
            trials = _snapshot(client) if (results / "mlflow.db").exists() else {}
            if any(t["epochs"] >= 2 for t in trials.values()):
                (killed,) = _trial_processes()
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.3)
        assert killed is not None, "the trial never reached its second epoch"
        output, _ = search.communicate(timeout=600)
    finally:
        if search.poll() is None:
            os.killpg(search.pid, signal.SIGKILL)
    assert search.returncode == 0, output[-3000:]
    ((trial_id, trial),) = _snapshot(client).items()
    assert trial["status"] == "FINISHED"
    assert trial["tags"]["retried"] == "true" and int(trial["tags"]["resumed_from_epoch"]) >= 1
    steps = [point.step for point in client.get_metric_history(trial["run_id"], "paper_distance")]
    resumed_from = int(trial["tags"]["resumed_from_epoch"])
    # Every epoch reported; after the restart only those past the checkpoint were trained again.
    assert set(steps) == set(range(1, 9)) and all(steps.count(epoch) == 1 for epoch in range(1, resumed_from + 1))
    assert client.get_run(trial["run_id"]).data.metrics["epochs_completed"] == 8
    print(f"\n[retry] trial {trial_id}: process killed after epoch 2+, resumed after epoch "
          f"{trial['tags']['resumed_from_epoch']}, finished 8 epochs")
