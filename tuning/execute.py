"""Running a prepared search (tuning/prepare.py), in the order `execute` reads: build the base,
start Ray, open the MLflow records, search, rerun to full budget, score the test split, close
and rank, print the closing table, publish the report.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from trainers import metric_names as names
from trainers.data import Dataset, split_digest
from trainers.gguf_base import converted_base
from tuning import closing_table, cluster, console, full_budget, holdout, pipeline_eval, ray_search, report
from tuning.config import UserError
from tuning.console import SearchProgress
from tuning.job_context import STOP, SearchStopped, job_tags
from tuning.mlflow_store import (
    TEST_CONTEXT, TRAIN_CONTEXT, VALIDATION_CONTEXT, best_per_family, dataset_input, default_tracking_uri, redact_uri,
    sqlite_path,
)
from tuning.search_plan import Outcome, PreparedSearch
from tuning.tracking import SearchTracker
from tuning.trial_records import pareto_front


def _build_base(prepared: PreparedSearch) -> None:
    """Build (or convert) the model's base once, before Ray starts, using every core of this machine."""
    import torch

    build = prepared.base_build
    if Path(build["target"]).is_dir():  # built atomically: a folder there is complete
        print(f"[base] using the base model cached in {build['target']}", flush=True)
        return
    torch.set_num_threads(os.cpu_count() or 1)

    def progress(line: str) -> None:
        print(line, flush=True)

    if build["gguf"] is not None:
        converted_base(build["gguf"], Path(build["target"]), progress=progress)
    else:
        prepared.spec.base_builder(Path(build["target"]), prepared.dataset.train, build["architecture"],
                                   build["settings"], progress=progress)


def _open_tracking(prepared: PreparedSearch):
    """(tracker, counts of the trials found when resuming, or None)."""
    request = prepared.request
    artifacts = (prepared.results_dir / "mlartifacts").as_uri() if sqlite_path(prepared.tracking_uri) else None
    tracker = SearchTracker(prepared.tracking_uri, prepared.mlflow_experiment,
                            max_epochs=ray_search.max_epochs(request.trainer_base, request.param_space),
                            artifact_location=artifacts, trial_tags=prepared.trial_tags,
                            datasets=dataset_inputs(prepared.dataset))
    found = None
    if prepared.resume_parent_id:
        found = tracker.reattach(prepared.resume_parent_id, list(request.param_space))
        for key, value in job_tags().items():  # the job that drives it now (tuning/jobs.py)
            tracker.set_parent_tag(key, value)
        print(f"[resume] parent run {tracker.parent_run_id} ({prepared.parent_run_name}) continues: "
              f"{found['finished']} trials ended, {found['failed']} failed, {found['interrupted']} interrupted "
              "(these continue from their last checkpoint)", flush=True)
    else:
        tracker.start_parent(prepared.parent_run_name, prepared.parent_params, prepared.parent_tags, prepared.files)
        print(f"[mlflow] parent run {tracker.parent_run_id} in {prepared.tracking_uri} "
              f"(experiment {prepared.mlflow_experiment})", flush=True)
    tracker.log_parent_metrics(prepared.data_metrics)
    return tracker, found


def dataset_inputs(dataset: Dataset) -> dict[str, Any]:
    """The three splits as MLflow dataset inputs, by context, each with its content digest."""
    source_name = Path(dataset.source).name or dataset.source
    return {context: dataset_input(f"{source_name}/{split}", context, split_digest(examples), dataset.source,
                                   rows=len(examples))
            for context, split, examples in ((TRAIN_CONTEXT, "train", dataset.train),
                                             (VALIDATION_CONTEXT, "validation", dataset.val),
                                             (TEST_CONTEXT, "test", dataset.test))}


