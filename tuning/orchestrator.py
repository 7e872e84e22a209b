"""One search from validated inputs to the closing table.

`prepare` checks everything the user gave (preset, space, targets, model, data, paths)
before Ray starts or anything is written to MLflow, so bad input costs seconds and leaves
nothing behind. `execute` starts Ray, tracks, runs, ranks, registers and reports.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers import synthetic
from trainers.data import HUB_DATASET_ID, Dataset, load_dataset_dir
from trainers.models import resolve_source
from trainers.planner_base import base_cache_dir
from tuning.config import (
    PRESETS, SPACES_DIR, TARGETS_FILE, TRAINER_CONFIGS, UserError, layer_preset_over_space, load_preset,
    load_search_space, load_targets, preset_path,
)
from tuning.driver import SearchRequest

PROJECT_DIR = Path(__file__).resolve().parent.parent
REGISTERED_MODEL = {"toolrag": "tinyagent-toolrag", "planner": "tinyagent-planner"}
EXPERIMENT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass
class PreparedSearch:
    request: SearchRequest
    tracking_uri: str
    results_dir: Path
    run_name: str
    experiment_name: str
    preset_name: str
    targets: dict[str, dict[str, float]]
    dataset: Dataset
    files: list[Path]
    top_k: int
    fixed_params: dict[str, Any]
    parent_params: dict[str, Any]
    base_build: dict[str, Any] | None = None
    # The parent run of the interrupted search `--resume` continues.
    resume_parent_id: str | None = None
    # What the trials never see: scored once per trial, on its best checkpoint, after the search.
    test_data: Any = None
    # Figures about the data that could not be prevented, for the parent run.
    data_metrics: dict[str, float] | None = None


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _load_data(args: argparse.Namespace, preset, results_dir: Path) -> Dataset:
    if args.data is None:
        sizes = preset.data
        folder = results_dir / "data" / f"synthetic-seed{args.seed}-{sizes.synthetic_train}-{sizes.synthetic_test}"
        if not (folder / "testing_data.json").exists():
            print(f"[data] no --data given: generating synthetic TinyAgent-format data in {folder}", flush=True)
            stats = synthetic.write_dataset(folder, sizes.synthetic_train, sizes.synthetic_test, args.seed)
            print(synthetic.format_statistics(stats), flush=True)
        else:
            print(f"[data] no --data given: using synthetic TinyAgent-format data cached in {folder}", flush=True)
        return load_dataset_dir(folder, val_fraction=args.val_fraction)
    local = Path(args.data).expanduser()
    if local.exists():
        return load_dataset_dir(local, skip_invalid=args.skip_invalid, val_fraction=args.val_fraction)
    if args.data.count("/") == 1 and not args.data.startswith((".", "/", "~")):
        folder = resolve_source(args.data, "dataset", "--data")
        return load_dataset_dir(folder, skip_invalid=args.skip_invalid, val_fraction=args.val_fraction)
    raise UserError(f"--data {args.data}: no such directory (or pass the hub id {HUB_DATASET_ID})")


def redact_uri(uri: str) -> str:
    """A URI safe to log: no user:password@, and no query values (S3 URIs can carry keys)."""
    from urllib.parse import urlsplit, urlunsplit

    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None and not parts.query:
        return uri
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    query = "&".join(f"{item.split('=', 1)[0]}=REDACTED" for item in parts.query.split("&") if item)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def split_data(model: str, examples: list) -> Any:
    """One split as the model's trainer reads it: only the fields it needs."""
    if model == "toolrag":
        return {"queries": [e.query for e in examples], "labels": [e.label_vector for e in examples]}
    return [{"messages": [list(m) for m in e.messages], "plan": e.plan} for e in examples]


def trial_data(model: str, dataset: Dataset) -> dict[str, Any]:
    """What each trial's workers read: train and validation. The test split is not among them."""
    return {"train": split_data(model, dataset.train), "val": split_data(model, dataset.val)}


