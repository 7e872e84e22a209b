"""What a search knows of the Ray Job that runs it (tuning/jobs.py submits it), and how it
stops when told to: a leaf the search's preparation and execution both read."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
# Set in a submitted search's environment: the job's id (the parent run's `ray_job_id` tag) and
# the commit it was submitted from (the job's working directory has no .git).
JOB_ID_ENV, GIT_COMMIT_ENV = "TINYAGENT_RAY_JOB_ID", "TINYAGENT_GIT_COMMIT"
# The parent-run tag holding the job that drives (or last drove) the search.
JOB_ID_TAG = "ray_job_id"


def job_tags() -> dict[str, str]:
    """Tags a submitted search puts on its parent run (none outside a job)."""
    job_id = os.environ.get(JOB_ID_ENV)
    return {JOB_ID_TAG: job_id} if job_id else {}


def git_commit() -> str:
    """The project's commit: the submitter's, inside a job; else this clone's."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class SearchStopped(KeyboardInterrupt):
    """The search was told to stop (SIGTERM: `ray job stop`); ends it as an interrupted search."""


class StopRequest:
    """SIGTERM, turned into a clean stop. While Tune runs, it asks Tune to stop (SIGUSR1: Tune
    saves its state and returns), and the search raises SearchStopped when Tune returns;
    outside Tune (reruns set up, test scoring) it raises SearchStopped at once."""

    def __init__(self):
        self.requested = False
        self.in_tune = False

    def install(self) -> None:
        if hasattr(signal, "SIGTERM"):
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.requested = True
        if self.in_tune and hasattr(signal, "SIGUSR1"):
            signal.raise_signal(signal.SIGUSR1)  # Tune's own graceful stop
            return
        raise SearchStopped("stopped by SIGTERM (ray job stop)")

    def check(self) -> None:
        if self.requested:
            raise SearchStopped("stopped by SIGTERM (ray job stop)")


STOP = StopRequest()
