"""Searches as Ray Jobs (tuning/jobs.py), through the real job API of a Ray head started here
on 127.0.0.1: submit and finish, stop and resume, two side by side, bad input refused."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

PROJECT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head --block` on 127.0.0.1 with a temporary folder; its dashboard URL.
    Stopping the blocking process stops the head and everything it started."""
    temp = tmp_path_factory.mktemp("ray-head")
    dashboard_port = _free_port()
    # Token authentication on, as on a cluster a team shares: the head, the jobs it runs and
    # this process's job client all use the token in ~/.ray/auth_token (Ray writes one when a
    # local Ray starts and there is none).
    auth = {"RAY_AUTH_MODE": "token"}
    saved = {key: os.environ.get(key) for key in auth}
    os.environ.update(auth)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (temp / "ray-start.log").open("w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={_free_port()}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp}", "--include-dashboard=true",
         # Its own agent port: another Ray on this machine holds the default one.
         f"--dashboard-agent-listen-port={_free_port()}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    from ray.job_submission import JobSubmissionClient

    try:
        deadline = time.time() + 120
        while True:
            try:
                client = JobSubmissionClient(address)
                client.list_jobs()
                break
            except Exception:
                assert process.poll() is None and time.time() < deadline, (temp / "ray-start.log").read_text()[-3000:]
                time.sleep(1)
        token_file = Path.home() / ".ray" / "auth_token"
        yield {"address": address, "client": client, "token": token_file.read_text().strip()}
    finally:  # the head goes, whether or not it came up
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _search_argv(root: Path, experiment: str, *extra: str) -> list[str]:
    return ["--model", "toolrag", "--smoke", "--trial-runner", "in-process", "--results-dir", str(root),
            "--experiment-name", experiment, *extra]


def _submit(head, argv: list[str], capsys) -> str:
    from tuning.search import main

    assert main([*argv, "--submit", "--address", head["address"]]) == 0
    printed = capsys.readouterr().out
    (line,) = [line for line in printed.splitlines() if line.startswith("[job] submitted ")]
    assert "ray job logs" in printed and "ray job stop" in printed and "python -m tuning.jobs" in printed
    return line.split()[2]


def _wait(head, job_id: str, statuses: set[str], timeout_s: float = 600) -> str:
    deadline = time.time() + timeout_s
    while True:
        status = str(head["client"].get_job_status(job_id).value)
        if status in statuses:
            return status
        assert time.time() < deadline and status in {"PENDING", "RUNNING"}, (
            status, head["client"].get_job_logs(job_id)[-3000:])
        time.sleep(2)


def _runs(root: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == experiment]
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("search") == "parent"]
    trials = [r for r in runs if r.data.tags.get("search") == "trial"]
    return parents, trials


def test_two_submitted_searches_finish_side_by_side_and_mlflow_knows_each_job(head, tmp_path, capsys):
    """Two searches submitted at once share the head's 2 CPUs: each finishes, with its own
    experiment, parent run and trials, and its parent run carries its job id. The head asks for
    a token, which --submit and the listing pass without being told."""
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as refused:  # no token, no answer
        urllib.request.urlopen(f"{head['address']}/api/jobs/", timeout=30)
    assert refused.value.code in (401, 403)
    first_root, second_root = tmp_path / "first", tmp_path / "second"
    first = _submit(head, _search_argv(first_root, "jobs-a", "--max-concurrent", "1"), capsys)
    second = _submit(head, _search_argv(second_root, "jobs-b", "--max-concurrent", "1"), capsys)
    for job_id in (first, second):
        assert _wait(head, job_id, {"SUCCEEDED", "FAILED", "STOPPED"}, timeout_s=900) == "SUCCEEDED", \
            head["client"].get_job_logs(job_id)[-3000:]
    for root, experiment, job_id in ((first_root, "jobs-a", first), (second_root, "jobs-b", second)):
        (parent,), trials = _runs(root, experiment)
        assert parent.data.tags["ray_job_id"] == job_id and parent.info.status == "FINISHED"
        assert len(trials) >= 4 and {t.info.status for t in trials} == {"FINISHED"}
        assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parent.info.run_id}
        logs = head["client"].get_job_logs(job_id)
        assert "Closest to the paper" in logs and "Trial status" not in logs  # the quiet console
        # The cluster's token reaches neither the job's output nor MLflow nor the results folder.
        assert len(head["token"]) >= 16 and head["token"] not in logs
        recorded = [str(run.data.params) + str(run.data.tags) for run in [parent, *trials]]
        assert not any(head["token"] in text for text in recorded)
        assert not any(head["token"].encode() in path.read_bytes() for path in root.rglob("*") if path.is_file())

    from tuning.jobs import main as jobs_main

    assert jobs_main(["--address", head["address"]]) == 0
    listed = capsys.readouterr().out.splitlines()
    for job_id, experiment, root in ((first, "jobs-a", first_root), (second, "jobs-b", second_root)):
        (row,) = [line for line in listed if line.startswith(job_id)]
        _, trials = _runs(root, experiment)
        assert "SUCCEEDED" in row and experiment in row and f"/{len(trials)}" in row and "#/experiments/" in row


