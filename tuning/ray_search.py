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
from pathlib import Path
from typing import Any

from trainers import metric_names as names

# Train's controller polls its workers every 2 s by default; at 0.2 s a finished trial
# releases its CPU ~4 s sooner, which matters when trials last a minute. Must be set before
# Ray starts so the local cluster's processes inherit it.
LOCAL_RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # A laptop is never preempted; the watcher is one more actor process to start per trial.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # transformers prints a per-tensor load report for every truncated or re-headed model.
    "TRANSFORMERS_VERBOSITY": "error",
}
# A trial's trainable only waits on its TorchTrainer. It asks for no CPU (a fraction such as 0.01
# would leave 1.98 of 2 CPUs, so the second trial's 1-CPU worker never fits) and a token of
# memory, because Tune needs a non-empty resource request. It runs on the head node, beside the
# search driver: a lost worker node then takes only Train workers, which restart from the
# trial's checkpoint, and never the trial itself.
TRIAL_RESOURCES = {"cpu": 0, "memory": 64 * 1024 * 1024, "node:__internal_head__": 0.001}
PLACEMENT_GROUP_WAIT_S = 30.0
# Where `ray up` leaves the autoscaler's config on the head node.
AUTOSCALING_CONFIG = Path("~/ray_bootstrap_config.yaml")
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
    trial_max_failures: int = 0
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


def scaling_config(workers: int, cpus_per_worker: float, gpus_per_worker: float):
    """Train workers for one trial; with GPUs, Train picks NCCL and each worker its own device."""
    from ray.train import ScalingConfig

    resources = {"CPU": cpus_per_worker}
    if gpus_per_worker:
        resources["GPU"] = gpus_per_worker
    return ScalingConfig(num_workers=workers, use_gpu=bool(gpus_per_worker), resources_per_worker=resources)


def train_run_name(tune_run_name: str, trial_id: str) -> str:
    # Stable per trial, so a retried or resumed trial finds its Train run (and checkpoint) again.
    return f"{tune_run_name}-{trial_id}"


