"""One search from validated inputs to the closing table.

`prepare` runs three steps before Ray starts or anything reaches MLflow, so bad input costs
seconds and leaves nothing behind:
1. `check_options`: the flags alone (numbers, paths, URIs, the cluster address);
2. `load_inputs`: preset, search space, targets, model source and data;
3. `plan_search`: a frozen description of the search (`PreparedSearch`).

`execute` then runs it: Ray, the MLflow records, the Tune search, the test split, the ranking
and registration; `report` prints the closing table. Nothing here names a model: per-model
facts come from the registry (trainers/registry.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainers import metric_names as names
from trainers import synthetic
from trainers.data import HUB_DATASET_ID, Dataset, load_dataset_dir
from trainers.models import resolve_source
from trainers.registry import ModelSpec
from tuning import report
from tuning.config import (
    SPACES_DIR, TARGETS_FILE, TEMPLATE_KEY, Preset, SearchSpace, UserError, layer_preset_over_space, load_preset,
    load_search_space, load_targets, preset_path, shipped_presets,
)
from tuning.ray_search import SearchRequest, resolve_trial_runner
from tuning.tracking import redact_uri, sqlite_path

PROJECT_DIR = Path(__file__).resolve().parent.parent
EXPERIMENT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# Trainer settings that say where things live on this machine: logged on the parent run, not
# on every trial.
MACHINE_SETTINGS = ("targets", "cache_dir", "architecture")


@dataclass(frozen=True)
class Locations:
    """Where the search writes, checked to be writable."""

    results_dir: Path
    storage: str
    tracking_uri: str


@dataclass(frozen=True)
class Inputs:
    """Everything the search reads, loaded and checked."""

    spec: ModelSpec
    preset: Preset
    preset_name: str
    preset_file: Path
    space: SearchSpace
    space_file: Path
    targets: dict[str, dict[str, float]]
    mlflow_experiment: str
    # The preset's settings the space does not search, and the warm starts (see config.py).
    preset_fixed: dict[str, Any]
    warm_start: list[dict[str, Any]]
    # A local model folder, or where the base will be built (`builds_base`).
    model_path: Path | None
    model_source: str | None
    builds_base: bool
    dataset: Dataset
    # The parent run of the interrupted search `--resume` continues.
    resumed_run: Any = None
    # The ToolRAG model `--evaluate-with-toolrag` names (tuning.pipeline_eval.ResolvedModel).
    evaluation_toolrag: Any = None


@dataclass(frozen=True)
class PreparedSearch:
    spec: ModelSpec
    request: SearchRequest
    tracking_uri: str
    results_dir: Path
    mlflow_experiment: str
    # The parent run's name in MLflow; a new search's Tune run has the same name.
    parent_run_name: str
    preset_name: str
    targets: dict[str, dict[str, float]]
    dataset: Dataset
    files: list[Path]
    top_k: int
    # Logged on every trial's run beside its searched settings.
    trial_params: dict[str, Any]
    # Tags on every trial's run: which model, task and data, to compare across searches.
    trial_tags: dict[str, str]
    parent_params: dict[str, Any]
    parent_tags: dict[str, str]
    base_build: dict[str, Any] | None = None
    resume_parent_id: str | None = None
    # What the trials never see: scored once per trial, on its best checkpoint, after the search.
    test_data: Any = None
    # Figures about the data that could not be prevented, for the parent run.
    data_metrics: dict[str, float] = field(default_factory=dict)
    # With --evaluate-with-toolrag: the ToolRAG model the closest planner is evaluated with.
    evaluation_toolrag: Any = None


# ----- step 1: the flags ------------------------------------------------------------------
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


def _check_numbers(args: argparse.Namespace) -> None:
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
    if args.experiment_name is not None and not EXPERIMENT_NAME_PATTERN.match(args.experiment_name):
        raise UserError(f"--experiment-name {args.experiment_name!r}: use letters, digits, '.', '_' and '-' only")
    try:
        trial_runner(args)
    except ValueError as error:
        raise UserError(str(error)) from None


def trial_runner(args: argparse.Namespace) -> str:
    """in-process or ray-train (see tuning/ray_search.py): --trial-runner, auto by default."""
    return resolve_trial_runner(getattr(args, "trial_runner", "auto"), args.workers_per_trial,
                                args.gpus_per_worker, args.address)


def check_options(args: argparse.Namespace) -> Locations:
    """Check the flags that need no file read: numbers, where results go, the cluster."""
    _check_numbers(args)
    results_dir = Path(args.results_dir).expanduser().resolve()
    _check_writable(results_dir, "--results-dir")
    storage = args.storage or str(results_dir / "ray")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
        _check_writable(Path(storage), "--storage")
    tracking_uri = args.tracking_uri or f"sqlite:///{results_dir / 'mlflow.db'}"
    sqlite_file = sqlite_path(tracking_uri)
    if sqlite_file is not None:
        if not sqlite_file.is_absolute():
            raise UserError(f"--tracking-uri {tracking_uri}: use an absolute path (sqlite:////abs/path.db); "
                            "trials run in other working directories")
        _check_writable(sqlite_file, "--tracking-uri")
    elif not tracking_uri.startswith(("http://", "https://", "databricks")):
        raise UserError(f"--tracking-uri {tracking_uri}: expected sqlite:////abs/path.db or http(s)://host:port")
    if args.address:
        from tuning.cluster import check_address

        problem = check_address(args.address)
        if problem:
            raise UserError(f"--address {args.address}: {problem}")
    return Locations(results_dir, storage, tracking_uri)


# ----- step 2: the files ------------------------------------------------------------------
def _load_data(args: argparse.Namespace, preset: Preset, results_dir: Path) -> Dataset:
    """The data the search trains on. Without --data, synthetic data is generated once per
    (seed, sizes) and kept under the results folder, written atomically."""
    if args.data is None:
        sizes = preset.data
        # The generator's version is in the name: data from an older grammar is never reused.
        folder = (results_dir / "data" / f"synthetic-v{synthetic.GENERATOR_VERSION}-seed{args.seed}-"
                                         f"{sizes.synthetic_train}-{sizes.synthetic_test}")
        if not synthetic.is_generated(folder):  # the marker is written last, after both files
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


def smoke_preset(task: str, preset: str) -> str:
    """The preset `--smoke` runs instead of `preset`: its own `<preset>-smoke` when one is
    shipped (linear-smoke), else `tiny` (the transformer at test size)."""
    shipped = shipped_presets(task)
    if preset.endswith("-smoke") and preset in shipped:
        return preset
    return f"{preset}-smoke" if f"{preset}-smoke" in shipped else "tiny"


def _templates_used(spec: ModelSpec, space: SearchSpace, preset_trainer: dict[str, Any]) -> set[str]:
    parameter = space.parameters.get(TEMPLATE_KEY)
    templates = set(parameter.values if parameter is not None and parameter.values else [])
    templates.add(preset_trainer.get(TEMPLATE_KEY, spec.config_class.model_fields[TEMPLATE_KEY].default))
    return templates


def _model_source(args: argparse.Namespace, spec: ModelSpec, preset: Preset) -> tuple[Path | None, str | None, bool]:
    """(local model folder, where it came from, whether the base is still to be built)."""
    if not spec.needs_model_source:
        if args.model_path:
            raise UserError(f"--model-path: the {spec.name} model is trained from nothing and loads no model")
        return None, None, False
    builds_base = preset.model.build_base is not None and args.model_path is None
    if builds_base:
        return None, None, True
    source = args.model_path or preset.model.name_or_path
    return resolve_source(source, "model", "--model-path"), source, False


def _generated_data(args: argparse.Namespace) -> bool:
    """Whether the search trains on this project's generated data (no --data, or a folder the
    generator wrote): its targets are then those of targets.yaml's generated_data section."""
    return args.data is None or synthetic.is_generated(Path(args.data).expanduser())