def _report_data(dataset: Dataset) -> dict[str, float]:
    """Print what the splits hold and what could not be prevented; the figures for the parent run."""
    print(f"[data] {len(dataset.train)} train / {len(dataset.val)} validation (carved from the training file, "
          f"--val-fraction {dataset.val_fraction:g}) / {len(dataset.test)} test examples; trials select on "
          "validation, and test is scored once per trial after the search", flush=True)
    if dataset.skipped_invalid:
        print(f"[data] --skip-invalid: left out {dataset.skipped_invalid} invalid records", flush=True)
    if dataset.skipped_without_plan:
        print(f"[data] left out {dataset.skipped_without_plan} records without a plan point", flush=True)
    print(f"[data] {dataset.test_queries_in_train} test queries also occur in train (case and punctuation ignored)"
          + ("; their test figures are partly memory" if dataset.test_queries_in_train else ""), flush=True)
    if dataset.unparseable_targets:
        kept = dataset.unparseable_targets - dataset.skipped_unparseable
        print(f"[data] {dataset.unparseable_targets} target plans do not parse, or parse to an empty plan, with "
              f"TinyAgent's parser (first: {dataset.first_unparseable}); "
              + ("--skip-invalid left them out" if not kept else
                 f"{kept} are kept and every trial fails them (--skip-invalid leaves them out)"), flush=True)
    else:
        print("[data] every target plan parses with TinyAgent's parser", flush=True)
    return {"test_queries_in_train": dataset.test_queries_in_train,
            "unparseable_targets": dataset.unparseable_targets,
            "skipped_unparseable_targets": dataset.skipped_unparseable}


def _check_chat_template(model_path: Path, space, preset_trainer: dict[str, Any]) -> None:
    """The `chat` template needs a tokenizer with a chat template; say so before any trial fails.

    A base still to be built always gets one, so it is not checked.
    """
    template = space.parameters.get("prompt_template")
    templates = set(template.values if template is not None and template.values else [])
    templates.add(preset_trainer.get("prompt_template", TRAINER_CONFIGS["planner"].model_fields["prompt_template"].default))
    config_file = Path(model_path) / "tokenizer_config.json"
    if "chat" not in templates or not config_file.exists():
        return
    has_template = (Path(model_path) / "chat_template.jinja").exists() or bool(
        json.loads(config_file.read_text()).get("chat_template"))
    if not has_template:
        raise UserError(f"{model_path}: the tokenizer has no chat template, so prompt_template 'chat' cannot be "
                        "used; remove 'chat' from the search space")


def _sqlite_path(tracking_uri: str) -> Path | None:
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):])
    return None


def _check_writable(path: Path, flag: str) -> None:
    """An existing file must be writable, else the nearest existing ancestor must be a writable
    directory; nothing is created here."""
    if path.is_file():
        if not os.access(path, os.W_OK):
            raise UserError(f"{flag} {path}: the file is not writable")
        return
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise UserError(f"{flag} {path}: cannot write there ({probe} is not a writable directory)")


