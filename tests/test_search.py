"""The whole ToolRAG search, end to end: real Ray, Optuna, ASHA, Train workers and MLflow."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

SEARCHED = ("pos_weight", "learning_rate", "batch_size", "prompt_template")
# The generated data is drawn from the seed, so a search that must share the smoke search's
# data passes the same one.
SMOKE_SEED = "1"


@pytest.fixture(scope="module")
def smoke_search(ray_2_cpus, tmp_path_factory):
    """Run the --smoke search in this process, on the test's Ray, so Ray's state can be checked after."""
    from tuning.execute import execute
    from tuning.prepare import prepare
    from tuning.search import parse_args

    root = tmp_path_factory.mktemp("smoke")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # Ray Train's runner, as on a cluster: the placement-group and MLflow checks below cover it,
    # and the seeded pair of searches covers the in-process runner, the laptop default.
    # Seed 1: trials 3 and 4 rank in the worse half at their rungs (a trial is compared only with
    # trials that ended before it began, so a seed whose warm start is the worst stops none).
    args = parse_args(["--model", "toolrag", "--smoke", "--num-samples", "5", "--seed", SMOKE_SEED, "--results-dir", str(root),
                       "--tracking-uri", uri, "--storage", str(root / "storage"), "--experiment-name", "smoke",
                       "--trial-runner", "ray-train"])
    exit_code = execute(prepare(args))
    return {"exit_code": exit_code, "uri": uri, "root": root}



@pytest.mark.ray
@pytest.mark.slow
def test_search_records_every_trial_in_mlflow(smoke_search, mlflow_runs):
    assert smoke_search["exit_code"] == 0
    client, trials = mlflow_runs(smoke_search["uri"], "smoke", "trial")
    _, parents = mlflow_runs(smoke_search["uri"], "smoke", "parent")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.params["data_fingerprint"] and parent.data.tags["git_commit"]
    searched = [run for run in trials if "full_budget_for" not in run.data.tags]
    assert len(searched) == 5
    assert parent.data.metrics["trials_total"] == 5 + parent.data.metrics["full_budget_reruns"]
    assert sorted(int(run.data.tags["trial_number"]) for run in searched) == list(range(5))
    finished = [run for run in trials if run.info.status == "FINISHED"]
    assert len(finished) >= 3
    # Selection on validation, the test split scored once per trial, and what could not be
    # prevented in the data, on the parent.
    assert parent.data.params["val_fraction"] == "0.1" and int(parent.data.params["val_examples"]) > 0
    assert parent.data.metrics["test_queries_in_train"] == 0 and parent.data.metrics["unparseable_targets"] == 0
    assert parent.data.metrics["trials_scored_on_test"] == len(finished)
    for run in finished:  # ASHA-stopped trials included
        for metric in ("tool_recall", "tool_count"):
            low, value, high = (run.data.metrics[f"test_{metric}{suffix}"] for suffix in ("_ci_low", "", "_ci_high"))
            assert low <= value <= high, (run.info.run_name, metric)
        assert "test_paper_distance" in run.data.metrics
        assert run.data.metrics["test_eval_examples"] == 300  # the tiny preset's max_eval_examples
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert set(SEARCHED) <= set(run.data.params)
        for metric in ("tool_recall", "tool_count", "paper_distance", "final_paper_distance", "cpu_seconds"):
            assert metric in run.data.metrics, (run.info.run_name, metric)
        history = client.get_metric_history(run.info.run_id, "paper_distance")
        assert [m.step for m in history] == list(range(1, int(run.data.metrics["epochs_completed"]) + 1))
    # The warm start (toolrag-smoke.yaml) is evaluated in the first wave. Two trials start
    # at once on 2 CPUs and either may register first, so "first" means "among the first two";
    # a sampler would never draw these exact values.
    first_wave = sorted(trials, key=lambda run: run.info.start_time)[:2]
    assert any(float(run.data.params["pos_weight"]) == 60.0 and float(run.data.params["learning_rate"]) == 2e-3
               and run.data.params["batch_size"] == "32" and run.data.params["prompt_template"] == "query"
               for run in first_wave)


@pytest.mark.ray
@pytest.mark.slow
def test_asha_stops_trials_and_the_closest_is_tagged_and_registered(smoke_search, mlflow_runs):
    client, trials = mlflow_runs(smoke_search["uri"], "smoke", "trial")
    stopped = [run for run in trials if run.data.tags.get("stopped_early") == "true"]
    assert stopped, "ASHA stopped no trial"
    assert all(run.data.metrics["epochs_completed"] < 3 for run in stopped)
    ranked = sorted((run for run in trials if "closest_to_paper_rank" in run.data.tags),
                    key=lambda run: int(run.data.tags["closest_to_paper_rank"]))
    assert ranked and ranked[0].data.tags["closest_to_paper_rank"] == "1"
    distances = [run.data.metrics["final_paper_distance"] for run in ranked]
    assert distances == sorted(distances)
    assert distances[0] == min(run.data.metrics["final_paper_distance"] for run in trials)
    version = client.get_model_version_by_alias("tinyagent-toolrag", "closest-to-paper")
    assert version.run_id == ranked[0].info.run_id
    # The checkpoint is a logged model of the closest trial's run ("Logged models" in the UI).
    assert version.source.startswith("models:/m-")
    logged = client.get_logged_model(version.source[len("models:/"):])
    assert logged.source_run_id == ranked[0].info.run_id and str(logged.status) == "READY"
    # Artifacts live beside the store in the results directory, not in the caller's ./mlruns.
    download = client.get_model_version_download_uri("tinyagent-toolrag", version.version)
    assert download == logged.artifact_location and download.startswith((smoke_search["root"] / "mlartifacts").as_uri())
    model_files = {Path(a.path).name for a in client.list_logged_model_artifacts(logged.model_id)}
    assert {"config.json", "model.safetensors", "toolrag.json"} <= model_files
    import mlflow

    # As a user reads it: with the store as MLflow's tracking URI (MLflow resolves a logged model
    # through the process-wide URI), runs:/RUN_ID/model and models:/NAME@ALIAS give the files.
    mlflow.set_tracking_uri(smoke_search["uri"])
    for uri in (f"runs:/{version.run_id}/model", "models:/tinyagent-toolrag@closest-to-paper"):
        folder = Path(mlflow.artifacts.download_artifacts(uri))
        assert {"config.json", "model.safetensors", "toolrag.json"} <= {p.name for p in folder.iterdir()}, uri


@pytest.mark.ray
@pytest.mark.slow
def test_no_placement_group_is_left_and_every_cpu_is_free(smoke_search, ray_2_cpus):
    from ray.util import placement_group_table

    deadline = time.time() + 30
    while True:
        alive = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        cpus = ray_2_cpus.available_resources().get("CPU", 0)
        if (not alive and cpus == 2) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert alive == [] and cpus == 2


PLOTS = {"optimisation_history", "slices", "pos_weight", "templates", "epoch_curves"}


@pytest.mark.ray
@pytest.mark.slow
def test_mlflow_holds_the_answer_the_plots_the_datasets_and_the_report(smoke_search, mlflow_runs):
    """The experiment opens in the UI's training view; the parent run's description is the
    closest trials beside the paper's figures, linked; trial runs are named by their settings;
    the three splits are dataset inputs with their digests; the plots and the report page exist."""
    from trainers.data import load_dataset_dir, split_digest

    client, trials = mlflow_runs(smoke_search["uri"], "smoke", "trial")
    _, (parent,) = mlflow_runs(smoke_search["uri"], "smoke", "parent")
    experiment = client.get_experiment_by_name("smoke")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    closest = next(run for run in trials if run.data.tags.get("closest_to_paper_rank") == "1")
    note = parent.data.tags["mlflow.note.content"]
    link = f"#/experiments/{experiment.experiment_id}/runs/{closest.info.run_id}?workflowType=machine_learning"
    assert note.startswith(f"**Closest to the paper (chosen on validation):** trial [{closest.data.tags['trial_id']}]({link})")
    assert "**Paper:** tool_recall 0.99, tool_count gold + 1" in note
    ranked = [run for run in trials if "closest_to_paper_rank" in run.data.tags]
    rows = [line for line in note.splitlines() if line.startswith("| ") and "](#/experiments/" in line]
    assert len(rows) == len(ranked)
    assert f"{closest.data.metrics['final_paper_distance']:.3f}" in rows[0]

    for run in trials:  # named by their settings, then the trial id
        params = run.data.params
        assert run.info.run_name == (f"{params['prompt_template']} batch={params['batch_size']} "
                                     f"lr={float(params['learning_rate']):.2g} "
                                     f"pos_weight={float(params['pos_weight']):.3g} ({run.data.tags['trial_id']})")

    dataset = load_dataset_dir(Path(parent.data.params["data_source"]), val_fraction=0.1)
    digests = {"training": split_digest(dataset.train), "validation": split_digest(dataset.val),
               "test": split_digest(dataset.test)}

    def inputs(run_id):
        found = client.get_run(run_id).inputs.dataset_inputs
        return {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset.digest for d in found}

    assert inputs(parent.info.run_id) == digests
    for run in trials:  # trained and selected on train and validation; test once scored
        expected = dict(digests) if "test_paper_distance" in run.data.metrics else {
            k: v for k, v in digests.items() if k != "test"}
        assert inputs(run.info.run_id) == expected, run.info.run_name

    plots = {Path(a.path).stem for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert PLOTS <= plots and "pareto" not in plots
    page = smoke_search["root"] / f"report-{parent.info.run_name}.html"
    text = page.read_text()
    assert text.count("<img ") == len(plots)
    assert f"/runs/{closest.info.run_id}?workflowType=machine_learning" in text
    assert any(a.path == page.name for a in client.list_artifacts(parent.info.run_id))


@pytest.mark.ray
@pytest.mark.slow
def test_the_report_is_rebuilt_from_the_mlflow_store_alone(smoke_search, mlflow_runs, capsys):
    from tuning import report

    root, uri = smoke_search["root"], smoke_search["uri"]
    client, (parent,) = mlflow_runs(uri, "smoke", "parent")
    page = root / f"report-{parent.info.run_name}.html"
    before = page.read_text()
    page.unlink()
    client.set_tag(parent.info.run_id, "mlflow.note.content", "")
    assert report.main(["--experiment", "smoke", "--results-dir", str(root), "--tracking-uri", uri]) == 0
    assert f"[report] {page}" in capsys.readouterr().out
    after = page.read_text()
    # The same tables and links; the plots are redrawn, so only the text around them is compared.
    strip = lambda html: re.sub(r"data:image/png;base64,[^']+", "", html)  # noqa: E731
    assert strip(after) == strip(before)
    assert client.get_run(parent.info.run_id).data.tags["mlflow.note.content"] == parent.data.tags["mlflow.note.content"]

    missing = root / "no-store"
    assert report.main(["--experiment", "smoke", "--results-dir", str(missing)]) == 2
    assert "no MLflow store at" in capsys.readouterr().err and not missing.exists()
    assert report.main(["--experiment", "nope", "--results-dir", str(root), "--tracking-uri", uri]) == 2
    assert "--experiment nope: no such experiment" in capsys.readouterr().err


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _chromium_or_skip() -> str:
    """Debian's Chromium; CI installs it (.ci/run), so there its absence fails the test."""
    import os
    import shutil

    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return chromium