def _totals(tracker, started: float, full_budget_seconds: float) -> dict[str, float]:
    trials = tracker.trials.values()
    totals = {
        "trials_total": len(tracker.trials),
        "trials_finished": sum(r.status == "FINISHED" for r in trials),
        "trials_failed": sum(r.status == "FAILED" for r in trials),
        "trials_stopped_early": sum(r.stopped_early for r in trials),
        "trials_lost": len(tracker.lost_trials()),
        "search_wall_seconds": time.time() - started,
        "cpu_seconds_total": sum((r.last or {}).get(names.CPU_SECONDS, 0.0) for r in trials),
        "trials_scored_on_test": sum(r.test is not None for r in trials),
        "full_budget_reruns": sum(r.rerun_of is not None for r in trials),
        "full_budget_seconds": full_budget_seconds,
    }
    ranked = tracker.ranked()
    if ranked:
        totals["best_paper_distance"] = ranked[0].objective
        if ranked[0].test:  # the closest trial (chosen on validation), on the test split
            totals.update({f"closest_test_{k}": v for k, v in ranked[0].test.items() if "/" not in k})
    return totals


def _close(prepared: PreparedSearch, tracker, status: str, started: float, *, budget,
           resumed_counts: dict[str, int] | None, full_budget_seconds: float, reason: str | None = None) -> Outcome:
    """Rank, compare, register the closest trial, mark the Pareto front and close the parent
    run: done whatever went wrong before, so the record is complete."""
    ranked, totals = tracker.ranked(), _totals(tracker, started, full_budget_seconds)
    comparison_lines, registered_version, front, family_bests = [], None, [], []
    try:  # whatever goes wrong while marking, the parent run is closed
        comparison_lines = _compare(prepared, tracker)
        if ranked:
            registered_version = tracker.mark_closest(prepared.top_k, prepared.spec.registered_model)
        if prepared.request.objective == "pareto":
            front = pareto_front(ranked, prepared.spec.pareto)
            tracker.tag_pareto_front(front)
    finally:
        tracker.finish_parent(status, totals, reason)
    try:
        family_bests = best_per_family(tracker.client, prepared.spec.task, prepared.dataset.split_fingerprint)
    except MlflowException as error:  # a comparison the store cannot give must not hide the search's own table
        print(f"[mlflow] could not compare with other models' searches: {str(error).splitlines()[0]}", flush=True)
    return Outcome(status=status, ranked=ranked, totals=totals, front=front, registered_version=registered_version,
                   budget=budget, resumed_counts=resumed_counts, family_bests=family_bests,
                   comparison_lines=comparison_lines)


def _compare(prepared: PreparedSearch, tracker) -> list[str]:
    """The comparisons the search answers, on full-budget trials and paired test outcomes: the
    prompt templates, and the lowest pos_weight against the closest trial's. Logged on the
    parent run (metrics, and the sentence as a tag); returns the closing table's lines."""
    records = list(tracker.trials.values())
    tracker.load_test_outcomes(records)
    param_space, metric = prepared.request.param_space, prepared.spec.headline[0]
    lines = []
    for comparison, title, prefix in (
            (full_budget.template_comparison(records, param_space, metric),
             f"Each {full_budget.COMPARED_SETTING}'s best full-budget trial (closest to the paper on validation), "
             f"then its test {metric}; the best two paired on the same test examples:", full_budget.COMPARED_SETTING),
            (full_budget.contrast(records, param_space, metric),
             f"{metric} at the lowest {full_budget.CONTRASTED_SETTING} tried against the closest trial's (both "
             "trained to the end), paired on the same test examples:", full_budget.CONTRASTED_SETTING)):
        if comparison is None or not comparison.sides:  # no trial trained to the end: nothing to show
            continue
        lines.append(full_budget.format_comparison(comparison, title))
        tracker.log_parent_metrics(full_budget.parent_metrics(comparison, prefix))
        tracker.set_parent_tag(full_budget.COMPARISON_TAG_PREFIX + prefix, comparison.sentence())
    return lines


def _run_full_budget(prepared: PreparedSearch, tracker, callbacks: list, progress) -> float:
    """Rerun, to the last epoch, each template's best configuration when no trial of it got there,
    and the lowest pos_weight's (tuning/full_budget.py). Their runs are tagged with why. Returns
    the seconds the reruns took."""
    request = prepared.request
    reruns = full_budget.reruns_needed(list(tracker.trials.values()), request.param_space,
                                       prepared.spec.scheduler_metric)
    if not reruns:
        print("[full budget] every compared value already has a trial trained to the end", flush=True)
        return 0.0
    print(f"[full budget] {len(reruns)} rerun(s) to the last epoch, early stopping off: "
          + "; ".join(f"{r.reason} (" + (f"trial {r.source_trial}'s configuration" if r.source_trial
                                         else "the closest trial's configuration with this value") + ")"
                      for r in reruns), flush=True)
    progress.total += len(reruns)  # the progress line counts the reruns too
    began = time.time()
    assigned = ray_search.run_full_budget(request, [r.config for r in reruns], callbacks)
    seconds = time.time() - began
    for trial_id, index in assigned.items():
        if trial_id in tracker.trials:
            tracker.mark_rerun(trial_id, reruns[index].reason, reruns[index].source_trial)
    return seconds