def prepare(args: argparse.Namespace) -> PreparedSearch:
    """Validate every input; raises UserError (or DataError/SourceUnavailable, also user errors)."""
    preset_name = "tiny" if args.smoke else args.preset
    preset = load_preset(args.model, preset_name)
    preset_file = preset_path(args.model, preset_name)
    if preset_name not in PRESETS:
        preset_name = preset_file.stem
    space_path = Path(args.space) if args.space else SPACES_DIR / preset.search.space
    space = load_search_space(args.model, space_path, preset.trainer)
    targets = load_targets(args.model)

    for flag, value, low in (("--workers-per-trial", args.workers_per_trial, 1), ("--num-samples", args.num_samples, 1),
                             ("--max-concurrent", args.max_concurrent, 1), ("--top-k", args.top_k, 1),
                             ("--max-failed-trials", args.max_failed_trials, 1),
                             ("--retries-per-trial", args.retries_per_trial if args.retries_per_trial is not None else 0, 0)):
        if value is not None and value < low:
            raise UserError(f"{flag} {value}: must be at least {low}")
    if args.cpus_per_worker <= 0:
        raise UserError(f"--cpus-per-worker {args.cpus_per_worker}: must be above 0")
    if args.gpus_per_worker < 0:
        raise UserError(f"--gpus-per-worker {args.gpus_per_worker}: must not be negative")
    if not 0 < args.val_fraction <= 0.5:
        raise UserError(f"--val-fraction {args.val_fraction}: must be above 0 and at most 0.5")
    if args.objective == "pareto" and args.model != "toolrag":
        raise UserError("--objective pareto: trades tool recall against tools retrieved, so it is for --model toolrag only")
    experiment_name = args.experiment_name or f"tinyagent-{args.model}-{preset_name}"
    if not EXPERIMENT_NAME_PATTERN.match(experiment_name):
        raise UserError(f"--experiment-name {experiment_name!r}: use letters, digits, '.', '_' and '-' only")

    results_dir = Path(args.results_dir).expanduser().resolve()
    _check_writable(results_dir, "--results-dir")
    storage = args.storage or str(results_dir / "ray")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
        _check_writable(Path(storage), "--storage")
    tracking_uri = args.tracking_uri or f"sqlite:///{results_dir / 'mlflow.db'}"
    sqlite_file = _sqlite_path(tracking_uri)
    if sqlite_file is not None:
        if not sqlite_file.is_absolute():
            raise UserError(f"--tracking-uri {tracking_uri}: use an absolute path (sqlite:////abs/path.db); "
                            "trials run in other working directories")
        _check_writable(sqlite_file, "--tracking-uri")
    elif not tracking_uri.startswith(("http://", "https://", "databricks")):
        raise UserError(f"--tracking-uri {tracking_uri}: expected sqlite:////abs/path.db or http(s)://host:port")

    if args.address:
        from tuning.driver import check_address

        problem = check_address(args.address)
        if problem:
            raise UserError(f"--address {args.address}: {problem}")
    # Before any data is generated: a search that cannot be resumed leaves nothing behind.
    resumed = _search_to_resume(experiment_name, tracking_uri, storage) if args.resume else None
    builds_base = preset.model.build_base is not None and args.model_path is None
    model_source = args.model_path or preset.model.name_or_path
    model_path = None if builds_base else resolve_source(model_source, "model", "--model-path")
    if args.model == "planner" and model_path is not None:
        _check_chat_template(model_path, space, preset.trainer)
    preset_fixed, warm_start = layer_preset_over_space(preset.trainer, preset_file, space, space_path)
    dataset = _load_data(args, preset, results_dir)
    data_metrics = _report_data(dataset)
    if builds_base:
        model_path = base_cache_dir(results_dir / "cache", dataset.split_fingerprint, preset.model.architecture,
                                    preset.model.build_base)
        model_source = f"built from config: {model_path}"

    # One winner per setting: the trainer's default, then the preset; searched keys come from
    # each trial (the preset's values for them are the first warm start); the seed is --seed.
    trainer_base = {**preset_fixed, "model_path": str(model_path), "targets": targets, "seed": args.seed}
    if args.model == "toolrag":
        trainer_base.update(architecture=preset.model.architecture, cache_dir=str(results_dir / "cache" / "tokens"))
    config_cls = TRAINER_CONFIGS[args.model]
    trainer_base = config_cls.model_validate(
        {**trainer_base, **(warm_start[0] if warm_start else {})}
    ).model_dump(exclude=set(space.parameters))
    data = trial_data(args.model, dataset)
    run_name = f"{experiment_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    request = SearchRequest(
        model=args.model, experiment_name=run_name, storage_path=storage, trainer_base=trainer_base,
        param_space={k: v.model_dump() for k, v in space.parameters.items()}, warm_start=warm_start,
        data=data, data_fingerprint=dataset.split_fingerprint,
        num_samples=args.num_samples or preset.search.num_samples, max_concurrent=args.max_concurrent,
        workers_per_trial=args.workers_per_trial, cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker, seed=args.seed, objective=args.objective,
        grace_period=preset.search.grace_period, reduction_factor=preset.search.reduction_factor,
        time_budget_s=args.time_budget_s if args.time_budget_s is not None else preset.search.time_budget_s,
        address=args.address, max_failed_trials=args.max_failed_trials,
        # On the local Ray no node is lost, and a restart would only race the teardown of a
        # trial ASHA stopped (its workers then fail their health check).
        retries_per_trial=args.retries_per_trial if args.retries_per_trial is not None else (2 if args.address else 0),
    )
    fixed = {k: v for k, v in trainer_base.items() if k not in ("targets", "cache_dir", "architecture")}
    fixed.update(model_source=model_source, preset=preset_name, data_fingerprint=dataset.fingerprint)
    parent_params = {
        "model": request.model, "preset": preset_name, "objective": request.objective,
        "num_samples": request.num_samples, "seed": request.seed, "workers_per_trial": request.workers_per_trial,
        "max_failed_trials": request.max_failed_trials,
        "cpus_per_worker": request.cpus_per_worker, "gpus_per_worker": request.gpus_per_worker,
        "data_source": dataset.source, "data_fingerprint": dataset.fingerprint,
        "train_examples": len(dataset.train), "test_examples": len(dataset.test),
        "val_fraction": dataset.val_fraction, "val_examples": len(dataset.val),
        "search_space": json.dumps(request.param_space), "warm_start": json.dumps(request.warm_start),
        "model_source": model_source,
    }
    resume_parent_id = None
    if resumed is not None:
        _check_same_search(resumed, parent_params, storage)
        resume_parent_id, run_name = resumed.info.run_id, resumed.info.run_name
        request.experiment_name, request.resume = resumed.data.tags["experiment_name"], True
    base_build = None
    if builds_base:
        base_build = {"target": model_path, "architecture": preset.model.architecture,
                      "settings": preset.model.build_base}
    return PreparedSearch(
        request=request, base_build=base_build, tracking_uri=tracking_uri, results_dir=results_dir, run_name=run_name,
        experiment_name=experiment_name, preset_name=preset_name, targets=targets, dataset=dataset,
        files=[space_path, preset_file, TARGETS_FILE],
        top_k=args.top_k, fixed_params=fixed, parent_params=parent_params, resume_parent_id=resume_parent_id,
        test_data=split_data(args.model, dataset.test), data_metrics=data_metrics,
    )