def _serve_mlflow(uri: str, log_file: Path):
    """`mlflow server` on 127.0.0.1 and a free port, over the search's store; (process, base URL)."""
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=log_file.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(base, timeout=5) as response:
                if response.status == 200:
                    return server, base
        except OSError:
            time.sleep(1)
        if server.poll() is not None:
            break
    server.kill()
    pytest.fail(f"mlflow server did not answer on {base}: {log_file.read_text()[-2000:]}")


@pytest.mark.ray
@pytest.mark.slow
def test_the_mlflow_ui_and_the_report_render_in_a_browser(smoke_search, mlflow_runs):
    """Headless Chromium against a real `mlflow server` over the search's store: the runs page
    lists every run, the parent run's page shows the description, a plot loads, and the report
    page shows every plot and links to the trials' runs. Screenshots go to RESULTS/screenshots."""
    chromium = _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    root, uri = smoke_search["root"], smoke_search["uri"]
    client, trials = mlflow_runs(uri, "smoke", "trial")
    _, (parent,) = mlflow_runs(uri, "smoke", "parent")
    experiment_id = client.get_experiment_by_name("smoke").experiment_id
    closest = next(run for run in trials if run.data.tags.get("closest_to_paper_rank") == "1")
    shots = root / "screenshots"
    shots.mkdir(exist_ok=True)
    server, base = _serve_mlflow(uri, root / "mlflow-server.log")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}#/experiments/{experiment_id}?workflowType=machine_learning")
            page.get_by_text(f"{len(trials) + 1} matching runs").wait_for(timeout=90_000)
            page.get_by_text(parent.info.run_name).first.wait_for()
            page.screenshot(path=shots / "mlflow-runs.png")

            page.goto(f"{base}#/experiments/{experiment_id}/runs/{parent.info.run_id}?workflowType=machine_learning")
            page.get_by_text("Closest to the paper (chosen on validation):").wait_for(timeout=60_000)
            page.get_by_role("link", name=closest.data.tags["trial_id"]).first.wait_for()
            if page.get_by_role("button", name="Close").count():  # the UI's assistant panel hides half the page
                page.get_by_role("button", name="Close").first.click()
            page.get_by_role("button", name="Expand description").click()
            page.locator("th", has_text="test tool_recall").first.wait_for()  # the Markdown table, rendered
            page.screenshot(path=shots / "mlflow-parent-run.png")

            page.goto(f"{base}#/experiments/{experiment_id}/runs/{parent.info.run_id}/artifacts/plots/pos_weight.png"
                      "?workflowType=machine_learning")
            page.wait_for_function("() => [...document.images].some(i => i.src.startsWith('blob:') && i.naturalWidth > 300)",
                                   timeout=60_000)
            page.screenshot(path=shots / "mlflow-plot.png")

            report = root / f"report-{parent.info.run_name}.html"
            page.goto(report.as_uri())
            widths = page.eval_on_selector_all("figure img", "images => images.map(i => i.naturalWidth)")
            plots = [a for a in client.list_artifacts(parent.info.run_id, "plots")]
            assert len(widths) == len(plots) and min(widths) > 300
            href = page.get_by_role("link", name=closest.data.tags["trial_id"]).first.get_attribute("href")
            assert href == f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{closest.info.run_id}?workflowType=machine_learning"
            page.screenshot(path=shots / "report.png", full_page=True)
            # The report's link, pointed at this server, opens the closest trial's run.
            page.goto(href.replace("http://127.0.0.1:5000/", base))
            page.get_by_text(closest.info.run_name).first.wait_for(timeout=60_000)
            # Its checkpoint is listed as the run's logged model, and as a registered version.
            version = client.get_model_version_by_alias("tinyagent-toolrag", "closest-to-paper")
            model_id = version.source[len("models:/"):]
            page.locator(f"a[href='#/experiments/{experiment_id}/models/{model_id}']").first.wait_for(timeout=30_000)
            page.locator(f"a[href='#/models/tinyagent-toolrag/versions/{version.version}']").first.wait_for()
            page.screenshot(path=shots / "mlflow-closest-trial.png")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert all((shots / name).stat().st_size > 10_000 for name in
               ("mlflow-runs.png", "mlflow-parent-run.png", "mlflow-plot.png", "report.png", "mlflow-closest-trial.png"))



