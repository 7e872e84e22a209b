"""The one rule for "best" on validation, used wherever a choice is made:
- which epoch of a trial is its best: the trainer decides (`epoch_key`, `improves`), checkpoints
  that epoch, and says so in its report (BEST_SO_FAR, BEST_EPOCH); the tracker, the closing
  table, test scoring and the registry take the report's word and never decide again;
- which trial of a search (or of a store) is closest to the paper: `trial_key` over each
  trial's best figures;
- which figures are a trial's own: those scored on the whole validation split
  (`scored_on_whole_validation`); a planner's per-epoch subset only steers early stopping.
"""

from __future__ import annotations

from typing import Any

from trainers import metric_names as names


def scored_on_whole_validation(result: dict[str, Any]) -> bool:
    """Whether a result scores the whole validation split (every ToolRAG epoch and a planner
    trial's last report do; a planner's other epochs score a subset)."""
    return result.get(names.FULL_VALIDATION_SET, 1.0) == 1.0


def epoch_key(metrics: dict[str, Any]) -> tuple[float, float, float]:
    """Lower is better: the distance to the paper, then (ties are common while no plan succeeds)
    more right tool sets, then more plans that parse. ToolRAG reports neither tie-break."""
    return (float(metrics[names.PAPER_DISTANCE]), -float(metrics.get(names.TOOL_SET_ACCURACY, 0.0)),
            -float(metrics.get(names.PLAN_PARSE_RATE, 0.0)))


def improves(key: tuple[float, ...], best_key: tuple[float, ...] | None) -> bool:
    """Whether an epoch whose `epoch_key` is `key` replaces the best so far (None before the first).
    A full tie goes to the later epoch: it trained longer for the same figures."""
    return best_key is None or tuple(key) <= tuple(best_key)


def trial_key(best: dict[str, Any]) -> tuple[bool, float, float, float]:
    """Rank trials by their best figures, lower first: those scored on the whole validation split
    before those stopped while scored on a subset, then by `epoch_key`."""
    return (not scored_on_whole_validation(best), *epoch_key(best))
