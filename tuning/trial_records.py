"""What the driver knows of each trial, and the summaries over trials that the closing table,
the plots, the comparisons and the report all read. Pure: no MLflow, no Ray.

Which epoch is a trial's best is the trainer's decision (trainers/selection.py), read from its
reports; which trial is closest to the paper is `rank`, by `selection.trial_key`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from trainers import metric_names as names
from trainers import selection
from tuning.config import TEMPLATE_KEY


@dataclass
class TrialRecord:
    trial_id: str
    run_id: str
    params: dict[str, Any]
    started: float = field(default_factory=time.time)
    epochs: int = 0
    # The trial's best figures so far, as its trainer reported them (`take_result`).
    best: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    checkpoint_path: str | None = None
    status: str = "RUNNING"
    stopped_early: bool = False
    error: str | None = None
    resumed_from: str | None = None
    # Ended under an earlier driver: Tune may still replay its final result after a resume,
    # which must not touch the run again.
    ended_before_resume: bool = False
    interrupted: bool = False
    # The best checkpoint's figures on the test split (keys without TEST_PREFIX), once scored.
    test: dict[str, float] | None = None
    # Its per-example test outcomes (1 = success, in test-split order), once scored.
    test_outcomes: list[int] | None = None
    # For a full-budget rerun: the trial whose configuration it repeats, or "(no trial tried
    # this value)".
    rerun_of: str | None = None

    @property
    def objective(self) -> float:
        return self.best[names.PAPER_DISTANCE] if self.best else math.inf

    @property
    def best_epoch(self) -> int | None:
        """The epoch whose weights the best figures (and the checkpoint) hold."""
        if not self.best:
            return None
        return int(self.best.get(names.BEST_EPOCH, self.best[names.EPOCH]))

    @property
    def full_budget(self) -> bool:
        """Trained to its last epoch, not stopped early, and scored on the whole validation split."""
        return (self.status == "FINISHED" and not self.stopped_early and self.best is not None
                and selection.scored_on_whole_validation(self.best))

    def take_result(self, result: dict[str, Any]) -> None:
        """One epoch's report: the last seen, and the best when its trainer says it is
        (`best_so_far`). A report without the flag (a store written before it existed) is judged
        by the same rule the trainers use."""
        self.epochs, self.last = int(result[names.EPOCH]), dict(result)
        if names.BEST_SO_FAR in result:
            selected = result[names.BEST_SO_FAR] == 1.0
        else:
            selected = self.best is None or (selection.trial_key(result) <= selection.trial_key(self.best))
        if selected:
            self.best = dict(result)


def rank(records) -> list[TrialRecord]:
    """Trials with a result, closest to the paper on validation first (`selection.trial_key`);
    those scored on the whole validation split before those stopped while scored on a subset.
    The test split plays no part."""
    return sorted((r for r in records if r.best is not None), key=lambda r: selection.trial_key(r.best))


def pareto_front(records: list[TrialRecord], figures: tuple[str, str]) -> list[TrialRecord]:
    """Trials no other trial beats on both figures: the first higher (recall), the second lower
    (tools retrieved)."""
    up, down = figures
    points = [(r, r.best[up], r.best[down]) for r in records if r.best]
    front = []
    for record, recall, count in points:
        dominated = any(
            (other_recall >= recall and other_count <= count) and (other_recall > recall or other_count < count)
            for _, other_recall, other_count in points
        )
        if not dominated:
            front.append(record)
    return sorted(front, key=lambda r: -r.best[up])


def best_per_template(records: list[TrialRecord], metric: str) -> dict[str, dict[str, Any]]:
    """For each template tried: its best full-budget trial (closest to the paper on validation),
    that trial's validation `metric` and distance, its test figures, and how many trials tried
    the template. A trial stopped early does not compete: its figures are from fewer epochs (and
    for the planner from a validation subset)."""
    summary: dict[str, dict[str, Any]] = {}
    for record in rank(records):
        template = record.params.get(TEMPLATE_KEY)
        if template is None:
            continue
        entry = summary.setdefault(template, {"trials": 0, "best": None, "distance": math.inf, "trial_id": None,
                                              "test": None})
        entry["trials"] += 1
        if entry["trial_id"] is None and record.full_budget and metric in record.best:
            entry.update(best=record.best[metric], distance=record.objective, trial_id=record.trial_id,
                         test=record.test)
    return summary
