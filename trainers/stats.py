"""The statistics of the figures: ToolRAG's retrieval counts and rates as the paper's code
scores them, confidence intervals, paired comparisons, and the distance to the paper's figures.

ToolRAG counts are kept as sums (hits, tool counts, their squares, per-tool TP/FP/FN) so
that Train workers can all-reduce them and every worker reports the metrics of the whole
held-out set, not of its own shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainers import metric_names as names
from trainers.tools import NUM_TOOLS, TOOL_NAMES

Z_95 = 1.959963984540054


def wilson_interval(successes: float, total: float, z: float = Z_95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (statsmodels' `proportion_confint`, whose
    default method is not Wilson); (0, 1) when total is 0."""
    from statsmodels.stats.proportion import proportion_confint

    if total <= 0:
        return 0.0, 1.0
    p = successes / total
    low, high = proportion_confint(successes, total, alpha=2 * (1 - _normal_cdf(z)), method="wilson")
    # Rounding can put a bound a hair inside the estimate at p = 0 or 1; keep p inside.
    return max(0.0, min(float(low), p)), min(1.0, max(float(high), p))


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def paired_table(first: list[bool], second: list[bool]) -> tuple[int, int, int, int]:
    """The 2x2 table of two outcomes on the same examples: (both succeed, only the first, only
    the second, neither)."""
    if len(first) != len(second):
        raise ValueError(f"paired outcomes differ in length: {len(first)} and {len(second)}")
    both = sum(a and b for a, b in zip(first, second))
    first_only = sum(a and not b for a, b in zip(first, second))
    second_only = sum(b and not a for a, b in zip(first, second))
    return both, first_only, second_only, len(first) - both - first_only - second_only


def mcnemar_exact(first: list[bool], second: list[bool]) -> dict[str, float]:
    """Paired comparison of two per-example outcomes: the 2x2 table and McNemar's exact test
    (a two-sided binomial test on the discordant pairs, statsmodels' `mcnemar(exact=True)`).

    Keys: both, first_only, second_only, neither (counts) and p_value.
    """
    from statsmodels.stats.contingency_tables import mcnemar

    both, first_only, second_only, neither = paired_table(first, second)
    result = mcnemar([[both, first_only], [second_only, neither]], exact=True)
    return {"both": both, "first_only": first_only, "second_only": second_only, "neither": neither,
            "p_value": float(result.pvalue)}


def paired_difference_interval(first: list[bool], second: list[bool], z: float = Z_95) -> tuple[float, float, float]:
    """(difference of the two success rates, 95% interval) for outcomes on the same examples:
    Newcombe's hybrid score interval for paired proportions (his method 10, Statistics in
    Medicine 1998), built from each rate's Wilson interval and the outcomes' correlation. Unlike
    the Wald interval it stays inside [-1, 1] and is not symmetric where the rates are near 0
    or 1. With no discordant pair at all it is [0, 0], as the method's correlation term is 1."""
    both, first_only, second_only, neither = paired_table(first, second)
    n = len(first)
    if n == 0:
        return 0.0, -1.0, 1.0
    p1, p2 = (both + first_only) / n, (both + second_only) / n
    low1, high1 = wilson_interval(both + first_only, n, z)
    low2, high2 = wilson_interval(both + second_only, n, z)
    margins = (both + first_only) * (second_only + neither) * (both + second_only) * (first_only + neither)
    phi = (both * neither - first_only * second_only) / math.sqrt(margins) if margins else 0.0
    difference = p1 - p2
    below = math.sqrt(max((p1 - low1) ** 2 - 2 * phi * (p1 - low1) * (high2 - p2) + (high2 - p2) ** 2, 0.0))
    above = math.sqrt(max((high1 - p1) ** 2 - 2 * phi * (high1 - p1) * (p2 - low2) + (p2 - low2) ** 2, 0.0))
    return difference, max(-1.0, difference - below), min(1.0, difference + above)


def mean_interval(total: float, total_of_squares: float, count: float, z: float = Z_95) -> tuple[float, float]:
    """Normal-approximation 95% interval of a mean from its sums (n is in the thousands)."""
    if count <= 0:
        return 0.0, 0.0
    mean = total / count
    variance = max(total_of_squares / count - mean * mean, 0.0) * count / max(count - 1, 1)
    half = z * math.sqrt(variance / count)
    return mean - half, mean + half