# Options a resumed search may change; every other parent param must match the interrupted one.
# The data may move: its fingerprint must still match.
RESUME_MAY_CHANGE = {"max_failed_trials", "data_source"}


def _driver_alive(tags: dict[str, str]) -> int | None:
    """The pid of the search's driver when it still runs on this machine."""
    import socket

    pid = tags.get("driver_pid", "")
    if tags.get("driver_host") != socket.gethostname() or not pid.isdigit():
        return None
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return int(pid) if b"search" in command else None


def _search_to_resume(experiment_name: str, tracking_uri: str, storage: str):
    """The interrupted search `--resume` continues (its MLflow parent run), checked to be
    resumable: not finished, not still running, same storage."""
    from tuning.tracking import latest_search

    sqlite_file = _sqlite_path(tracking_uri)
    if sqlite_file is not None and not sqlite_file.exists():
        raise UserError(f"--resume: there is no search to resume: {sqlite_file} does not exist "
                        "(pass the --results-dir or --tracking-uri the search used)")
    run = latest_search(tracking_uri, experiment_name)
    if run is None:
        raise UserError(f"--resume: experiment {experiment_name} in {redact_uri(tracking_uri)} has no search to resume")
    name, tags = run.info.run_name, run.data.tags
    if run.info.status == "FINISHED":
        raise UserError(f"--resume: the last search of experiment {experiment_name} ({name}) finished; "
                        "run without --resume to start a new one")
    pid = _driver_alive(tags) if run.info.status == "RUNNING" else None
    if pid is not None:
        raise UserError(f"--resume: the search {name} is still running (pid {pid}); stop it before resuming")
    if tags.get("storage") != redact_uri(storage):
        raise UserError(f"--resume: the search {name} kept its state in --storage {tags.get('storage')}, "
                        f"not {redact_uri(storage)}; pass the same --storage")
    return run