def load_inputs(args: argparse.Namespace, locations: Locations) -> Inputs:
    """Load and check preset, space, targets, model and data, in that order: data comes last
    because generating it is the one step that writes (a cache under the results folder)."""
    preset_name = smoke_preset(args.model, args.preset) if args.smoke else args.preset
    preset, spec = load_preset(args.model, preset_name)
    preset_file = preset_path(args.model, preset_name)
    if preset_name not in shipped_presets(args.model):
        preset_name = preset_file.stem
    space_file = Path(args.space) if args.space else SPACES_DIR / preset.search.space
    space = load_search_space(spec, space_file, preset.trainer)
    targets = load_targets(spec.task, generated_data=_generated_data(args))
    if args.objective == "pareto" and spec.pareto is None:
        raise UserError(f"--objective pareto: the {spec.name} model has no pair of figures to trade; "
                        "use --objective distance")
    mlflow_experiment = args.experiment_name or f"tinyagent-{args.model}-{preset_name}"
    if not EXPERIMENT_NAME_PATTERN.match(mlflow_experiment):  # names MLflow, Tune and Train runs alike
        raise UserError(f"--preset {args.preset}: the experiment name it gives, {mlflow_experiment!r}, may use "
                        "letters, digits, '.', '_' and '-' only; rename the file or pass --experiment-name")
    # Before any data is generated: a search that cannot be resumed leaves nothing behind.
    resumed_run = None
    if args.resume:
        from tuning.resume import search_to_resume

        resumed_run = search_to_resume(mlflow_experiment, locations.tracking_uri, locations.storage)
    model_path, model_source, builds_base = _model_source(args, spec, preset)
    if model_path is not None and spec.check_model_folder is not None:
        problem = spec.check_model_folder(model_path, _templates_used(spec, space, preset.trainer))
        if problem:
            raise UserError(problem)
    preset_fixed, warm_start = layer_preset_over_space(preset.trainer, preset_file, space, space_file)
    evaluation_toolrag = _evaluation_toolrag(args, spec, preset_fixed, preset_file, locations)
    dataset = _load_data(args, preset, locations.results_dir)
    if builds_base:
        model_path = spec.base_folder(locations.results_dir / "cache", dataset.split_fingerprint,
                                      preset.model.architecture, preset.model.build_base)
        model_source = f"built from config: {model_path}"
    return Inputs(spec=spec, preset=preset, preset_name=preset_name, preset_file=preset_file, space=space,
                  space_file=space_file, targets=targets, mlflow_experiment=mlflow_experiment,
                  preset_fixed=preset_fixed, warm_start=warm_start, model_path=model_path,
                  model_source=model_source, builds_base=builds_base, dataset=dataset, resumed_run=resumed_run,
                  evaluation_toolrag=evaluation_toolrag)


