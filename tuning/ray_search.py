"""Builds and runs the Tune search on Ray: Optuna proposes, ASHA stops, Ray Train trains.

A trial runs the model's `train_fn_per_worker` one of two ways (`trial_runner`):
- `ray-train`: the Tune trial is a small function trainable (`fit_trial`) that fits a
  `TorchTrainer` (the Train V2 shape; passing a trainer to the Tuner is the deprecated V1 API).
  The trial itself asks for almost no CPU, so the cores go to its Train workers: any number of
  workers, GPUs, nodes. Each trial starts a controller and a worker group of fresh processes.
- `in-process`: the Tune trial is the worker (`train_in_process`). It asks for one worker's
  resources and runs the training function itself, and Tune reuses its process for the next
  trial, so the imports and caches stay warm. One CPU worker only.
`auto` (the default) picks in-process for one CPU worker per trial on a local Ray, else
ray-train. "Driver" means one thing here: the search process, Ray's driver.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from trainers import metric_names as names
from tuning.cluster import default_concurrency, rerun_cpu_share
from tuning.job_context import STOP
from tuning.storage import train_storage, tune_storage
from tuning.trainables import TrialContext, trial_trainable

# How a trial trains (see the module's docstring and `resolve_trial_runner`).
TRIAL_RUNNERS = ("auto", "in-process", "ray-train")
# Tune saves the search's state (trials, searcher) at most every 10 s by default; whatever
# happened since is unknown to `--resume` after a crash. The state is small, so save often.
EXPERIMENT_STATE_PERIOD_S = "2"


@dataclass(frozen=True)
class SearchRequest:
    """Everything the Tune run needs, already validated."""

    # The registry name of the model trained (trainers/registry.py).
    model: str
    # The Tune run's folder under STORAGE/tune, and the prefix of its trials' Train runs.
    tune_run_name: str
    storage_path: str
    trainer_base: dict[str, Any]
    param_space: dict[str, dict[str, Any]]
    warm_start: list[dict[str, Any]]
    data: dict[str, Any]
    data_fingerprint: str
    num_samples: int
    max_concurrent: int | None
    workers_per_trial: int
    cpus_per_worker: float
    gpus_per_worker: float
    seed: int
    objective: str
    grace_period: int
    reduction_factor: int
    time_budget_s: float | None
    address: str | None
    max_failed_trials: int | None = None
    retries_per_trial: int = 2
    # Continue the interrupted Tune run named tune_run_name instead of starting one.
    resume: bool = False
    # Tune's trial table and the workers' output on the console (default: in the log files).
    verbose: bool = False
    # "in-process" or "ray-train", resolved by `resolve_trial_runner`.
    trial_runner: str = "ray-train"
    # "tpe" or "random"; without early stopping every trial trains all its epochs.
    sampler: str = "tpe"
    early_stopping: bool = True
    # TPE's random proposals before it models results; None: Optuna's default (10).
    startup_trials: int | None = None
    # After the search, train each compared value's best configuration to the end where no
    # trial of it got there (tuning/full_budget.py).
    full_budget_reruns: bool = True


def resolve_trial_runner(choice: str, workers: int, gpus_per_worker: float, address: str | None) -> str:
    """The runner `choice` means for this search; raises ValueError when in-process cannot run it.

    Auto picks in-process when a trial is one CPU worker on a local Ray: there a worker group
    would cost ~16 s of process start-up per trial for nothing DDP needs. A cluster keeps Ray
    Train, whose restarts survive a lost worker node without losing the trial.
    """
    if choice == "auto":
        return "in-process" if workers == 1 and not gpus_per_worker and not address else "ray-train"
    if choice == "in-process" and (workers != 1 or gpus_per_worker):
        raise ValueError("--trial-runner in-process runs one CPU worker per trial: drop --workers-per-trial "
                         "and --gpus-per-worker, or use --trial-runner ray-train")
    return choice


def max_epochs(trainer_base: dict[str, Any], param_space: dict[str, dict[str, Any]]) -> int:
    """The most epochs any trial can run: fixed in the trainer base, or the top of a searched range."""
    spec = param_space.get("epochs")
    if spec is None:
        return int(trainer_base["epochs"])
    return int(max(spec["values"])) if spec["type"] == "choice" else int(spec["high"])


def _tune_space(param_space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from ray import tune

    converted = {}
    for key, spec in param_space.items():
        kind = spec["type"]
        if kind == "loguniform":
            converted[key] = tune.loguniform(spec["low"], spec["high"])
        elif kind == "uniform":
            converted[key] = tune.uniform(spec["low"], spec["high"])
        elif kind == "randint":
            converted[key] = tune.randint(int(spec["low"]), int(spec["high"]) + 1)
        else:
            converted[key] = tune.choice(spec["values"])
    return converted


def objective_setup(objective: str, pareto: tuple[str, str] | None) -> tuple[str | list[str], str | list[str]]:
    """(metric, mode) for Optuna. `distance` minimises best_paper_distance (the best epoch,
    not the last); `pareto` trades the model's first pareto figure (up, recall) against its
    second (down, tools retrieved)."""
    if objective == "pareto":
        return list(pareto), ["max", "min"]
    return names.BEST_PAPER_DISTANCE, "min"


class FailureBudget:
    """Counts failed trials (as a Tune callback) and ends the search (as its stopper) once
    `limit` have failed, so a broken setting cannot burn a cluster's hours trial after trial."""

    def __init__(self, limit: int | None, failed: int = 0):
        from ray import tune

        self.limit = limit
        self.failed = failed
        budget = self

        class _Counter(tune.Callback):
            def on_trial_error(self, iteration, trials, trial, **info):
                budget.failed += 1
                if budget.exhausted:
                    print(f"[search] {budget.failed} trials failed, the budget (--max-failed-trials "
                          f"{budget.limit}): stopping the search", flush=True)

        class _Stopper(tune.Stopper):
            def __call__(self, trial_id, result):
                return False

            def stop_all(self):
                return budget.exhausted

        self.callback, self.stopper = _Counter(), _Stopper()

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.failed >= self.limit