@pytest.mark.ray
@pytest.mark.slow
def test_the_linear_baseline_runs_as_a_search_recorded_like_the_transformer(smoke_search, mlflow_runs, capsys):
    """`--preset linear --smoke` in the transformer search's store: the same params and metrics
    per trial (plus its own settings), its fitted pipeline registered under its own name, and
    the closing table putting the best of each model side by side."""
    from trainers.toolrag_linear import load_checkpoint
    from tuning.execute import execute
    from tuning.prepare import prepare
    from tuning.search import parse_args

    root = smoke_search["root"]
    capsys.readouterr()
    args = parse_args(["--model", "toolrag", "--preset", "linear", "--smoke", "--seed", SMOKE_SEED, "--results-dir", str(root),
                       "--tracking-uri", smoke_search["uri"], "--storage", str(root / "storage"),
                       "--experiment-name", "linear"])
    assert execute(prepare(args)) == 0
    printed = capsys.readouterr().out
    client, linear = mlflow_runs(smoke_search["uri"], "linear", "trial")
    _, transformer = mlflow_runs(smoke_search["uri"], "smoke", "trial")
    searched = [run for run in linear if "full_budget_for" not in run.data.tags]
    assert len(searched) == 4 and all(run.info.status == "FINISHED" for run in linear)
    shared_params = {"pos_weight", "prompt_template", "seed", "preset", "model_source", "data_fingerprint",
                     "threshold", "max_train_examples", "max_eval_examples", "epochs"}
    shared_metrics = {"tool_recall", "tool_recall_ci_low", "tool_recall_ci_high", "tool_count", "tool_precision",
                      "recall/send_sms", "paper_distance", "best_paper_distance", "train_loss", "cpu_seconds",
                      "final_tool_recall", "final_paper_distance", "test_tool_recall", "test_tool_count_ci_high",
                      "test_paper_distance", "trial_wall_seconds"}
    for run in linear:
        assert shared_params <= set(run.data.params) and {"C", "word_ngram_max", "char_ngram_max"} <= set(run.data.params)
        assert shared_metrics <= set(run.data.metrics), shared_metrics - set(run.data.metrics)
        assert run.data.tags["family"] == "linear" and run.data.tags["model"] == "toolrag-linear"
        assert run.data.params["data_fingerprint"] == transformer[0].data.params["data_fingerprint"]
        assert run.data.metrics["test_eval_examples"] == 500  # no cap: the whole test split, once
    for run in transformer:
        assert shared_params <= set(run.data.params) and shared_metrics <= set(run.data.metrics) | {
            "test_tool_recall", "test_tool_count_ci_high", "test_paper_distance"}
    version = client.get_model_version_by_alias("tinyagent-toolrag-linear", "closest-to-paper")
    closest = next(run for run in linear if run.data.tags.get("closest_to_paper_rank") == "1")
    assert version.run_id == closest.info.run_id
    import mlflow

    mlflow.set_tracking_uri(smoke_search["uri"])  # a logged model is found through the global URI
    folder = mlflow.artifacts.download_artifacts(f"runs:/{closest.info.run_id}/model")
    pipeline, config = load_checkpoint(folder)
    assert config.pos_weight == float(closest.data.params["pos_weight"])
    assert pipeline.predict_proba(["Text Sid that I am late"]).shape == (1, 16)
    # Side by side: the best linear and the best transformer trial, each with its test figures.
    table = printed[printed.index("Best of each model"):]
    rows = {line.split()[0]: line for line in table.splitlines()[3:5]}
    assert set(rows) == {"toolrag", "toolrag-linear"}
    assert f"linear / {closest.data.tags['trial_id']}" in rows["toolrag-linear"]