def _evaluation_toolrag(args: argparse.Namespace, spec: ModelSpec, preset_fixed: dict[str, Any], preset_file: Path,
                        locations: Locations):
    """The ToolRAG model --evaluate-with-toolrag names, as a local folder, or None. A planner
    preset measured from the paper's with-ToolRAG figure cannot run without one: its figure
    would otherwise be taken on prompts that hold every tool."""
    from trainers.registry import MODELS
    from tuning.pipeline_eval import TOOLRAG, resolve_model

    given = getattr(args, "evaluate_with_toolrag", None)
    if given is None:
        if preset_fixed.get("paper_target") == names.PLAN_SUCCESS_WITH_TOOLRAG:
            raise UserError(f"{preset_file}: paper_target {names.PLAN_SUCCESS_WITH_TOOLRAG} is measured with ToolRAG "
                            "building the prompts; pass --evaluate-with-toolrag URI (a ToolRAG model, e.g. "
                            "models:/tinyagent-toolrag@closest-to-paper)")
        return None
    if spec.pipeline_role is None:
        evaluated = sorted({other.task for other in MODELS.values() if other.pipeline_role})
        raise UserError(f"--evaluate-with-toolrag: only a {' or '.join(evaluated)} search is evaluated with a "
                        f"ToolRAG model (this is a {spec.task} search)")
    return resolve_model(given, "--evaluate-with-toolrag", locations.tracking_uri,
                         locations.results_dir / "cache" / "models", TOOLRAG)


# ----- step 3: the plan -------------------------------------------------------------------
def data_metrics(dataset: Dataset) -> dict[str, float]:
    """What the data could not be kept from, for the parent run."""
    return {"test_queries_in_train": dataset.test_queries_in_train,
            "unparseable_targets": dataset.unparseable_targets,
            "skipped_unparseable_targets": dataset.skipped_unparseable}