def _check_same_search(run, params: dict[str, Any], storage: str) -> None:
    """Tune resumes the search it saved: a command that asks for another one is refused, and so
    is a search that stopped before Tune saved anything."""
    from ray.tune import Tuner

    from tuning.driver import storage_join

    changed = [f"{key} (was {run.data.params.get(key)!r:.80}, now {str(value)!r:.80})" for key, value in params.items()
               if key not in RESUME_MAY_CHANGE and run.data.params.get(key) != str(value)[:6000]]
    if changed:
        raise UserError(f"--resume: this command differs from the interrupted search {run.info.run_name} in "
                        f"{'; '.join(changed)}; resume with the options it was started with")
    tune_path = storage_join(storage, "tune", run.data.tags.get("experiment_name", ""))
    if not run.data.tags.get("experiment_name") or not Tuner.can_restore(tune_path):
        raise UserError(f"--resume: no saved search state at {tune_path} (the search stopped before Tune "
                        "saved any); run without --resume to start a new one")


def _build_planner_base(prepared: PreparedSearch) -> None:
    """Build the local planner base once, before Ray starts, using every core of this machine."""
    import torch

    from trainers.planner_base import build_base

    build = prepared.base_build
    if (Path(build["target"]) / "base.json").exists():
        print(f"[base] using the local planner base cached in {build['target']}", flush=True)
        return
    torch.set_num_threads(os.cpu_count() or 1)
    system_prompts = [content for e in prepared.dataset.train for role, content in e.messages if role == "system"]
    questions = [content for e in prepared.dataset.train for role, content in e.messages if role != "system"]
    build_base(Path(build["target"]), system_prompts, questions, build["architecture"], build["settings"],
               progress=lambda line: print(line, flush=True))


