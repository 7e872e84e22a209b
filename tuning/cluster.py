"""Ray's cluster plumbing: starting or joining Ray, what the cluster can hold, and its
placement groups. Also the one module that touches Ray's private APIs (tests/test_cluster.py
fails when Ray changes them): `bootstrap_address`, `dashboard_address`, `session_logs_dir`,
`tuner_run_config`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

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

PLACEMENT_GROUP_WAIT_S = 30.0

# Where `ray up` leaves the autoscaler's config on the head node.
AUTOSCALING_CONFIG = Path("~/ray_bootstrap_config.yaml")


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

    if address.startswith("ray://"):
        return None
    try:
        bootstrap = bootstrap_address(address)
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


def default_concurrency(*, workers_per_trial: int, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """As many trials at once as the cluster's nodes hold right now, counted in whole workers per
    node: a worker cannot span nodes, so 4 CPUs on nodes of 1, 1 and 2 hold one 2-CPU worker,
    not two. A trial beyond that waits for its worker group, times out after a minute and
    retries; in a test here such a retry left a placement group behind that starved the next
    trial for good."""
    import ray

    def fits(resources: dict[str, float], needed: float, resource: str) -> int:
        return int(resources.get(resource, 0) // needed) if needed else 10**6

    workers = sum(min(fits(node["Resources"], cpus_per_worker, "CPU"), fits(node["Resources"], gpus_per_worker, "GPU"))
                  for node in ray.nodes() if node.get("Alive"))
    return max(1, workers // workers_per_trial)


def rerun_cpu_share(*, trial_runner: str, cpus_per_worker: float, gpus_per_worker: float, lanes: int,
                    reruns: int) -> int:
    """How many lanes' CPUs each full-budget rerun trains with.

    Fewer reruns than lanes would leave lanes idle for a rerun's whole length (on the laptop, one
    core for ~8 minutes), and two threads train the laptop planner 1.8x faster than one. So an
    in-process CPU rerun takes the CPUs of the lanes no rerun uses, up to what one node holds
    (a trial cannot span nodes). GPU trials and Train worker groups keep their size: their
    speed is the GPUs'. The share depends on counts alone, so a seeded search repeats it.
    """
    import ray

    if trial_runner != "in-process" or gpus_per_worker or reruns >= lanes:
        return 1
    largest_node = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)
    return max(1, min(lanes // reruns, int(largest_node // cpus_per_worker)))



def bootstrap_address(address: str) -> str | None:
    """The GCS host:port that `address` ('auto', host:port) names, as ray.init would resolve it;
    raises ConnectionError or ValueError when it names nothing."""
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(address)


def dashboard_address() -> str | None:
    """host:port of the connected Ray's dashboard (None when it has none)."""
    import ray

    return ray._private.worker.get_dashboard_url() or None


def session_logs_dir() -> Path | None:
    """The log folder of the Ray this process started (every Ray process's output), or None when
    it joined a running cluster: that folder is on the head node."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    return Path(node.get_logs_dir_path()) if node is not None else None


def tuner_run_config(tuner) -> Any:
    """The RunConfig of a Tuner restored from its saved state: its callbacks and stoppers were
    pickled with the dead driver's objects and must be replaced."""
    return tuner._local_tuner.get_run_config()