def _trainer_base(args: argparse.Namespace, inputs: Inputs, locations: Locations) -> dict[str, Any]:
    """The settings every trial shares. One winner per setting: the trainer's default, then the
    preset; searched keys come from each trial (the preset's values for them are the first warm
    start); the seed is --seed; where the model and caches live is this machine's."""
    fields = inputs.spec.config_class.model_fields
    machine = {"targets": inputs.targets, "seed": args.seed}
    if "model_path" in fields:
        machine["model_path"] = str(inputs.model_path)
    if "cache_dir" in fields:
        machine["cache_dir"] = str(locations.results_dir / "cache" / "tokens")
    if "architecture" in fields and inputs.preset.model is not None:
        machine["architecture"] = inputs.preset.model.architecture
    merged = {**inputs.preset_fixed, **machine, **(inputs.warm_start[0] if inputs.warm_start else {})}
    return inputs.spec.config_class.model_validate(merged).model_dump(exclude=set(inputs.space.parameters))


def _parent_params(args: argparse.Namespace, inputs: Inputs, request: SearchRequest) -> dict[str, Any]:
    dataset = inputs.dataset
    return {
        "model": args.model, "model_name": inputs.spec.name, "family": inputs.spec.family,
        "preset": inputs.preset_name, "objective": request.objective,
        "num_samples": request.num_samples, "seed": request.seed, "workers_per_trial": request.workers_per_trial,
        "max_failed_trials": request.max_failed_trials, "trial_runner": request.trial_runner,
        "sampler": request.sampler, "early_stopping": request.early_stopping,
        "startup_trials": request.startup_trials if request.startup_trials is not None else "optuna default (10)",
        "full_budget_reruns": request.full_budget_reruns,
        "grace_period": request.grace_period, "reduction_factor": request.reduction_factor,
        "cpus_per_worker": request.cpus_per_worker, "gpus_per_worker": request.gpus_per_worker,
        "data_source": dataset.source, "data_fingerprint": dataset.fingerprint,
        "train_examples": len(dataset.train), "test_examples": len(dataset.test),
        "val_fraction": dataset.val_fraction, "val_examples": len(dataset.val),
        "search_space": json.dumps(request.param_space), "warm_start": json.dumps(request.warm_start),
        "model_source": inputs.model_source or "none (trained from nothing)",
        # Which figures "closest to the paper" measured from: the paper's, or on generated data
        # the ones relative to the data (search_spaces/targets.yaml, generated_data).
        "paper_targets": json.dumps(inputs.targets, sort_keys=True),
        "generated_data": _generated_data(args),
    }