def _new_tuner(request: SearchRequest, trainable, callbacks: list[Any], budget: FailureBudget):
    """A new Tune run: Optuna's TPE (seeded) proposes, the warm starts go first, ASHA stops,
    both in an order that timing cannot change (tuning/ordered_search.py)."""
    import optuna

    from trainers.registry import MODELS
    from tuning.ordered_search import OrderedASHA, OrderedSearch, rung_epochs

    spec = MODELS[request.model]
    metric, mode = objective_setup(request.objective, spec.pareto)
    startup = {} if request.startup_trials is None else {"n_startup_trials": request.startup_trials}
    if request.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=request.seed)
    elif request.objective == "pareto":
        sampler = optuna.samplers.TPESampler(seed=request.seed, multivariate=False, **startup)
    else:
        sampler = optuna.samplers.TPESampler(seed=request.seed, **startup)
    max_concurrent = lanes(request)
    # ASHA needs one scalar, lower is better: the model's own (the distance to the paper, best
    # epoch so far; for the planner with a tie-break, see trainers/planner.py), in both modes.
    rungs = (rung_epochs(request.grace_period, request.reduction_factor,
                         max_epochs(request.trainer_base, request.param_space)) if request.early_stopping else [])
    # The lag is the number of trials at once: proposal k waits for trial k - lag to end.
    searcher = OrderedSearch(request.param_space, metric, mode, sampler, lag=max_concurrent,
                             warm_start=request.warm_start, rung_metric=spec.scheduler_metric, rungs=rungs,
                             reduction_factor=request.reduction_factor)
    scheduler = OrderedASHA(searcher) if request.early_stopping else None
    print(f"[search] {request.num_samples} trials, up to {max_concurrent} at once, "
          f"{request.workers_per_trial} worker(s) x {request.cpus_per_worker} CPU"
          + (f" x {request.gpus_per_worker} GPU" if request.gpus_per_worker else "")
          + f" per trial, {request.trial_runner}", flush=True)
    return _tuner(request, trainable, name=request.tune_run_name, search_alg=searcher, scheduler=scheduler,
                  num_samples=request.num_samples, time_budget_s=request.time_budget_s, callbacks=callbacks,
                  stop=budget.stopper)


def _tuner(request: SearchRequest, trainable, *, name: str, search_alg, scheduler, num_samples: int,
           time_budget_s: float | None, callbacks: list[Any], stop) -> Any:
    """A Tune run of `trainable` under STORAGE/tune/NAME, as many trials at once as the cluster holds."""
    from ray import tune

    return tune.Tuner(
        trainable,
        param_space=_tune_space(request.param_space),
        tune_config=tune.TuneConfig(
            search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
            max_concurrent_trials=lanes(request),
            # In-process, the next trial reuses a finished trial's process and its imports. An
            # ASHA-stopped trial is waiting inside its report, and exits there when Tune resets
            # the process. With Ray Train it stays off: a stopped trial's TorchTrainer would go
            # on running in the reused process (its fit() does not end within the reset timeout).
            reuse_actors=request.trial_runner == "in-process", time_budget_s=time_budget_s,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=tune_storage(request.storage_path), callbacks=callbacks, stop=stop,
            failure_config=tune.FailureConfig(max_failures=trial_restarts(request)),
            verbose=1 if request.verbose else 0,
        ),
    )