def test_a_stopped_job_leaves_nothing_running_and_resumes_without_losing_a_trial(head, tmp_path, capsys):
    from ray.util.state import list_actors

    root = tmp_path / "results"
    argv = _search_argv(root, "jobs-stop", "--num-samples", "6", "--max-concurrent", "1")
    job_id = _submit(head, argv, capsys)
    _wait(head, job_id, {"RUNNING"})
    deadline = time.time() + 600
    # Read the store only once the job has created it: two processes creating one sqlite
    # store's tables at once collide.
    while "[mlflow] parent run" not in head["client"].get_job_logs(job_id):
        assert time.time() < deadline, head["client"].get_job_logs(job_id)[-3000:]
        time.sleep(1)
    while True:  # stop it once a trial has ended and another runs
        parents, trials = _runs(root, "jobs-stop")
        if any(t.info.status == "FINISHED" for t in trials) and any(t.info.status == "RUNNING" for t in trials):
            break
        assert time.time() < deadline, head["client"].get_job_logs(job_id)[-3000:]
        time.sleep(1)
    head["client"].stop_job(job_id)
    assert _wait(head, job_id, {"STOPPED", "FAILED", "SUCCEEDED"}) == "STOPPED"
    (parent,), trials = _runs(root, "jobs-stop")
    assert parent.info.status == "KILLED" and "--resume" in parent.data.tags["stopped_because"]
    assert "RUNNING" not in {t.info.status for t in trials}
    killed = [t for t in trials if t.info.status == "KILLED"]
    assert killed and all("ray job stop" in t.data.tags["error"] for t in killed)
    # The job's trial processes are gone with it.
    deadline = time.time() + 60
    while [a for a in list_actors(address=head["address"], filters=[("state", "=", "ALIVE")])
           if a.class_name.startswith("ImplicitFunc")]:
        assert time.time() < deadline
        time.sleep(1)

    resumed_id = _submit(head, [*argv, "--resume"], capsys)
    assert resumed_id != job_id
    assert _wait(head, resumed_id, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED", \
        head["client"].get_job_logs(resumed_id)[-3000:]
    (parent,), trials = _runs(root, "jobs-stop")
    assert parent.info.status == "FINISHED" and parent.data.tags["ray_job_id"] == resumed_id
    assert "stopped_because" not in parent.data.tags  # the stop's reason went with the stop
    searched = [t for t in trials if "full_budget_for" not in t.data.tags]
    numbers = sorted(int(t.data.tags["trial_number"]) for t in searched if t.info.status == "FINISHED")
    assert numbers == list(range(6)), numbers  # every trial once, none lost, none twice
    assert len({t.data.tags["trial_id"] for t in trials}) == len(trials)


def test_bad_input_through_submit_exits_2_before_any_job_exists(head, tmp_path, capsys):
    from tuning.search import main

    before = len(head["client"].list_jobs())
    for bad in (["--num-samples", "0"], ["--data", str(tmp_path / "missing")], ["--preset", "nope"]):
        code = main([*_search_argv(tmp_path / "results", "jobs-bad", *bad), "--submit", "--address", head["address"]])
        error = capsys.readouterr().err
        assert code == 2 and len([line for line in error.splitlines() if line.strip()]) == 1, error
    assert main(["--model", "toolrag", "--smoke", "--submit", "--address", "127.0.0.1:6379"]) == 2
    assert "http://127.0.0.1:8265" in capsys.readouterr().err
    assert len(head["client"].list_jobs()) == before
