"""Searches as Ray Jobs: submitted to a cluster's job API, supervised on its head, listed with
their MLflow figures, stopped cleanly.

- `submit` (`python tuning/search.py ... --submit`): checks the whole search here first, then
  sends the same command as a job, with the project as its working directory, and returns.
- `python -m tuning.jobs`: the searches a cluster ran or runs, beside what MLflow holds of
  each. Ray's own CLI does the rest: `ray job logs`, `ray job stop`.
Inside a job, `ray job stop` sends SIGTERM, and the search ends as a stopped search
(tuning/job_context.py): Tune's state saved, every MLflow run closed as KILLED with the reason,
so the same submission with `--resume` continues it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from tuning.config import UserError
from tuning.mlflow_store import redact_uri
from tuning.job_context import GIT_COMMIT_ENV, JOB_ID_ENV, JOB_ID_TAG, PROJECT_DIR, git_commit

# Job metadata marking a job as one of this project's searches, and what `list` reads back.
METADATA_KIND = "tinyagent-search"
# Where a submitted search keeps its results when --results-dir is not given: on the head,
# outside the job's working directory, which Ray unpacks into a temporary folder.
DEFAULT_JOB_RESULTS = "~/tinyagent-results"
# Never shipped with the working directory: environments, results, caches (Ray caps the upload).
EXCLUDES = [".git", ".venv", "venv", "results", "*.egg-info", "__pycache__", ".pytest_cache", "*.db"]
# `ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (Ray's default 3 s
# is too short to save Tune's state and close the MLflow runs).
STOP_WAIT_S = "60"
# How long a submission waits for a freshly started head's job agent.
AGENT_WAIT_S = 60.0


def dashboard_address(given: str | None) -> str:
    """The job API's address: --address, else RAY_ADDRESS, as `ray job submit` takes them."""
    address = given or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("--submit needs the cluster's dashboard: --address http://127.0.0.1:8265 (or RAY_ADDRESS)")
    if not address.startswith(("http://", "https://")):
        raise UserError(f"--address {address}: with --submit, the dashboard's URL, such as http://127.0.0.1:8265 "
                        "(ray job submit's address)")
    return address


def job_client(address: str):
    """A JobSubmissionClient for `address`, or one line saying why there is none."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise UserError(f"--address {address}: no Ray job API answers there ({str(error).splitlines()[0]})") from None


def job_arguments(argv: list[str]) -> list[str]:
    """The search's own flags for the job: the user's, without --submit and --address (the job
    joins the cluster it runs on), and with --results-dir given."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--submit":
            continue
        if arg == "--address":
            skip = True
            continue
        if arg.startswith("--address="):
            continue
        kept.append(arg)
    if not any(a == "--results-dir" or a.startswith("--results-dir=") for a in kept):
        kept += ["--results-dir", DEFAULT_JOB_RESULTS]
    return [*kept, "--address", "auto"]


def submission_id(parent_run_name: str, resume: bool) -> str:
    """The job's id, named after the search; a resumed search's job gets its own."""
    return parent_run_name + (f"-resume-{time.strftime('%H%M%S')}" if resume else "")


def submit(argv: list[str], address: str | None, parse_args) -> int:
    """Check the search as the job will run it (`parse_args`: the search's own parser), then
    submit it and return at once."""
    from tuning.prepare import prepare

    dashboard = dashboard_address(address)
    client = job_client(dashboard)
    arguments = job_arguments(argv)
    # Everything is checked here, with the job's own flags: the cluster's address only on the
    # cluster, where the job joins it.
    prepared = prepare(parse_args(arguments), check_cluster=False)
    job_id = submission_id(prepared.parent_run_name, "--resume" in arguments)
    entrypoint = shlex.join(["python3", "tuning/search.py", *arguments])
    metadata = {"kind": METADATA_KIND, "experiment": prepared.mlflow_experiment,
                "results_dir": _flag(arguments, "--results-dir") or DEFAULT_JOB_RESULTS,
                # Never credentials: a URI's user:password@ and query values are dropped.
                "tracking_uri": redact_uri(_flag(arguments, "--tracking-uri") or ""),
                "num_samples": str(prepared.request.num_samples)}
    env_vars = {JOB_ID_ENV: job_id, GIT_COMMIT_ENV: git_commit(), "RAY_JOB_STOP_WAIT_TIME_S": STOP_WAIT_S}
    runtime_env = {"working_dir": str(PROJECT_DIR), "excludes": EXCLUDES, "env_vars": env_vars}
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=job_id, metadata=metadata, runtime_env=runtime_env)
            break
        except RuntimeError as error:
            # A head that has just started answers before its job agent is up.
            if "No available agent" not in str(error) or time.time() > deadline:
                raise UserError(f"--address {dashboard}: the job API refused the search ({str(error).splitlines()[0]})"
                                ) from None
            time.sleep(2)
    print(f"[job] submitted {job_id} to {dashboard} (results on the head: {metadata['results_dir']})")
    print(f"  follow it:  ray job logs --address {dashboard} --follow {job_id}")
    print(f"  stop it:    ray job stop --address {dashboard} {job_id}   (then resubmit with --resume to continue)")
    print(f"  all searches, with their MLflow figures and links: python -m tuning.jobs --address {dashboard}"
          + (f" --tracking-uri {metadata['tracking_uri']}" if metadata["tracking_uri"] else ""))
    return 0