PER_EPOCH = ("paper_distance", "tool_recall", "tool_count", "train_loss")


SEEDED_TRIALS = 6


@pytest.fixture(scope="module")
def seeded_pair(ray_2_cpus, tmp_path_factory) -> list[dict]:
    """One seed, two whole searches one after the other on the test's Ray, with two trials at
    once: the laptop default's in-process runner, whose processes Tune reuses from trial to
    trial. What one seed must repeat is compared, and what ~16 trials may leak is counted."""
    from tuning.execute import execute
    from tuning.prepare import prepare
    from tuning.search import parse_args

    searches = []
    for name in ("first", "second"):
        root = tmp_path_factory.mktemp(f"seeded-{name}")
        uri = f"sqlite:///{root / 'mlflow.db'}"
        args = parse_args(["--model", "toolrag", "--smoke", "--num-samples", str(SEEDED_TRIALS), "--max-concurrent",
                           "2", "--seed", "1", "--results-dir", str(root), "--tracking-uri", uri,
                           "--storage", str(root / "storage"), "--experiment-name", "seeded"])
        searches.append({"exit_code": execute(prepare(args)), "uri": uri, "root": root})
    return searches


def _what_a_rerun_must_repeat(uri: str) -> dict:
    from tests.conftest import _trial_or_parent_runs

    client, trials = _trial_or_parent_runs(uri, "seeded", "trial")
    _, (parent,) = _trial_or_parent_runs(uri, "seeded", "parent")
    searched = [run for run in trials if "full_budget_for" not in run.data.tags]
    reruns = [run for run in trials if "full_budget_for" in run.data.tags]

    def figures(run) -> dict:
        per_epoch = {name: [(p.step, p.value) for p in sorted(client.get_metric_history(run.info.run_id, name),
                                                               key=lambda p: p.step)] for name in PER_EPOCH}
        test = {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}
        settings = {k: run.data.params[k] for k in ("pos_weight", "learning_rate", "batch_size", "prompt_template")}
        return {"settings": settings, "per_epoch": per_epoch, "test": test,
                "epochs_completed": run.data.metrics["epochs_completed"],
                "stopped_early": run.data.tags["stopped_early"]}

    return {
        "trials": {int(run.data.tags["trial_number"]): figures(run) for run in searched},
        "reruns": {run.data.tags["full_budget_for"]: figures(run) for run in reruns},
        "comparisons": {k: v for k, v in parent.data.tags.items() if k.startswith("comparison_")},
        "closest": parent.data.metrics["best_paper_distance"],
    }