def _search_and_score(prepared: PreparedSearch, tracker, resumed_counts, started: float,
                      *, log_file: Path | None = None) -> Outcome:
    """The Tune search, the full-budget reruns, then the test split once per trial; the parent
    run is closed either way."""
    request, status, budget, reason = prepared.request, "FAILED", None, None
    full_budget_seconds = 0.0
    progress = SearchProgress(tracker, request.num_samples,
                              ray_search.lanes(request),
                              request.time_budget_s, log_file=log_file, started=started)
    try:
        callbacks = [tracker.callback(prepared.trial_params), progress]
        budget = ray_search.run_search(request, callbacks,
                                       failed_before_resume=(resumed_counts or {}).get("failed", 0))
        if request.full_budget_reruns and not budget.exhausted:
            full_budget_seconds = _run_full_budget(prepared, tracker, callbacks, progress)
        holdout.score_trials_on_test(tracker, prepared.spec, prepared.test_data, request.storage_path,
                                     cpus_per_task=request.cpus_per_worker, gpus_per_task=request.gpus_per_worker,
                                     verbose=request.verbose)
        holdout.score_untuned_base(tracker, prepared.spec, request.trainer_base,
                                   {"val": request.data["val"], "test": prepared.test_data},
                                   cpus_per_task=request.cpus_per_worker, gpus_per_task=request.gpus_per_worker)
        status = "FAILED" if budget.exhausted else "FINISHED"
    except SearchStopped as stopped:
        status, reason = "KILLED", f"the search was {stopped}; the same command with --resume continues it"
        raise
    except KeyboardInterrupt:
        status, reason = "KILLED", "the search was interrupted (Ctrl+C); the same command with --resume continues it"
        raise
    finally:
        outcome = _close(prepared, tracker, status, started, budget=budget, resumed_counts=resumed_counts,
                         full_budget_seconds=full_budget_seconds, reason=reason)
    return outcome


def execute(prepared: PreparedSearch) -> int:
    """Run the prepared search, in this order: build the base, start Ray, open the MLflow records,
    search, rerun to full budget, score the test split, close and rank, print the closing table,
    publish the report. Returns the process exit code."""
    import ray

    request = prepared.request
    search_log = console.route_logs(request.verbose)
    if prepared.base_build is not None:
        # Before Ray starts: its idle processes took ~15% of the 2 cores from a laptop build.
        _build_base(prepared)
    # The search's clock, as Tune's time budget counts: the base build is reported apart.
    started = time.time()
    started_ray = cluster.start_ray(request.address, verbose=request.verbose)
    if threading.current_thread() is threading.main_thread():
        # After ray.init, whose core worker installs a SIGTERM handler that exits at once:
        # SIGTERM (ray job stop, kill) then ends the search cleanly, resumable.
        STOP.install()
    try:
        # Before anything is written: a request no node can hold would leave every trial
        # PENDING forever.
        problem = cluster.infeasible_request(request.workers_per_trial, request.cpus_per_worker,
                                             request.gpus_per_worker)
        if problem:
            raise UserError(problem)
        prepared.results_dir.mkdir(parents=True, exist_ok=True)
        logs = console.log_folder(prepared.results_dir, prepared.parent_run_name)
        log_file = search_log.open(logs / console.SEARCH_LOG)
        _say_where_ray_is(started_ray, logs, log_file, request.verbose)
        tracker, resumed_counts = _open_tracking(prepared)
        outcome = _search_and_score(prepared, tracker, resumed_counts, started, log_file=log_file)
    finally:
        if started_ray:
            cluster.wait_for_placement_groups()
            ray.shutdown()
    closing = closing_table.format_closing(prepared, outcome, tracker)
    print(closing)
    _publish_report(prepared, tracker, closing)
    if prepared.evaluation_toolrag is not None:
        _evaluate_closest_with_toolrag(prepared, outcome)
    return exit_code(outcome)