def target_value(name: str, target: dict, measured: dict[str, float]) -> float:
    """The value `measured[name]` is compared with: the target's own, or, for a target with
    `relative_to`, that figure of the same examples plus the target's value (a tool count
    measured as tools retrieved beyond those the examples need)."""
    relative_to = target.get("relative_to")
    return target["value"] + (measured[relative_to] if relative_to else 0.0)


def paper_distance(measured: dict[str, float], targets: dict[str, dict]) -> float:
    """Euclidean distance to the paper's figures, each difference divided by its tolerance.

    `targets` maps a metric name to {"value", "tolerance"} (and optionally "relative_to", see
    `target_value`); a distance of 1 means "one tolerance away" in total, so values below 1
    are as close as the paper's own noise.
    """
    return math.sqrt(sum(((measured[name] - target_value(name, target, measured)) / target["tolerance"]) ** 2
                         for name, target in targets.items()))


@dataclass
class ToolRetrievalCounts:
    """Sums over examples; add them across workers, then call `metrics`."""

    sums: torch.Tensor  # [examples, recall_hits, tool_count, tool_count_sq, tp[16], fp[16], fn[16], gold_count]
    # When a list: each example's recall hit (1 = every needed tool retrieved), in update order.
    hits: list[int] | None = None

    @classmethod
    def zeros(cls) -> "ToolRetrievalCounts":
        return cls(torch.zeros(5 + 3 * NUM_TOOLS, dtype=torch.float64))

    def update(self, probabilities: torch.Tensor, labels: torch.Tensor, threshold: float) -> None:
        """probabilities and labels: [batch, 16]; a tool is retrieved above `threshold`."""
        predicted = (probabilities > threshold).to(torch.float64).cpu()
        gold = labels.to(torch.float64).cpu()
        missed = ((gold == 1) & (predicted == 0)).any(dim=1)
        per_example_count = predicted.sum(dim=1)
        self.sums[0] += predicted.shape[0]
        self.sums[1] += (~missed).sum()
        self.sums[2] += per_example_count.sum()
        self.sums[3] += (per_example_count**2).sum()
        self.sums[4 : 4 + NUM_TOOLS] += (predicted * gold).sum(dim=0)
        self.sums[4 + NUM_TOOLS : 4 + 2 * NUM_TOOLS] += (predicted * (1 - gold)).sum(dim=0)
        self.sums[4 + 2 * NUM_TOOLS : 4 + 3 * NUM_TOOLS] += ((1 - predicted) * gold).sum(dim=0)
        self.sums[4 + 3 * NUM_TOOLS] += gold.sum()
        if self.hits is not None:
            self.hits.extend(int(hit) for hit in (~missed).tolist())

    def metrics(self) -> dict[str, float]:
        n, hits, count_sum, count_sq = (float(v) for v in self.sums[:4])
        tp = self.sums[4 : 4 + NUM_TOOLS]
        fp = self.sums[4 + NUM_TOOLS : 4 + 2 * NUM_TOOLS]
        fn = self.sums[4 + 2 * NUM_TOOLS : 4 + 3 * NUM_TOOLS]
        gold_total = float(self.sums[4 + 3 * NUM_TOOLS])
        recall_low, recall_high = wilson_interval(hits, n)
        count_low, count_high = mean_interval(count_sum, count_sq, n)
        predicted_total = float(tp.sum() + fp.sum())
        result = {
            names.TOOL_RECALL: hits / n if n else 0.0,
            names.TOOL_RECALL + names.CI_LOW: recall_low,
            names.TOOL_RECALL + names.CI_HIGH: recall_high,
            names.TOOL_COUNT: count_sum / n if n else 0.0,
            names.TOOL_COUNT + names.CI_LOW: count_low,
            names.TOOL_COUNT + names.CI_HIGH: count_high,
            names.TOOL_PRECISION: float(tp.sum()) / predicted_total if predicted_total else 0.0,
            names.GOLD_TOOL_COUNT: gold_total / n if n else 0.0,
            names.EVAL_EXAMPLES: n,
        }
        for index, name in enumerate(TOOL_NAMES):
            support = float(tp[index] + fn[index])
            result[names.PER_TOOL_RECALL_PREFIX + name] = float(tp[index]) / support if support else 1.0
        return result