def execute(prepared: PreparedSearch) -> int:
    """Run the prepared search; returns the process exit code."""
    import ray

    from tuning import driver, holdout, report
    from tuning.tracking import SearchTracker

    request = prepared.request
    started = time.time()
    started_ray = driver.start_ray(request.address)
    # Before anything is written: a request no node can hold would leave every trial PENDING
    # forever.
    problem = driver.infeasible_request(request.workers_per_trial, request.cpus_per_worker, request.gpus_per_worker)
    if problem:
        if started_ray:
            ray.shutdown()
        raise UserError(problem)
    prepared.results_dir.mkdir(parents=True, exist_ok=True)
    if prepared.base_build is not None:
        _build_planner_base(prepared)
    artifacts = (prepared.results_dir / "mlartifacts").as_uri() if _sqlite_path(prepared.tracking_uri) else None
    tracker = SearchTracker(prepared.tracking_uri, prepared.experiment_name,
                            max_epochs=driver.max_epochs(request.trainer_base, request.param_space),
                            artifact_location=artifacts)
    if prepared.resume_parent_id:
        found = tracker.reattach(prepared.resume_parent_id, list(request.param_space))
        request.failed_before_resume = found["failed"]
        print(f"[resume] parent run {tracker.parent_run_id} ({prepared.run_name}) continues: {found['finished']} "
              f"trials ended, {found['failed']} failed, {found['interrupted']} interrupted (these continue from "
              "their last checkpoint)", flush=True)
    else:
        tracker.start_parent(prepared.run_name, prepared.parent_params,
                             {"git_commit": _git_commit(), "storage": redact_uri(request.storage_path),
                              "experiment_name": request.experiment_name}, prepared.files)
        print(f"[mlflow] parent run {tracker.parent_run_id} in {prepared.tracking_uri} "
              f"(experiment {prepared.experiment_name})", flush=True)
    tracker.log_parent_metrics(prepared.data_metrics or {})
    request.callbacks = [tracker.callback(prepared.fixed_params)]
    status, budget = "FAILED", None
    try:
        budget = driver.run_search(request)
        holdout.score_trials_on_test(tracker, request.model, prepared.test_data, request.storage_path,
                                     request.cpus_per_worker, request.gpus_per_worker)
        status = "FAILED" if budget.exhausted else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        ranked = tracker.ranked()
        totals = {
            "trials_total": len(tracker.trials),
            "trials_finished": sum(r.status == "FINISHED" for r in tracker.trials.values()),
            "trials_failed": sum(r.status == "FAILED" for r in tracker.trials.values()),
            "trials_stopped_early": sum(r.stopped_early for r in tracker.trials.values()),
            "trials_lost": len(tracker.lost_trials()),
            "search_wall_seconds": time.time() - started,
            "cpu_seconds_total": sum((r.last or {}).get("cpu_seconds", 0.0) for r in tracker.trials.values()),
        }
        if ranked:
            totals["best_paper_distance"] = ranked[0].objective
            if ranked[0].test:  # the closest trial (chosen on validation), on the test split
                totals.update({f"closest_test_{k}": v for k, v in ranked[0].test.items() if "/" not in k})
        totals["trials_scored_on_test"] = sum(r.test is not None for r in tracker.trials.values())
        front, version = [], None
        try:  # whatever goes wrong while marking, the parent run is closed and Ray stopped
            version = tracker.mark_closest(prepared.top_k, REGISTERED_MODEL[request.model]) if ranked else None
            if request.objective == "pareto":
                front = report.pareto_front(ranked)
                tracker.tag_pareto_front(front)
        finally:
            tracker.finish_parent(status, totals)
            if started_ray:
                driver.wait_for_placement_groups()
                ray.shutdown()

    print()
    paper_figures = ({"plan_success": prepared.targets[request.trainer_base.get("paper_target", "plan_success")]["value"]}
                     if request.model == "planner" else None)
    print(report.format_table(ranked[: prepared.top_k], prepared.targets,
                              f"Closest to the paper on validation (best epoch of each trial, {len(ranked)} trials "
                              "ranked), with each trial's test figures, scored once:",
                              model=request.model, paper_figures=paper_figures))
    if "prompt_template" in request.param_space:
        headline = report.FIGURES[request.model][0]
        print(report.format_template_summary(report.best_per_template(ranked, headline), headline))
    if request.objective == "pareto":
        print(report.format_table(front, prepared.targets, "Pareto front (recall up, tools retrieved down):"))
    print(f"\n{totals['trials_finished']} finished ({totals['trials_stopped_early']} stopped early by ASHA), "
          f"{totals['trials_failed']} failed, in {totals['search_wall_seconds']:.0f} s; "
          f"{totals['trials_scored_on_test']} scored on the test split.")
    unscored = [r.trial_id for r in ranked if r.checkpoint_path and r.test is None]
    if unscored:
        print(f"Not scored on test: {', '.join(unscored)} (the reason is in each run's test_error tag).")
    if prepared.resume_parent_id:
        lost = tracker.lost_trials()
        print(f"Resumed: {found['finished'] + found['failed']} trials had ended before the driver stopped and "
              f"were not trained again ({tracker.replayed} only replayed a result the saved state had missed); "
              f"{found['interrupted'] - len(lost)} interrupted trials continued; {len(lost)} were lost"
              + (f" ({', '.join(r.trial_id for r in lost)}: they started after the search last saved its state, "
                 "so Tune ran new trials in their place)" if lost else "") + ".")
    if version:
        print(f"Registered {REGISTERED_MODEL[request.model]} version {version} as alias 'closest-to-paper'.")
    print(f"MLflow: mlflow ui --backend-store-uri {prepared.tracking_uri} --host 127.0.0.1 --port 5000")
    if budget is not None and budget.exhausted:
        print(f"The search stopped early: {budget.failed} trials failed (--max-failed-trials {budget.limit}). "
              "Each FAILED run in MLflow holds its error in the `error` tag.")
        return 1
    if not ranked:
        print("No trial produced a result; see the errors above and the FAILED runs in MLflow.")
        return 1
    return 0