def _flag(arguments: list[str], flag: str) -> str | None:
    for position, arg in enumerate(arguments):
        if arg == flag and position + 1 < len(arguments):
            return arguments[position + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


# ----- python -m tuning.jobs ----------------------------------------------------------------
def search_rows(client, tracking_uri: str | None) -> list[dict[str, Any]]:
    """One row per search job: its id, status, experiment, trials ended out of the total,
    closest so far and MLflow link."""
    from mlflow.tracking import MlflowClient

    from tuning.mlflow_store import (
        DEFAULT_UI, FINAL_PREFIX, PARENT_TAG, SEARCH_TAG, all_pages, default_tracking_uri, run_link,
    )
    from trainers import metric_names as names

    rows = []
    jobs = [job for job in client.list_jobs() if (job.metadata or {}).get("kind") == METADATA_KIND]
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        metadata = job.metadata
        uri = tracking_uri or metadata.get("tracking_uri") or default_tracking_uri(
            Path(metadata["results_dir"]).expanduser())
        row = {"job": job.submission_id, "status": str(job.status.value if hasattr(job.status, "value") else job.status),
               "experiment": metadata.get("experiment", ""), "trials": "-", "closest": "-", "link": "-"}
        try:
            store = MlflowClient(uri)
            experiment = store.get_experiment_by_name(row["experiment"])
            parents = ([] if experiment is None else
                       all_pages(store, [experiment.experiment_id],
                                 f"tags.{SEARCH_TAG} = 'parent' and tags.{JOB_ID_TAG} = '{job.submission_id}'"))
        except Exception as error:  # a store this machine cannot read: the job is still listed
            row["link"] = f"MLflow store not readable here ({type(error).__name__}); pass --tracking-uri"
            rows.append(row)
            continue
        if parents:
            parent = parents[0]
            trials = all_pages(store, [experiment.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
            ended = sum(run.info.status != "RUNNING" for run in trials)
            total = int(metadata.get("num_samples", len(trials)))
            total += sum("full_budget_for" in run.data.tags for run in trials)
            distances = [run.data.metrics[FINAL_PREFIX + names.PAPER_DISTANCE] for run in trials
                         if FINAL_PREFIX + names.PAPER_DISTANCE in run.data.metrics]
            row.update(trials=f"{ended}/{total}", closest=f"{min(distances):.3f}" if distances else "-",
                       link=run_link(DEFAULT_UI, experiment.experiment_id, parent.info.run_id))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """python -m tuning.jobs [--address URL] [--tracking-uri URI]: the searches submitted to a
    cluster, with their status and their MLflow figures."""
    parser = argparse.ArgumentParser(prog="python -m tuning.jobs", description=main.__doc__.split(":", 1)[1].strip())
    parser.add_argument("--address", help="the cluster's dashboard, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)")
    parser.add_argument("--tracking-uri", help="the MLflow store the searches write (default: each job's own, "
                                               "as it was submitted)")
    args = parser.parse_args(argv)
    try:
        client = job_client(dashboard_address(args.address))
        rows = search_rows(client, args.tracking_uri)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not rows:
        print("no search has been submitted to this cluster")
        return 0
    header = ("job", "status", "experiment", "trials", "closest", "link")
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in header[:-1]]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  link")
    for row in rows:
        print("  ".join(str(row[h]).ljust(w) for h, w in zip(header, widths)) + f"  {row['link']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