def lanes(request: SearchRequest) -> int:
    """Trials at once: --max-concurrent, or as many as the cluster holds now."""
    return request.max_concurrent or default_concurrency(
        workers_per_trial=request.workers_per_trial, cpus_per_worker=request.cpus_per_worker,
        gpus_per_worker=request.gpus_per_worker)


def trial_context(request: SearchRequest, **changes: Any) -> TrialContext:
    """What every trial of the search shares, shipped once (the data through Ray's object store)."""
    import ray

    from trainers.registry import MODELS

    fields = dict(
        train_fn_per_worker=MODELS[request.model].train_fn_per_worker, tune_run_name=request.tune_run_name,
        trainer_base=request.trainer_base, data=ray.put(request.data), data_fingerprint=request.data_fingerprint,
        workers_per_trial=request.workers_per_trial, cpus_per_worker=request.cpus_per_worker,
        gpus_per_worker=request.gpus_per_worker, train_storage_path=train_storage(request.storage_path),
        retries_per_trial=request.retries_per_trial)
    return TrialContext(**{**fields, **changes})


def trial_restarts(request: SearchRequest) -> int:
    """How often Tune restarts a failed trial. In-process, the trial is its worker: the worker
    restarts Train would make (--retries-per-trial) become trial restarts, from the checkpoint."""
    return request.retries_per_trial if request.trial_runner == "in-process" else 0


def run_search(request: SearchRequest, callbacks: list[Any], failed_before_resume: int = 0) -> FailureBudget:
    """Run the search on the connected Ray cluster, with `callbacks` (the MLflow tracker's) on
    Tune's trial events; returns the failure count and budget."""
    from tuning.resume import final_result_recorder

    context = trial_context(request)
    budget = FailureBudget(request.max_failed_trials, failed=failed_before_resume)
    trainable = trial_trainable(request.trial_runner, context)
    callbacks = [*callbacks, budget.callback, final_result_recorder(request.tune_run_name, context.train_storage_path)]
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", EXPERIMENT_STATE_PERIOD_S)
    if request.resume:
        from tuning.resume import restored_tuner

        tuner = restored_tuner(request, trainable, callbacks, budget)
    else:
        tuner = _new_tuner(request, trainable, callbacks, budget)
    _fit(tuner, request.verbose)
    return budget


def _fit(tuner, verbose: bool) -> None:
    # Tune's newer console output prints an experiment box at any verbosity; its older one is
    # silent at verbose=0, which the quiet default wants.
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    if not verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    STOP.in_tune = True  # a SIGTERM now asks Tune to save its state and return
    try:
        tuner.fit()
    finally:
        STOP.in_tune = False
        if previous is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous
    STOP.check()  # Tune returned because it was told to stop: the search ends here


def run_full_budget(request: SearchRequest, configs: list[dict[str, Any]], callbacks: list[Any]) -> dict[str, int]:
    """Train each configuration to its last epoch, with no early stopping and no time budget, as
    trials of a Tune run of their own (STORAGE/tune/<run>-full-budget-<time>) with the search's
    trainable and callbacks. Returns {trial id: index in configs}."""
    from tuning.ordered_search import FixedConfigs
    from tuning.resume import final_result_recorder

    share = rerun_cpu_share(trial_runner=request.trial_runner, cpus_per_worker=request.cpus_per_worker,
                            gpus_per_worker=request.gpus_per_worker, lanes=lanes(request), reruns=len(configs))
    name = f"{request.tune_run_name}-full-budget-{time.strftime('%H%M%S')}"
    context = trial_context(request, tune_run_name=name, cpus_per_worker=request.cpus_per_worker * share)
    fixed = FixedConfigs(configs)
    tuner = _tuner(request, trial_trainable(request.trial_runner, context), name=name, search_alg=fixed,
                   scheduler=None, num_samples=len(configs), time_budget_s=None,
                   callbacks=[*callbacks, final_result_recorder(name, context.train_storage_path)], stop=None)
    _fit(tuner, request.verbose)
    return dict(fixed.assigned)