def _trial_run(config: dict[str, Any], static: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(the trial's Train run name, its loop config), or None when the trial had already ended.

    The driver may stop after a trial ended but before Tune saved that; the resumed search then
    restarts it. It reports the result it ended with instead of training again.
    """
    from ray import tune

    from tuning.resume import read_final_result

    run_name = train_run_name(static["tune_run_name"], tune.get_context().get_trial_id())
    final = read_final_result(static["train_storage_path"], run_name)
    if final is not None:
        tune.report({**final, "replayed_final_result": 1})
        return None
    return run_name, {"trainer": {**static["trainer_base"], **config}, "data": static["data_ref"],
                      "data_fingerprint": static["data_fingerprint"]}


def fit_trial(config: dict[str, Any], static: dict[str, Any]) -> None:
    """The Tune trainable of the ray-train runner: one trial = one TorchTrainer fit with this config."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = _trial_run(config, static)
    if trial is None:
        return
    run_name, loop_config = trial
    trainer = TorchTrainer(
        static["train_fn_per_worker"],
        train_loop_config=loop_config,
        scaling_config=scaling_config(static["workers_per_trial"], static["cpus_per_worker"], static["gpus_per_worker"]),
        run_config=RunConfig(
            name=run_name,
            storage_path=static["train_storage_path"],
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            # A lost worker or node restarts the worker group, which resumes from the trial's
            # last checkpoint (see the trainers' get_checkpoint), not from epoch 0. So does a
            # trial the search resumes after its driver stopped.
            failure_config=FailureConfig(max_failures=static["retries_per_trial"]),
        ),
    )
    trainer.fit()


def train_in_process(config: dict[str, Any], static: dict[str, Any]) -> None:
    """The Tune trainable of the in-process runner: this trial is its one worker.

    Checkpoints go where the trial's Train run would keep them (STORAGE/train/<run name>), so
    a retried trial, or one a resumed search starts again, goes on from its last checkpoint.
    """
    from ray import tune

    from trainers.epoch_loop import InProcessSession

    trial = _trial_run(config, static)
    if trial is None:
        return
    run_name, loop_config = trial
    session = InProcessSession(storage_join(static["train_storage_path"], run_name), relay=tune.report,
                               cpus=static["cpus_per_worker"])
    static["train_fn_per_worker"](loop_config, session=session)


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


def start_ray(address: str | None, num_cpus: int | None = None, verbose: bool = True) -> bool:
    """Connect to a cluster, or start a local one; True when this process started it.

    Not verbose, Ray leaves the workers' output in its session log folder and its own records to
    the handlers the caller set up (tuning/console.py), instead of printing both.
    """
    import ray

    if ray.is_initialized():
        return False
    quiet = {} if verbose else {"log_to_driver": False, "configure_logging": False}
    if address:
        ray.init(address=address, **{"log_to_driver": True, **quiet})
        return False
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    # The dashboard must run: without it Train cannot confirm a finished trial's controller
    # is gone and leaks its placement group, which starves the next trial.
    # Workers import the project by name; PYTHONPATH covers a clone that is not pip-installed.
    project_dir = str(Path(__file__).resolve().parent.parent)
    python_path = os.pathsep.join(p for p in (project_dir, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": python_path, **LOCAL_RAY_ENV}}, **quiet)
    return True


def check_address(address: str, timeout_s: float = 5.0) -> str | None:
    """Why `--address` cannot be joined, or None when a Ray head answers there.

    'auto' must find a running cluster on this machine (or RAY_ADDRESS); host:port must accept
    a TCP connection within timeout_s. Ray client addresses (ray://) are left to ray.init.
    """
    import socket

    from ray._private.services import canonicalize_bootstrap_address

    if address.startswith("ray://"):
        return None
    try:
        bootstrap = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as error:
        return f"no running Ray cluster found ({str(error).splitlines()[0]})"
    if bootstrap is None:
        return "no running Ray cluster found"
    host, _, port = bootstrap.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except (OSError, ValueError) as error:
        return f"cannot reach the Ray head at {bootstrap} ({error})"


def infeasible_request(workers: int, cpus_per_worker: float, gpus_per_worker: float,
                       autoscaling_config: Path = AUTOSCALING_CONFIG) -> str | None:
    """Why no node of the connected cluster can ever host one Train worker, or None.

    Judged against the live nodes plus, on a cluster `ray up` started, every node type its
    autoscaler may launch. A node type whose resources are only known at launch could fit
    anything, so then nothing is refused.
    """
    import ray
    import yaml

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    config_file = autoscaling_config.expanduser()
    if config_file.is_file():
        for node_type in (yaml.safe_load(config_file.read_text()) or {}).get("available_node_types", {}).values():
            if not node_type.get("resources"):
                return None
            nodes.append(node_type["resources"])
    wanted = {"CPU": cpus_per_worker, "GPU": gpus_per_worker}
    for resource, amount in wanted.items():
        if amount and not any(node.get(resource, 0) >= amount for node in nodes):
            largest = max((node.get(resource, 0) for node in nodes), default=0)
            flag = "--cpus-per-worker" if resource == "CPU" else "--gpus-per-worker"
            return (f"{flag} {amount:g}: no node of this Ray cluster has {amount:g} {resource}"
                    f"{'s' if amount != 1 else ''} (the most any node has is {largest:g}), so the "
                    f"trials would wait forever")
    return None


def wait_for_placement_groups(timeout_s: float = PLACEMENT_GROUP_WAIT_S) -> int:
    """Train removes a trial's placement group asynchronously; wait until none is left.

    Returns how many are still not removed at the deadline.
    """
    from ray.util import placement_group_table

    deadline = time.time() + timeout_s
    while True:
        alive = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        if not alive or time.time() > deadline:
            return len(alive)
        time.sleep(0.5)


def default_concurrency(request: SearchRequest) -> int:
    """As many trials at once as the cluster's nodes hold right now, counted in whole workers per
    node: a worker cannot span nodes, so 4 CPUs on nodes of 1, 1 and 2 hold one 2-CPU worker,
    not two. A trial beyond that waits for its worker group, times out after a minute and
    retries; in a test here such a retry left a placement group behind that starved the next
    trial for good."""
    import ray

    def fits(resources: dict[str, float], needed: float, resource: str) -> int:
        return int(resources.get(resource, 0) // needed) if needed else 10**6

    workers = sum(min(fits(node["Resources"], request.cpus_per_worker, "CPU"),
                      fits(node["Resources"], request.gpus_per_worker, "GPU"))
                  for node in ray.nodes() if node.get("Alive"))
    return max(1, workers // request.workers_per_trial)


def rerun_cpu_share(request: SearchRequest, lanes: int, reruns: int) -> int:
    """How many lanes' CPUs each full-budget rerun trains with.

    Fewer reruns than lanes would leave lanes idle for a rerun's whole length (on the laptop, one
    core for ~8 minutes), and two threads train the laptop planner 1.8x faster than one. So an
    in-process CPU rerun takes the CPUs of the lanes no rerun uses, up to what one node holds
    (a trial cannot span nodes). GPU trials and Train worker groups keep their size: their
    speed is the GPUs'. The share depends on counts alone, so a seeded search repeats it.
    """
    import ray

    if request.trial_runner != "in-process" or request.gpus_per_worker or reruns >= lanes:
        return 1
    largest_node = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)
    return max(1, min(lanes // reruns, int(largest_node // request.cpus_per_worker)))


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
    from ray import tune

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
    max_concurrent = request.max_concurrent or default_concurrency(request)
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
    in_process = request.trial_runner == "in-process"
    return tune.Tuner(
        trainable,
        param_space=_tune_space(request.param_space),
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=request.num_samples,
            max_concurrent_trials=max_concurrent,
            # In-process, the next trial reuses a finished trial's process and its imports. An
            # ASHA-stopped trial is waiting inside its report, and exits there when Tune resets
            # the process. With Ray Train it stays off: a stopped trial's TorchTrainer would go
            # on running in the reused process (its fit() does not end within the reset timeout).
            reuse_actors=in_process, time_budget_s=request.time_budget_s,
        ),
        run_config=tune.RunConfig(
            name=request.tune_run_name, storage_path=storage_join(request.storage_path, "tune"),
            callbacks=callbacks, stop=budget.stopper,
            failure_config=tune.FailureConfig(max_failures=trial_restarts(request)),
            verbose=1 if request.verbose else 0,
        ),
    )


def trial_restarts(request: SearchRequest) -> int:
    """How often Tune restarts a failed trial. In-process, the trial is its worker: the worker
    restarts Train would make (--retries-per-trial) become trial restarts, from the checkpoint."""
    if request.trial_runner == "in-process":
        return request.trial_max_failures + request.retries_per_trial
    return request.trial_max_failures


def trial_trainable(request: SearchRequest, static: dict[str, Any]):
    """The Tune trainable for the search's runner, with its resources (static's CPUs per worker)."""
    from ray import tune

    if request.trial_runner == "in-process":
        resources = {"cpu": static["cpus_per_worker"]}
        return tune.with_resources(tune.with_parameters(train_in_process, static=static), resources)
    return tune.with_resources(tune.with_parameters(fit_trial, static=static), TRIAL_RESOURCES)


def _static(request: SearchRequest) -> dict[str, Any]:
    """What every trial of the search shares, shipped once."""
    import ray

    from trainers.registry import MODELS

    return {
        # The function itself, pickled by reference: a trial imports only its own trainer
        # module, not every model's (scikit-learn, PEFT) through the registry.
        "train_fn_per_worker": MODELS[request.model].train_fn_per_worker,
        "tune_run_name": request.tune_run_name,
        "trainer_base": request.trainer_base,
        "data_ref": ray.put(request.data),
        "data_fingerprint": request.data_fingerprint,
        "workers_per_trial": request.workers_per_trial,
        "cpus_per_worker": request.cpus_per_worker,
        "gpus_per_worker": request.gpus_per_worker,
        "train_storage_path": storage_join(request.storage_path, "train"),
        "retries_per_trial": request.retries_per_trial,
    }


def run_search(request: SearchRequest, callbacks: list[Any], failed_before_resume: int = 0) -> FailureBudget:
    """Run the search on the connected Ray cluster, with `callbacks` (the MLflow tracker's) on
    Tune's trial events; returns the failure count and budget."""
    from tuning.resume import final_result_recorder

    static = _static(request)
    budget = FailureBudget(request.max_failed_trials, failed=failed_before_resume)
    trainable = trial_trainable(request, static)
    callbacks = [*callbacks, budget.callback,
                 final_result_recorder(request.tune_run_name, static["train_storage_path"])]
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
    try:
        tuner.fit()
    finally:
        if previous is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous


def run_full_budget(request: SearchRequest, configs: list[dict[str, Any]], callbacks: list[Any]) -> dict[str, int]:
    """Train each configuration to its last epoch, with no early stopping and no time budget, as
    trials of a Tune run of their own (STORAGE/tune/<run>-full-budget-<time>) with the search's
    trainable and callbacks. Returns {trial id: index in configs}."""
    from ray import tune

    from tuning.ordered_search import FixedConfigs
    from tuning.resume import final_result_recorder

    lanes = request.max_concurrent or default_concurrency(request)
    static = {**_static(request), "tune_run_name": f"{request.tune_run_name}-full-budget-{time.strftime('%H%M%S')}",
              "cpus_per_worker": request.cpus_per_worker * rerun_cpu_share(request, lanes, len(configs))}
    name = static["tune_run_name"]
    fixed = FixedConfigs(configs)
    tuner = tune.Tuner(
        trial_trainable(request, static),
        param_space=_tune_space(request.param_space),
        tune_config=tune.TuneConfig(search_alg=fixed, num_samples=len(configs), max_concurrent_trials=lanes,
                                    reuse_actors=request.trial_runner == "in-process"),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_join(request.storage_path, "tune"),
            callbacks=[*callbacks, final_result_recorder(name, static["train_storage_path"])],
            failure_config=tune.FailureConfig(max_failures=trial_restarts(request)),
            verbose=1 if request.verbose else 0),
    )
    _fit(tuner, request.verbose)
    return dict(fixed.assigned)


def storage_join(storage: str, *parts: str) -> str:
    """A path under --storage; string joining, because Path() would turn s3://b into s3:/b."""
    return "/".join([storage.rstrip("/"), *parts])


def tune_run_path(request: SearchRequest) -> str:
    """Where Tune keeps this search's state: STORAGE/tune/<run name>."""
    return storage_join(request.storage_path, "tune", request.tune_run_name)
