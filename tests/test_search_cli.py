"""The real CLI as a user types it, each search in a fresh process that starts its own Ray.

Kept apart from test_search.py: that module holds a Ray for its whole run, and a second
local Ray on the same machine (its dashboard cannot take the same ports) fails to release
finished trials' placement groups, so the later trials wait for CPUs forever.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

PROJECT = Path(__file__).resolve().parent.parent



# Fake credentials of the kinds a user's shell holds; none may reach MLflow or any result file.
FAKE_SECRETS = {
    "HF_TOKEN": "hf_FAKEtokenDoNotLog0123456789",
    "HUGGING_FACE_HUB_TOKEN": "hf_FAKEhubTokenDoNotLog98765",
    "AWS_ACCESS_KEY_ID": "AKIAFAKEDONOTLOG0000",
    "AWS_SECRET_ACCESS_KEY": "fakeSecretKeyDoNotLog/abcdefghijklmnop",
    "MLFLOW_TRACKING_TOKEN": "mlflowFakeTokenDoNotLog42",
}


@pytest.mark.ray
@pytest.mark.slow
def test_the_readme_smoke_command_exits_0_and_logs_no_secret(tmp_path):
    """The documented command, as a user types it, in a fresh process with its own Ray, run
    with fake tokens and keys in the environment: none appears in MLflow or on disk."""
    uri = f"sqlite:///{tmp_path / 'x.db'}"
    completed = subprocess.run(
        [sys.executable, "tuning/search.py", "--model", "toolrag", "--smoke", "--tracking-uri", uri,
         "--storage", str(tmp_path / "storage"), "--results-dir", str(tmp_path / "results")],
        cwd=PROJECT, capture_output=True, text=True, timeout=900, env={**os.environ, **FAKE_SECRETS},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Closest to the paper" in completed.stdout
    client = MlflowClient(uri)
    assert client.get_model_version_by_alias("tinyagent-toolrag", "closest-to-paper")
    _check_quiet_console(completed, tmp_path / "results", trials=4)

    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    logged = [str(run.data.params) + str(run.data.tags) for run in runs]
    files = [path for path in tmp_path.rglob("*") if path.is_file()]  # store, artifacts, Ray results
    assert runs and len(files) > 20
    for name, secret in FAKE_SECRETS.items():
        assert not any(secret in text for text in logged), f"{name} in MLflow params or tags"
        for path in files:
            assert secret.encode() not in path.read_bytes(), f"{name} in {path}"
        assert secret not in completed.stdout + completed.stderr


def _check_quiet_console(completed, results: Path, trials: int) -> None:
    """The default console: phase lines and one progress line per ended trial before the
    closing table, no Ray Train internals, and the logs where the console says they are."""
    before_table = completed.stdout[: completed.stdout.index("Closest to the paper")].splitlines()
    assert len(before_table) <= 40, "\n".join(before_table)
    everything = completed.stdout + completed.stderr
    for internal in ("TrainingReport(", "Trial status", "Checkpoint successfully created", "Writing model shards",
                     "Started training worker group"):
        assert internal not in everything, internal
    progress = [line for line in before_table if re.match(r"\[search\] \d+/\d+ trials ended", line)]
    assert [line.split()[1] for line in progress[:trials]] == [f"{n}/{trials}" for n in range(1, trials + 1)]
    # Then one line per full-budget rerun, the total grown by the reruns announced.
    reruns = len(progress) - trials
    total = trials + reruns
    assert [line.split()[1] for line in progress[trials:]] == [f"{n}/{total}" for n in range(trials + 1, total + 1)]
    assert reruns == 0 or any(line.startswith(f"[full budget] {reruns} rerun(s)") for line in before_table)
    assert "closest so far: distance" in progress[-1]
    (logs_line,) = [line for line in before_table if line.startswith("[logs]")]
    log_file = Path(re.search(r"logs: (\S+search\.log)", logs_line).group(1))
    assert log_file.is_relative_to(results) and "Started a local Ray instance" in log_file.read_text()
    workers = log_file.parent / "ray-logs"
    assert workers.is_dir() and list(workers.glob("worker-*.out"))
    (report_line,) = [line for line in completed.stdout.splitlines() if line.startswith("[report] ")]
    assert Path(report_line.split()[1]).is_file()


@pytest.mark.ray
@pytest.mark.parametrize("flag, value, resource", [("--gpus-per-worker", "1", "GPU"), ("--cpus-per-worker", "3", "CPU")])
def test_a_request_no_node_can_hold_fails_fast_naming_the_resource(tmp_path, flag, value, resource):
    """This machine has 2 CPUs and no GPU: the search must refuse at once, not wait forever."""
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "tuning/search.py", "--model", "toolrag", "--smoke", flag, value,
         "--results-dir", str(tmp_path / "results")],
        cwd=PROJECT, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - started
    assert completed.returncode == 2, completed.stderr[-2000:]
    last = [line for line in completed.stderr.splitlines() if line.strip()][-1]
    assert f"{flag} {value}" in last and resource in last, last
    assert "Traceback" not in completed.stderr
    assert elapsed < 30, f"took {elapsed:.0f} s"
    # Refused before any MLflow run or trial storage exists (only the generated data is kept,
    # complete, for the next search to reuse).
    results = tmp_path / "results"
    assert not (results / "mlflow.db").exists() and not (results / "ray").exists()
    assert sorted(p.name for p in results.iterdir()) == ["data"]


@pytest.mark.ray
@pytest.mark.slow
def test_pareto_objective_runs_multi_objective_optuna_and_tags_the_front(tmp_path, mlflow_runs):
    uri = f"sqlite:///{tmp_path / 'p.db'}"
    completed = subprocess.run(
        [sys.executable, "tuning/search.py", "--model", "toolrag", "--smoke", "--objective", "pareto",
         "--num-samples", "3", "--tracking-uri", uri, "--results-dir", str(tmp_path / "results"),
         "--experiment-name", "pareto", "--verbose"],
        cwd=PROJECT, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Pareto front (recall up, tools retrieved down)" in completed.stdout
    # --verbose: Tune's trial table and the workers' output are back on the console (here the
    # in-process trials': each trial is its own worker).
    assert "Trial status" in completed.stdout and "(train_in_process pid=" in completed.stdout + completed.stderr
    client, trials = mlflow_runs(uri, "pareto", "trial")
    _, (parent,) = mlflow_runs(uri, "pareto", "parent")
    assert "pareto" in {Path(a.path).stem for a in client.list_artifacts(parent.info.run_id, "plots")}
    page = tmp_path / "results" / f"report-{parent.info.run_name}.html"
    assert "Pareto front (recall up, tools retrieved down)" in page.read_text()
    front = [run for run in trials if run.data.tags.get("pareto_front") == "true"]
    assert front
    # No trial outside the front beats a front member on both recall and tools retrieved.
    for member in front:
        for other in trials:
            better_recall = other.data.metrics["final_tool_recall"] > member.data.metrics["final_tool_recall"]
            fewer_tools = other.data.metrics["final_tool_count"] < member.data.metrics["final_tool_count"]
            assert not (better_recall and fewer_tools)


PLANNER_PARAMS = ("learning_rate", "batch_size", "prompt_template", "lora_r", "lora_alpha", "lora_dropout")


@pytest.mark.ray
@pytest.mark.slow
def test_planner_smoke_search_tracks_trials_templates_and_plans(tmp_path, mlflow_runs, toolrag_checkpoint):
    """`--model planner --smoke`: the base is built, LoRA trials run, MLflow holds each trial's
    params, plan_success and sample plans, and the closest adapter is registered."""
    uri = f"sqlite:///{tmp_path / 'planner.db'}"
    command = [sys.executable, "tuning/search.py", "--model", "planner", "--smoke", "--tracking-uri", uri,
               "--storage", str(tmp_path / "storage"), "--results-dir", str(tmp_path / "results"),
               "--experiment-name", "planner-smoke"]
    completed = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "[base] building the local planner base" in completed.stdout
    # Every template has a full-budget trial (a rerun where ASHA stopped all of its trials), scored
    # on test, and the best two are compared on the same test examples.
    comparison = completed.stdout[completed.stdout.index("Each prompt_template's best full-budget trial"):]
    assert "  => " in comparison and "McNemar p = " in comparison.splitlines()[4]
    client, trials = mlflow_runs(uri, "planner-smoke", "trial")
    templates = {run.data.params["prompt_template"] for run in trials
                 if run.data.tags.get("stopped_early") == "false" and run.info.status == "FINISHED"}
    assert templates == {"concat", "instruct", "chat"}
    for template in templates:
        assert f"  `{template}` " in comparison
    assert len(trials) >= 3
    for run in trials:
        assert set(PLANNER_PARAMS) <= set(run.data.params), run.data.params.keys()
        assert 0.0 <= run.data.metrics["plan_success"] <= 1.0
        assert "tool_set_accuracy" in run.data.metrics and "paper_distance" in run.data.metrics
        samples = [a.path for a in client.list_artifacts(run.info.run_id, "sample_plans")]
        assert samples, "each trial keeps the plans it generated"
    assert len({run.data.params["prompt_template"] for run in trials}) >= 2
    finished = [run for run in trials if run.data.metrics.get("epochs_completed") == 2]
    assert finished and all(run.data.metrics["final_eval_examples"] == 24 for run in finished)
    for run in (r for r in trials if r.info.status == "FINISHED"):  # ASHA-stopped trials included
        low, value, high = (run.data.metrics[f"test_plan_success{s}"] for s in ("_ci_low", "", "_ci_high"))
        assert low <= value <= high and run.data.metrics["test_eval_examples"] == 24
        assert "test_paper_distance" in run.data.metrics
    _, (parent,) = mlflow_runs(uri, "planner-smoke", "parent")
    assert parent.data.params["val_fraction"] == "0.1"
    assert "templates" in {Path(a.path).stem for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "**Best plan_success per prompt_template**" in parent.data.tags["mlflow.note.content"]
    assert {"test_queries_in_train", "unparseable_targets"} <= set(parent.data.metrics)
    # The paper's untuned row: the base before any LoRA, on the same validation and test examples.
    assert "The base before any fine-tuning (the dataset's own prompt" in completed.stdout
    untuned = {k: v for k, v in parent.data.metrics.items() if k.startswith("untuned_")}
    assert untuned["untuned_val_eval_examples"] == 24 and untuned["untuned_test_eval_examples"] == 24
    assert (untuned["untuned_test_plan_success_ci_low"] <= untuned["untuned_test_plan_success"]
            <= untuned["untuned_test_plan_success_ci_high"])
    # Epoch 1 scores the 12-example subset (ASHA's signal); the last epoch the whole 24.
    for run in finished:
        history = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "eval_examples"),
                                           key=lambda m: m.step)]
        assert history == [12, 24]
    version = client.get_model_version_by_alias("tinyagent-planner", "closest-to-paper")
    (tmp_path / "samples").mkdir()
    folder = Path(client.download_artifacts(version.run_id, "sample_plans", str(tmp_path / "samples")))
    sample = json.loads(sorted(folder.glob("*.json"))[-1].read_text())
    assert {"question", "generated", "target", "plan_success"} <= set(sample[0])

    # A second search in the same results folder reuses the data, the base and the sqlite store;
    # its closest trial is then evaluated with a ToolRAG model building its prompts.
    again = subprocess.run(command + ["--num-samples", "1", "--evaluate-with-toolrag", str(toolrag_checkpoint)],
                           cwd=PROJECT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[base] using the base model cached" in again.stdout
    closing = again.stdout[again.stdout.index("Closest to the paper"):]
    assert "Pipeline evaluation on the test split (24 examples)" in closing
    assert "plan success, with ToolRAG:" in closing and "(paper 0.8006)" in closing
    (evaluation,) = client.search_runs([client.get_experiment_by_name("tinyagent-evaluation").experiment_id])
    assert evaluation.data.metrics["examples"] == 24
    assert {"plan_success_full", "plan_success_with_toolrag", "mcnemar_full_vs_toolrag_p_value",
            "toolrag_tool_recall", "prompt_token_ratio"} <= set(evaluation.data.metrics)
    latest = client.get_model_version_by_alias("tinyagent-planner", "closest-to-paper")
    assert latest.version != version.version
    assert evaluation.data.params["planner_registered"] == f"tinyagent-planner/{latest.version}"
    assert latest.tags["evaluation_run_id"] == evaluation.info.run_id


@pytest.mark.ray
@pytest.mark.slow
def test_failing_trials_are_recorded_and_the_failure_budget_ends_the_search(tmp_path, mlflow_runs):
    """A preset whose LoRA targets a module the model lacks: every trial raises at start-up.
    Each is a FAILED run holding the reason, and the search stops at the failure budget
    instead of running all six."""
    preset = yaml.safe_load((PROJECT / "search_spaces" / "presets" / "planner" / "tiny.yaml").read_text())
    preset["trainer"]["lora_target_modules"] = ["no_such_proj"]
    preset_file = tmp_path / "broken-lora.yaml"
    preset_file.write_text(yaml.safe_dump(preset))
    uri = f"sqlite:///{tmp_path / 'budget.db'}"
    completed = subprocess.run(
        [sys.executable, "tuning/search.py", "--model", "planner", "--preset", str(preset_file), "--num-samples", "6",
         "--max-concurrent", "1", "--max-failed-trials", "2", "--tracking-uri", uri,
         "--results-dir", str(tmp_path / "results"), "--experiment-name", "budget"],
        cwd=PROJECT, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "The search stopped early: 2 trials failed (--max-failed-trials 2)" in completed.stdout
    # Each failure prints its reason and where its full log is, quiet as the console is.
    failures = [line for line in completed.stdout.splitlines() if line.startswith("[trial ") and " failed: " in line]
    assert len(failures) >= 2 and all("no_such_proj" in line for line in failures)
    assert all(Path(re.search(r"full log: (\S+)\)$", line).group(1)).is_file() for line in failures)
    client, trials = mlflow_runs(uri, "budget", "trial")
    failed = [run for run in trials if run.info.status == "FAILED"]
    assert len(failed) >= 2 and len(trials) < 6
    assert all("no_such_proj" in run.data.tags["error"] for run in failed)
    assert not [run for run in trials if run.info.status == "RUNNING"]
    _, parents = mlflow_runs(uri, "budget", "parent")
    assert [run.info.status for run in parents] == ["FAILED"]
    assert parents[0].data.metrics["trials_failed"] >= 2