@pytest.mark.ray
@pytest.mark.slow
def test_one_seed_twice_gives_the_same_proposals_figures_stops_and_comparisons(seeded_pair):
    # Seed 1 stops trials at both rungs and owes two reruns (a template, the lowest pos_weight).
    assert [search["exit_code"] for search in seeded_pair] == [0, 0]
    first, second = (_what_a_rerun_must_repeat(search["uri"]) for search in seeded_pair)
    assert sorted(first["trials"]) == list(range(SEEDED_TRIALS))
    for number in range(SEEDED_TRIALS):
        assert first["trials"][number] == second["trials"][number], f"trial {number} differs"
    assert first["reruns"] == second["reruns"]
    assert any(t["stopped_early"] == "true" for t in first["trials"].values()), "no early stop was exercised"
    assert "pos_weight lowest" in first["reruns"], first["reruns"].keys()
    assert first["comparisons"] == second["comparisons"] and first["comparisons"]
    assert first["closest"] == second["closest"]
    # Every template has a full-budget trial, whatever ASHA stopped.
    templates = {t["settings"]["prompt_template"] for t in [*first["trials"].values(), *first["reruns"].values()]
                 if t["stopped_early"] == "false"}
    assert templates == {"query", "question", "instruction"}
    # A rerun repeats its source configuration's epochs exactly where both trained.
    for reason, rerun in first["reruns"].items():
        source = next((t for t in first["trials"].values() if t["settings"] == rerun["settings"]), None)
        if source is not None:
            trained = len(source["per_epoch"]["paper_distance"])
            assert rerun["per_epoch"]["paper_distance"][:trained] == source["per_epoch"]["paper_distance"], reason