def plan_search(args: argparse.Namespace, locations: Locations, inputs: Inputs) -> PreparedSearch:
    """The frozen description of the search: what Tune runs, and what MLflow records."""
    from tuning.resume import TUNE_RUN_TAG, check_same_search, tune_run_name

    spec, dataset, preset = inputs.spec, inputs.dataset, inputs.preset
    trainer_base = _trainer_base(args, inputs, locations)
    parent_run_name = f"{inputs.mlflow_experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    tune_name = parent_run_name
    if inputs.resumed_run is not None:
        parent_run_name, tune_name = inputs.resumed_run.info.run_name, tune_run_name(inputs.resumed_run)
    request = SearchRequest(
        model=spec.name, tune_run_name=tune_name, storage_path=locations.storage, trainer_base=trainer_base,
        param_space={k: v.model_dump() for k, v in inputs.space.parameters.items()}, warm_start=inputs.warm_start,
        data={"train": spec.split_payload(dataset.train), "val": spec.split_payload(dataset.val)},
        data_fingerprint=dataset.split_fingerprint,
        num_samples=args.num_samples or preset.search.num_samples, max_concurrent=args.max_concurrent,
        workers_per_trial=args.workers_per_trial, cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker, seed=args.seed, objective=args.objective,
        grace_period=preset.search.grace_period, reduction_factor=preset.search.reduction_factor,
        sampler=preset.search.sampler, early_stopping=preset.search.early_stopping,
        startup_trials=preset.search.startup_trials,
        full_budget_reruns=not getattr(args, "no_full_budget_reruns", False),
        time_budget_s=args.time_budget_s if args.time_budget_s is not None else preset.search.time_budget_s,
        address=args.address, max_failed_trials=args.max_failed_trials,
        # On the local Ray no node is lost, and a restart would only race the teardown of a
        # trial ASHA stopped (its workers then fail their health check).
        retries_per_trial=args.retries_per_trial if args.retries_per_trial is not None else (2 if args.address else 0),
        resume=inputs.resumed_run is not None, verbose=getattr(args, "verbose", False),
        trial_runner=trial_runner(args),
    )
    parent_params = _parent_params(args, inputs, request)
    if inputs.resumed_run is not None:
        check_same_search(inputs.resumed_run, parent_params, locations.storage)
    trial_params = {k: v for k, v in trainer_base.items() if k not in MACHINE_SETTINGS}
    trial_params.update(model_source=inputs.model_source or "none", preset=inputs.preset_name,
                        data_fingerprint=dataset.fingerprint)
    base_build = None
    if inputs.builds_base:
        base_build = {"target": inputs.model_path, "architecture": preset.model.architecture,
                      "settings": preset.model.build_base}
    return PreparedSearch(
        spec=spec, request=request, tracking_uri=locations.tracking_uri, results_dir=locations.results_dir,
        mlflow_experiment=inputs.mlflow_experiment, parent_run_name=parent_run_name, preset_name=inputs.preset_name,
        targets=inputs.targets, dataset=dataset, files=[inputs.space_file, inputs.preset_file, TARGETS_FILE],
        top_k=args.top_k, trial_params=trial_params,
        trial_tags={"model": spec.name, "task": spec.task, "family": spec.family,
                    "data_split": dataset.split_fingerprint},
        parent_params=parent_params,
        parent_tags={"git_commit": _git_commit(), "storage": redact_uri(locations.storage), TUNE_RUN_TAG: tune_name},
        base_build=base_build, resume_parent_id=inputs.resumed_run.info.run_id if inputs.resumed_run else None,
        test_data=spec.split_payload(dataset.test), data_metrics=data_metrics(dataset),
        evaluation_toolrag=inputs.evaluation_toolrag,
    )


def prepare(args: argparse.Namespace) -> PreparedSearch:
    """Validate every input and plan the search; raises UserError (or DataError /
    SourceUnavailable, also the user's to fix)."""
    locations = check_options(args)
    inputs = load_inputs(args, locations)
    print(report.format_data_summary(inputs.dataset), flush=True)
    print(report.format_targets(inputs.spec, inputs.targets, _generated_data(args)), flush=True)
    return plan_search(args, locations, inputs)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----- execute ----------------------------------------------------------------------------
@dataclass
class Outcome:
    """What the search left: for the parent run, the closing table and the exit code."""

    status: str
    ranked: list
    totals: dict[str, float]
    front: list = field(default_factory=list)
    registered_version: str | None = None
    budget: Any = None
    # Trials found when resuming, by state (finished, failed, interrupted).
    resumed_counts: dict[str, int] | None = None
    family_bests: list = field(default_factory=list)
    # The comparisons the search answers (tuning/full_budget.py), as the closing table prints them.
    comparison_lines: list[str] = field(default_factory=list)


def _build_base(prepared: PreparedSearch) -> None:
    """Build the model's base once, before Ray starts, using every core of this machine."""
    import torch

    build = prepared.base_build
    if Path(build["target"]).is_dir():  # built atomically: a folder there is complete
        print(f"[base] using the base model cached in {build['target']}", flush=True)
        return
    torch.set_num_threads(os.cpu_count() or 1)
    prepared.spec.base_builder(Path(build["target"]), prepared.dataset.train, build["architecture"],
                               build["settings"], progress=lambda line: print(line, flush=True))


