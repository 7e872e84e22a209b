"""Preparing one search, before Ray starts or anything reaches MLflow, so bad input costs
seconds and leaves nothing behind:
1. `check_options`: the flags alone (numbers, paths, URIs, the cluster address);
2. `load_inputs`: preset, search space, targets, model source and data;
3. `plan_search`: a frozen description of the search (`PreparedSearch`), which
   `tuning.execute` runs. Nothing here names a model: per-model facts come from the registry
   (trainers/registry.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from trainers import metric_names as names
from trainers import synthetic
from trainers.data import HUB_DATASET_ID, Dataset, load_dataset_dir
from trainers.gguf_base import converted_folder
from trainers.models import resolve_source
from trainers.registry import MODELS, ModelSpec
from tuning import closing_table
from tuning.config import (
    SPACES_DIR, TARGETS_FILE, TEMPLATE_KEY, Preset, SearchSpace, UserError, layer_preset_over_space, load_preset,
    load_search_space, load_targets, preset_path, shipped_presets,
)
from tuning.cluster import check_address
from tuning.job_context import git_commit, job_tags
from tuning.mlflow_store import default_tracking_uri, redact_uri, sqlite_path
from tuning.pipeline_eval import TOOLRAG, resolve_model
from tuning.ray_search import SearchRequest, resolve_trial_runner
from tuning.resume import (
    STATE_VERSION, STATE_VERSION_TAG, TUNE_RUN_TAG, check_same_search, search_to_resume, tune_run_name,
)
from tuning.search_plan import Inputs, Locations, PreparedSearch

EXPERIMENT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# Trainer settings that say where things live on this machine: logged on the parent run, not
# on every trial.
MACHINE_SETTINGS = ("targets", "cache_dir", "architecture")


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


def check_options(args: argparse.Namespace, check_cluster: bool = True) -> Locations:
    """Check the flags that need no file read: numbers, where results go, the cluster (unless
    the search is submitted as a job: the cluster is then checked where the job runs)."""
    _check_numbers(args)
    results_dir = Path(args.results_dir).expanduser().resolve()
    _check_writable(results_dir, "--results-dir")
    storage = args.storage or str(results_dir / "ray")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
        _check_writable(Path(storage), "--storage")
    tracking_uri = args.tracking_uri or default_tracking_uri(results_dir)
    sqlite_file = sqlite_path(tracking_uri)
    if sqlite_file is not None:
        if not sqlite_file.is_absolute():
            raise UserError(f"--tracking-uri {tracking_uri}: use an absolute path (sqlite:////abs/path.db); "
                            "trials run in other working directories")
        _check_writable(sqlite_file, "--tracking-uri")
    elif not tracking_uri.startswith(("http://", "https://", "databricks")):
        raise UserError(f"--tracking-uri {tracking_uri}: expected sqlite:////abs/path.db or http(s)://host:port")
    if args.address and check_cluster:
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
    preset_path(task, preset)  # an unknown preset is refused, --smoke or not
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
    builds_base = (preset.model.build_base is not None or preset.model.gguf is not None) and args.model_path is None
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

        resumed_run = search_to_resume(mlflow_experiment, locations.tracking_uri, locations.storage)
    model_path, model_source, builds_base = _model_source(args, spec, preset)
    if model_path is not None and spec.check_model_folder is not None:
        problem = spec.check_model_folder(model_path, _templates_used(spec, space, preset.trainer))
        if problem:
            raise UserError(problem)
    preset_fixed, warm_start = layer_preset_over_space(preset.trainer, preset_file, space, space_file)
    evaluation_toolrag = _evaluation_toolrag(args, spec, preset_fixed, preset_file, locations=locations)
    dataset = _load_data(args, preset, locations.results_dir)
    if builds_base and preset.model.gguf is not None:
        model_path = converted_folder(locations.results_dir / "cache", preset.model.gguf)
        model_source = f"{preset.model.gguf.requirement}: {preset.model.gguf.file}, converted in {model_path}"
    elif builds_base:
        model_path = spec.base_folder(locations.results_dir / "cache", dataset.split_fingerprint,
                                      preset.model.architecture, preset.model.build_base)
        model_source = f"built from config: {model_path}"
    return Inputs(spec=spec, preset=preset, preset_name=preset_name, preset_file=preset_file, space=space,
                  space_file=space_file, targets=targets, mlflow_experiment=mlflow_experiment,
                  preset_fixed=preset_fixed, warm_start=warm_start, model_path=model_path,
                  model_source=model_source, builds_base=builds_base, dataset=dataset, resumed_run=resumed_run,
                  evaluation_toolrag=evaluation_toolrag)


def _evaluation_toolrag(args: argparse.Namespace, spec: ModelSpec, preset_fixed: dict[str, Any], preset_file: Path,
                        *, locations: Locations):
    """The ToolRAG model --evaluate-with-toolrag names, as a local folder, or None. A planner
    preset measured from the paper's with-ToolRAG figure cannot run without one: its figure
    would otherwise be taken on prompts that hold every tool."""

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
                         locations.results_dir / "cache" / "models", role=TOOLRAG)


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
        # One name per meaning, as on every trial's run: the task (--model on the command line)
        # and the registry's model that learns it.
        "task": inputs.spec.task, "model": inputs.spec.name, "family": inputs.spec.family,
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
                      "settings": preset.model.build_base, "gguf": preset.model.gguf}
    return PreparedSearch(
        spec=spec, request=request, tracking_uri=locations.tracking_uri, results_dir=locations.results_dir,
        mlflow_experiment=inputs.mlflow_experiment, parent_run_name=parent_run_name, preset_name=inputs.preset_name,
        targets=inputs.targets, dataset=dataset, files=[inputs.space_file, inputs.preset_file, TARGETS_FILE],
        top_k=args.top_k, trial_params=trial_params,
        trial_tags={"model": spec.name, "task": spec.task, "family": spec.family,
                    "data_split": dataset.split_fingerprint},
        parent_params=parent_params,
        parent_tags={"git_commit": git_commit(), "storage": redact_uri(locations.storage), TUNE_RUN_TAG: tune_name,
                     STATE_VERSION_TAG: STATE_VERSION, **job_tags()},
        base_build=base_build, resume_parent_id=inputs.resumed_run.info.run_id if inputs.resumed_run else None,
        test_data=spec.split_payload(dataset.test), data_metrics=data_metrics(dataset),
        evaluation_toolrag=inputs.evaluation_toolrag,
    )


def prepare(args: argparse.Namespace, check_cluster: bool = True) -> PreparedSearch:
    """Validate every input and plan the search; raises UserError (or DataError /
    SourceUnavailable, also the user's to fix). check_cluster=False leaves --address to the
    job that runs the search on the cluster (tuning/jobs.py)."""
    locations = check_options(args, check_cluster)
    inputs = load_inputs(args, locations)
    print(closing_table.format_data_summary(inputs.dataset), flush=True)
    print(closing_table.format_targets(inputs.spec, inputs.targets, _generated_data(args)), flush=True)
    return plan_search(args, locations, inputs)