def _publish_report(prepared: PreparedSearch, tracker, closing: str) -> None:
    """Plots, the parent run's description and the report page. The search is already recorded:
    a failure here costs only these, and its traceback goes to the log file."""
    import logging


    if tracker.parent_run_id is None:
        return
    try:
        page = report.publish(prepared.tracking_uri, prepared.mlflow_experiment, tracker.parent_run_id,
                                   prepared.results_dir, closing_text=closing)
    except Exception as error:  # noqa: BLE001 - reported, with its traceback in the log
        logging.getLogger(__name__).exception("building the report failed")
        print(f"[report] could not build the report ({type(error).__name__}: {error}); traceback in "
              f"{prepared.results_dir / 'logs' / prepared.parent_run_name}", flush=True)
        return
    print(f"[report] {page} (the plots and this table are also on the parent run in MLflow; rebuild with "
          f"python -m tuning.report --experiment {prepared.mlflow_experiment} --run {tracker.parent_run_id} "
          f"--results-dir {prepared.results_dir}"
          + ("" if prepared.tracking_uri == default_tracking_uri(prepared.results_dir)
             else f" --tracking-uri {redact_uri(prepared.tracking_uri)}") + ")", flush=True)


def _say_where_ray_is(started_ray: bool, logs: Path, log_file: Path, verbose: bool) -> None:
    """The Ray phase line: which Ray, where its dashboard and the logs are."""
    import ray


    context = ray.get_runtime_context()
    dashboard = cluster.dashboard_address() if started_ray else None
    cpus = int(ray.cluster_resources().get("CPU", 0))
    where = "started a local Ray" if started_ray else f"connected to the Ray cluster at {context.gcs_address}"
    print(f"[ray] {where} ({cpus} CPUs" + (f", dashboard http://{dashboard}" if dashboard else "") + ")", flush=True)
    link = console.link_ray_logs(logs) if started_ray else None
    print(f"[logs] Ray, Tune, Train and MLflow logs: {log_file}"
          + (f"; every Ray process's output (the Train workers' too): {link}/" if link else
             "; the workers' output: each node's /tmp/ray/session_latest/logs/")
          + ("" if verbose else "; --verbose prints them here"), flush=True)


def _evaluate_closest_with_toolrag(prepared: PreparedSearch, outcome: Outcome) -> None:
    """--evaluate-with-toolrag: the closest trial (chosen on validation), on the test split,
    with ToolRAG building its prompts and without, printed under the closing table."""
    closest = next((r for r in outcome.ranked if r.checkpoint_path and Path(r.checkpoint_path).is_dir()), None)
    if closest is None:
        print("[evaluate] no trial left a checkpoint: nothing to evaluate with ToolRAG", flush=True)
        return
    name = prepared.spec.registered_model
    planner = pipeline_eval.ResolvedModel(
        given=f"models:/{name}/{outcome.registered_version}" if outcome.registered_version else closest.checkpoint_path,
        folder=Path(closest.checkpoint_path), kind=pipeline_eval.pipeline.ROLE_KINDS[prepared.spec.pipeline_role][0],
        registered_name=name if outcome.registered_version else None,
        registered_version=outcome.registered_version, run_id=closest.run_id)
    paper = {f"plan_success_{way}": prepared.targets[target]["value"]
             for way, target in (("full", names.PLAN_SUCCESS), ("with_toolrag", names.PLAN_SUCCESS_WITH_TOOLRAG))
             if target in prepared.targets}
    print(f"[evaluate] the closest trial with ToolRAG {prepared.evaluation_toolrag.label}, on the test split", flush=True)
    pipeline_eval.evaluate(planner, prepared.evaluation_toolrag, prepared.dataset, split="test",
                           tracking_uri=prepared.tracking_uri, experiment=pipeline_eval.EVALUATION_EXPERIMENT,
                           paper=paper, results_dir=prepared.results_dir)


def exit_code(outcome: Outcome) -> int:
    """1 when the failure budget ran out or no trial produced a result, else 0."""
    if outcome.budget is not None and outcome.budget.exhausted:
        return 1
    return 0 if outcome.ranked else 1