@pytest.mark.ray
@pytest.mark.slow
def test_searches_one_after_the_other_leak_nothing(seeded_pair, ray_2_cpus, mlflow_runs):
    from ray.util import placement_group_table
    from ray.util.state import list_actors

    assert [search["exit_code"] for search in seeded_pair] == [0, 0]
    deadline = time.time() + 30
    while True:
        groups = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        trial_actors = [a for a in list_actors(filters=[("state", "=", "ALIVE")])
                        if a.class_name in ("TrainController", "RayTrainWorker", "ImplicitFunc")
                        or "fit_trial" in (a.class_name or "")]
        cpus = ray_2_cpus.available_resources().get("CPU", 0)
        if (not groups and not trial_actors and cpus == 2) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert groups == [] and trial_actors == [] and cpus == 2
    ended = 0
    for search in seeded_pair:
        _, trials = mlflow_runs(search["uri"], "seeded", "trial")
        assert len([run for run in trials if "full_budget_for" not in run.data.tags]) == SEEDED_TRIALS
        assert any(run.data.tags.get("stopped_early") == "true" for run in trials)
        # Each trial's Train run keeps one checkpoint at most (its best epoch).
        runs = [d for d in (search["root"] / "storage" / "train").iterdir() if d.is_dir()]
        assert len(runs) == len(trials)  # the full-budget reruns included
        assert max(len([c for c in run.glob("checkpoint_*") if c.is_dir()]) for run in runs) == 1
        ended += len(trials)
    disk = sum(f.stat().st_size for search in seeded_pair for f in (search["root"] / "storage").rglob("*")
               if f.is_file())
    print(f"\n[leaks] {ended} trials in 2 searches, {disk / ended / 1e6:.2f} MB of Ray storage per trial")