def _open_tracking(prepared: PreparedSearch):
    """(tracker, counts of the trials found when resuming, or None)."""
    from tuning import ray_search
    from tuning.tracking import SearchTracker

    request = prepared.request
    artifacts = (prepared.results_dir / "mlartifacts").as_uri() if sqlite_path(prepared.tracking_uri) else None
    tracker = SearchTracker(prepared.tracking_uri, prepared.mlflow_experiment,
                            max_epochs=ray_search.max_epochs(request.trainer_base, request.param_space),
                            artifact_location=artifacts, trial_tags=prepared.trial_tags)
    tracker.datasets = dataset_inputs(prepared.dataset)
    found = None
    if prepared.resume_parent_id:
        found = tracker.reattach(prepared.resume_parent_id, list(request.param_space))
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
    from trainers.data import split_digest
    from tuning.tracking import TEST_CONTEXT, TRAIN_CONTEXT, VALIDATION_CONTEXT, dataset_input

    source_name = Path(dataset.source).name or dataset.source
    return {context: dataset_input(f"{source_name}/{split}", context, split_digest(examples), dataset.source,
                                   len(examples))
            for context, split, examples in ((TRAIN_CONTEXT, "train", dataset.train),
                                             (VALIDATION_CONTEXT, "validation", dataset.val),
                                             (TEST_CONTEXT, "test", dataset.test))}


def _totals(tracker, started: float) -> dict[str, float]:
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
        "full_budget_seconds": tracker.full_budget_seconds,
    }
    ranked = tracker.ranked()
    if ranked:
        totals["best_paper_distance"] = ranked[0].objective
        if ranked[0].test:  # the closest trial (chosen on validation), on the test split
            totals.update({f"closest_test_{k}": v for k, v in ranked[0].test.items() if "/" not in k})
    return totals


def _close(prepared: PreparedSearch, tracker, status: str, started: float) -> Outcome:
    """Rank, register the closest trial, mark the Pareto front and close the parent run: done
    whatever went wrong before, so the record is complete."""
    ranked = tracker.ranked()
    outcome = Outcome(status=status, ranked=ranked, totals=_totals(tracker, started))
    try:  # whatever goes wrong while marking, the parent run is closed
        outcome.comparison_lines = _compare(prepared, tracker)
        if ranked:
            outcome.registered_version = tracker.mark_closest(prepared.top_k, prepared.spec.registered_model)
        if prepared.request.objective == "pareto":
            outcome.front = report.pareto_front(ranked, prepared.spec.pareto)
            tracker.tag_pareto_front(outcome.front)
    finally:
        tracker.finish_parent(status, outcome.totals)
    return outcome


def _compare(prepared: PreparedSearch, tracker) -> list[str]:
    """The comparisons the search answers, on full-budget trials and paired test outcomes: the
    prompt templates, and the lowest pos_weight against the closest trial's. Logged on the
    parent run (metrics, and the sentence as a tag); returns the closing table's lines."""
    from tuning import full_budget

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


def _run_full_budget(prepared: PreparedSearch, tracker, callbacks: list, progress) -> None:
    """Rerun, to the last epoch, each template's best configuration when no trial of it got there,
    and the lowest pos_weight's (tuning/full_budget.py). Their runs are tagged with why."""
    from tuning import full_budget, ray_search

    request = prepared.request
    reruns = full_budget.reruns_needed(list(tracker.trials.values()), request.param_space,
                                       prepared.spec.scheduler_metric)
    if not reruns:
        print("[full budget] every compared value already has a trial trained to the end", flush=True)
        return
    print(f"[full budget] {len(reruns)} rerun(s) to the last epoch, early stopping off: "
          + "; ".join(f"{r.reason} (" + (f"trial {r.source_trial}'s configuration" if r.source_trial
                                         else "the closest trial's configuration with this value") + ")"
                      for r in reruns), flush=True)
    progress.total += len(reruns)  # the progress line counts the reruns too
    began = time.time()
    assigned = ray_search.run_full_budget(request, [r.config for r in reruns], callbacks)
    tracker.full_budget_seconds += time.time() - began
    for trial_id, index in assigned.items():
        if trial_id in tracker.trials:
            tracker.mark_rerun(trial_id, reruns[index].reason, reruns[index].source_trial)


