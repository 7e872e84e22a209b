"""The closing table: the closest trials beside the paper's figures, and the Pareto front."""

from __future__ import annotations

from tuning.tracking import TrialRecord

RECALL, COUNT = "tool_recall", "tool_count"


def pareto_front(records: list[TrialRecord]) -> list[TrialRecord]:
    """Trials no other trial beats on both recall (higher) and tools retrieved (lower)."""
    points = [(r, r.best[RECALL], r.best[COUNT]) for r in records if r.best]
    front = []
    for record, recall, count in points:
        dominated = any(
            (other_recall >= recall and other_count <= count) and (other_recall > recall or other_count < count)
            for _, other_recall, other_count in points
        )
        if not dominated:
            front.append(record)
    return sorted(front, key=lambda r: -r.best[RECALL])


def _inside(value: float, low: float, high: float) -> str:
    return "yes" if low <= value <= high else "no"


def format_table(records: list[TrialRecord], targets: dict[str, dict[str, float]], title: str) -> str:
    """One line per trial: searched params, best-epoch figures with 95% CIs, and whether the
    paper's figure lies inside each interval."""
    recall_target, count_target = targets[RECALL]["value"], targets[COUNT]["value"]
    lines = [
        title,
        f"  paper: tool_recall {recall_target:.3f}, tool_count {count_target:.2f}",
        f"  {'rank':>4}  {'trial':<11} {'distance':>8}  {'recall [95% CI]':<22} {'paper in':>8}  "
        f"{'count [95% CI]':<22} {'paper in':>8}  {'epoch':>5}  params",
    ]
    for rank, record in enumerate(records, start=1):
        best = record.best
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(record.params.items()))
        recall_ci = f"{best[RECALL]:.3f} [{best['tool_recall_ci_low']:.3f}, {best['tool_recall_ci_high']:.3f}]"
        count_ci = f"{best[COUNT]:.2f} [{best['tool_count_ci_low']:.2f}, {best['tool_count_ci_high']:.2f}]"
        lines.append(
            f"  {rank:>4}  {record.trial_id:<11} {best['paper_distance']:>8.2f}  {recall_ci:<22} "
            f"{_inside(recall_target, best['tool_recall_ci_low'], best['tool_recall_ci_high']):>8}  {count_ci:<22} "
            f"{_inside(count_target, best['tool_count_ci_low'], best['tool_count_ci_high']):>8}  "
            f"{int(best['epoch']):>5}  {params}"
        )
    return "\n".join(lines)