def _search_and_score(prepared: PreparedSearch, tracker, resumed_counts, started: float,
                      log_file: Path | None = None) -> Outcome:
    """The Tune search, the full-budget reruns, then the test split once per trial; the parent
    run is closed either way."""
    from tuning import holdout, ray_search
    from tuning.console import SearchProgress

    request, status, budget = prepared.request, "FAILED", None
    progress = SearchProgress(tracker, request.num_samples,
                              ray_search.lanes(request),
                              request.time_budget_s, log_file, started=started)
    try:
        callbacks = [tracker.callback(prepared.trial_params), progress]
        budget = ray_search.run_search(request, callbacks,
                                       failed_before_resume=(resumed_counts or {}).get("failed", 0))
        if request.full_budget_reruns and not budget.exhausted:
            _run_full_budget(prepared, tracker, callbacks, progress)
        holdout.score_trials_on_test(tracker, prepared.spec, prepared.test_data, request.storage_path,
                                     request.cpus_per_worker, request.gpus_per_worker, verbose=request.verbose)
        holdout.score_untuned_base(tracker, prepared.spec, request.trainer_base,
                                   {"val": request.data["val"], "test": prepared.test_data},
                                   request.cpus_per_worker, request.gpus_per_worker)
        status = "FAILED" if budget.exhausted else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        outcome = _close(prepared, tracker, status, started)
        outcome.budget, outcome.resumed_counts = budget, resumed_counts
    return outcome


def execute(prepared: PreparedSearch) -> int:
    """Run the prepared search; returns the process exit code."""
    import ray
    from mlflow.exceptions import MlflowException

    from tuning import cluster, console

    request = prepared.request
    search_log = console.route_logs(request.verbose)
    if prepared.base_build is not None:
        # Before Ray starts: its idle processes took ~15% of the 2 cores from a laptop build.
        _build_base(prepared)
    # The search's clock, as Tune's time budget counts: the base build is reported apart.
    started = time.time()
    started_ray = cluster.start_ray(request.address, verbose=request.verbose)
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
        outcome = _search_and_score(prepared, tracker, resumed_counts, started, log_file)
    finally:
        if started_ray:
            cluster.wait_for_placement_groups()
            ray.shutdown()
    try:
        outcome.family_bests = tracker.best_per_family(prepared.spec.task, prepared.dataset.split_fingerprint)
    except MlflowException as error:  # a comparison the store cannot give must not hide the search's own table
        print(f"[mlflow] could not compare with other models' searches: {str(error).splitlines()[0]}", flush=True)
    closing = report.format_closing(prepared, outcome, tracker)
    print(closing)
    _publish_report(prepared, tracker, closing)
    if prepared.evaluation_toolrag is not None:
        _evaluate_closest_with_toolrag(prepared, outcome)
    return exit_code(outcome)


def _publish_report(prepared: PreparedSearch, tracker, closing: str) -> None:
    """Plots, the parent run's description and the report page. The search is already recorded:
    a failure here costs only these, and its traceback goes to the log file."""
    import logging

    from tuning import report_page

    if tracker.parent_run_id is None:
        return
    try:
        page = report_page.publish(prepared.tracking_uri, prepared.mlflow_experiment, tracker.parent_run_id,
                                   prepared.results_dir, closing_text=closing)
    except Exception as error:  # noqa: BLE001 - reported, with its traceback in the log
        logging.getLogger(__name__).exception("building the report failed")
        print(f"[report] could not build the report ({type(error).__name__}: {error}); traceback in "
              f"{prepared.results_dir / 'logs' / prepared.parent_run_name}", flush=True)
        return
    print(f"[report] {page} (the plots and this table are also on the parent run in MLflow; rebuild with "
          f"python -m tuning.report --experiment {prepared.mlflow_experiment} --run {tracker.parent_run_id} "
          f"--results-dir {prepared.results_dir}"
          + ("" if prepared.tracking_uri == f"sqlite:///{prepared.results_dir / 'mlflow.db'}"
             else f" --tracking-uri {redact_uri(prepared.tracking_uri)}") + ")", flush=True)


def _say_where_ray_is(started_ray: bool, logs: Path, log_file: Path, verbose: bool) -> None:
    """The Ray phase line: which Ray, where its dashboard and the logs are."""
    import ray

    from tuning import cluster, console

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
    from tuning import pipeline_eval

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
    pipeline_eval.evaluate(planner, prepared.evaluation_toolrag, None, prepared.dataset, "test", None,
                           prepared.tracking_uri, pipeline_eval.EVALUATION_EXPERIMENT, paper=paper,
                           results_dir=prepared.results_dir)


def exit_code(outcome: Outcome) -> int:
    """1 when the failure budget ran out or no trial produced a result, else 0."""
    if outcome.budget is not None and outcome.budget.exhausted:
        return 1
    return 0 if outcome.ranked else 1
