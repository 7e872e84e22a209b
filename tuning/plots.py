"""Figures that summarise one finished search: how it converged, which settings mattered, and
how the trials stand against the paper's figures.

Each is a bare `Figure` on its own Agg canvas, never made through pyplot: no window can open, and
a caller's backend is never switched (`matplotlib.use` would close the caller's pyplot figures).
`plt.close(fig)` still accepts them."""

from __future__ import annotations

import io
import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from trainers import metric_names as names
from trainers import selection
from trainers.stats import target_value
from trainers.registry import ModelSpec
from tuning.config import TEMPLATE_KEY, describe_target
from tuning.trial_records import TrialRecord, best_per_template, pareto_front

# The searched setting that trades recall against tools retrieved, drawn against both.
POS_WEIGHT = "pos_weight"
EPOCH_CURVES = 5
# fANOVA fits a forest to the trials: with fewer, every importance is noise.
MIN_IMPORTANCE_TRIALS = 3
DPI = 110
TRIAL_LABEL = "trial (best epoch)"
STOPPED_LABEL = "stopped early (ASHA)"
CLOSEST_LABEL = "closest to the paper"
RUNNING_BEST_LABEL = "best so far"
FRONT_LABEL = "Pareto front"
VALIDATION_LABEL = "validation (best trial)"
TEST_LABEL = "test (same trial)"
DISTANCE_LABEL = "validation paper distance"


@dataclass(frozen=True)
class PlotInput:
    records: list[TrialRecord]  # every trial, in start order; those that failed have no best
    ranked: list[TrialRecord]  # those with a best result, closest to the paper on validation first
    spec: ModelSpec
    paper: dict[str, dict[str, Any]]  # spec.paper_figures(...): {headline figure: target}
    searched: dict[str, dict[str, Any]]  # {setting: {"type", "low", "high", "values"}}
    objective: str  # "distance" or "pareto"
    histories: dict[str, dict[str, list[tuple[int, float]]]]  # trial_id -> figure -> [(epoch, validation value)]
    max_epochs: int


def search_figures(data: PlotInput) -> dict[str, Figure]:
    """name (file stem, e.g. "optimisation_history") -> figure; figures that cannot be drawn
    (too few trials, nothing searched) are left out, never drawn empty."""
    builders: dict[str, Callable[[PlotInput], Figure | None]] = {
        "optimisation_history": _history, "param_importances": _importances, "slices": _slices,
        POS_WEIGHT: _pos_weight, "pareto": _pareto, "templates": _templates, "epoch_curves": _epoch_curves,
    }
    figures = {name: fig for name, build in builders.items() if (fig := build(data)) is not None}
    for fig in figures.values():
        fig.tight_layout()
    return figures


def figure_png(fig: Figure, dpi: int = DPI) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _figure(ncols: int = 1, nrows: int = 1, width: float = 7.0, height: float = 4.5,
            **shared: Any) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(nrows, ncols, squeeze=False, **shared).flat)


def _distance(record: TrialRecord) -> float:
    return record.best[names.PAPER_DISTANCE]


def _distance_scale(ax: Axes, values: list[float]) -> None:
    # A few diverged trials sit orders of magnitude above the rest and would flatten them.
    if values and min(values) > 0 and max(values) / min(values) > 30:
        ax.set_yscale("log")


def _scatter_trials(ax: Axes, points: list[tuple[TrialRecord, float, float]]) -> None:
    """Trials ASHA stopped are drawn apart: their figures come from fewer epochs."""
    for early, marker, label in ((False, "o", TRIAL_LABEL), (True, "x", STOPPED_LABEL)):
        chosen = [(x, y) for record, x, y in points if record.stopped_early == early]
        if chosen:
            ax.scatter(*zip(*chosen), marker=marker, color="C1" if early else "C0", label=label, zorder=2)


def _ring(ax: Axes, x: float, y: float) -> None:
    ax.scatter([x], [y], s=180, facecolors="none", edgecolors="C3", linewidths=2, label=CLOSEST_LABEL, zorder=3)


def _errors(figures: list[dict[str, float]], metric: str) -> list[list[float]] | None:
    low, high = names.interval(metric)
    if not all(low in f and high in f for f in figures):
        return None
    return [[max(f[metric] - f[low], 0.0) for f in figures], [max(f[high] - f[metric], 0.0) for f in figures]]


def _paper_band(ax: Axes, data: PlotInput, metric: str, vertical: bool = False) -> float | None:
    """Draws the paper's figure ± its tolerance and returns where it lies. A target relative to a
    figure of the data is placed with the trials' mean of that figure, as their distances were
    measured from it."""
    target = data.paper.get(metric)
    if target is None:
        return None
    measured, label = {}, f"paper {metric} {describe_target(metric, target)} ± {target['tolerance']:g}"
    if relative_to := target.get("relative_to"):
        values = [r.best[relative_to] for r in data.ranked if r.best and relative_to in r.best]
        if not values:
            return None
        measured[relative_to] = sum(values) / len(values)
        label += f" (trials' mean {relative_to} {measured[relative_to]:.2f})"
    value, tolerance = target_value(metric, target, measured), target["tolerance"]
    line, span = (ax.axvline, ax.axvspan) if vertical else (ax.axhline, ax.axhspan)
    line(value, color="C2", linestyle="--", label=label)
    span(value - tolerance, value + tolerance, color="C2", alpha=0.15)
    return value


def _history(data: PlotInput) -> Figure | None:
    records = sorted(data.records, key=lambda r: r.started)
    scored = [(number, r) for number, r in enumerate(records, start=1) if r.best]
    if not scored:
        return None
    fig, (ax,) = _figure()
    _scatter_trials(ax, [(r, number, _distance(r)) for number, r in scored])
    running = list(itertools.accumulate((_distance(r) for _, r in scored), min))
    ax.step([number for number, _ in scored], running, where="post", color="black", label=RUNNING_BEST_LABEL)
    missing = len(records) - len(scored)
    ax.set(xlabel="trial (in start order)", ylabel=DISTANCE_LABEL,
           title="Best validation paper distance per trial (lower is closer to the paper)"
           + (f"\n{missing} trial(s) without a result not shown" if missing else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _distance_scale(ax, [_distance(r) for _, r in scored])
    ax.legend(fontsize="small")
    return fig


def _distribution(spec: dict[str, Any], observed: list[Any]):
    """Optuna's distribution for a searched setting, widened to every value the trials hold so
    that a value read back from MLflow (a rounded float, an int for a float) is never refused."""
    from optuna import distributions

    if spec["type"] == "choice":
        return distributions.CategoricalDistribution(list(dict.fromkeys([*spec["values"], *observed])))
    low, high = min(spec["low"], *observed), max(spec["high"], *observed)
    if spec["type"] == "randint":  # the search samples low..high inclusive
        return distributions.IntDistribution(int(low), int(high))
    return distributions.FloatDistribution(float(low), float(high), log=spec["type"] == "loguniform")


def _importances(data: PlotInput) -> Figure | None:
    # A distance on the per-epoch subset is not comparable with one on the whole split.
    trials = [r for r in data.ranked if r.best and selection.scored_on_whole_validation(r.best)
              and math.isfinite(_distance(r)) and all(key in r.params for key in data.searched)]
    varying = [key for key in data.searched if len({repr(r.params[key]) for r in trials}) > 1]
    if len(trials) < MIN_IMPORTANCE_TRIALS or not varying or len({_distance(r) for r in trials}) < 2:
        return None
    import optuna
    from optuna.importance import FanovaImportanceEvaluator

    distributions = {key: _distribution(spec, [r.params[key] for r in trials]) for key, spec in data.searched.items()}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" lines in the search's log
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            study = optuna.create_study(direction="minimize")
            for r in trials:
                study.add_trial(optuna.trial.create_trial(params={key: r.params[key] for key in data.searched},
                                                          distributions=distributions, value=_distance(r)))
            # Seeded: the forest is random, and a report drawn twice should show the same bars.
            importances = optuna.importance.get_param_importances(
                study, evaluator=FanovaImportanceEvaluator(seed=0), params=varying)
        except RuntimeError:  # every tree drew equal distances: nothing to attribute
            return None
        finally:
            optuna.logging.set_verbosity(verbosity)
    fig, (ax,) = _figure()
    ordered = sorted(importances.items(), key=lambda item: item[1])
    ax.barh([key for key, _ in ordered], [value for _, value in ordered], color="C0")
    ax.set(xlabel="share of the variance of validation paper distance (fANOVA)",
           title=f"Which searched settings mattered\n({len(trials)} trials scored on the whole validation split)")
    return fig


def _slices(data: PlotInput) -> Figure | None:
    trials = [r for r in data.ranked if r.best]
    if len(trials) < 2 or not data.searched:
        return None
    keys = list(data.searched)
    ncols, nrows = min(len(keys), 3), math.ceil(len(keys) / 3)
    fig, axes = _figure(ncols, nrows, width=4.2 * ncols, height=3.6 * nrows, sharey=True)
    for ax, key in zip(axes, keys):
        spec, present = data.searched[key], [r for r in trials if key in r.params]
        if spec["type"] == "choice":  # categories as positions, in the order the space lists them
            categories = list(dict.fromkeys([*spec["values"], *(r.params[key] for r in present)]))
            ax.set_xticks(range(len(categories)), [str(c) for c in categories])
            position: Callable[[Any], float] = categories.index
        else:
            position = float
            if spec["type"] == "loguniform":
                ax.set_xscale("log")
        _scatter_trials(ax, [(r, position(r.params[key]), _distance(r)) for r in present])
        if key in trials[0].params:
            _ring(ax, position(trials[0].params[key]), _distance(trials[0]))
        ax.set_xlabel(key)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel(DISTANCE_LABEL)
    _distance_scale(axes[0], [_distance(r) for r in trials])
    axes[0].legend(fontsize="small")
    fig.suptitle("Best validation paper distance by searched setting (lower is closer to the paper)")
    return fig


def _pos_weight(data: PlotInput) -> Figure | None:
    if POS_WEIGHT not in data.searched or tuple(data.spec.headline) != (names.TOOL_RECALL, names.TOOL_COUNT):
        return None
    trials = [r for r in data.ranked if r.best and POS_WEIGHT in r.params]
    if not trials:
        return None
    fig, axes = _figure(2, width=12.0, sharex=True)
    # Both figures rise with pos_weight: recall saturates near the top (lower right stays free),
    # tools retrieved climb from the bottom left (upper left stays free).
    for ax, metric, corner in zip(axes, data.spec.headline, ("lower right", "upper left")):
        shown = [r for r in trials if metric in r.best]
        ax.errorbar([float(r.params[POS_WEIGHT]) for r in shown], [r.best[metric] for r in shown],
                    yerr=_errors([r.best for r in shown], metric), fmt="o", capsize=3, label=TRIAL_LABEL)
        if metric in trials[0].best:
            _ring(ax, float(trials[0].params[POS_WEIGHT]), trials[0].best[metric])
        _paper_band(ax, data, metric)
        ax.set(xscale="log", xlabel=POS_WEIGHT, ylabel=f"validation {metric} (95% CI)")
        ax.legend(fontsize="small", loc=corner)
    fig.suptitle(f"{POS_WEIGHT} against validation {' and '.join(data.spec.headline)} (each trial's best epoch)")
    return fig


def _pareto(data: PlotInput) -> Figure | None:
    if data.objective != "pareto" or not data.spec.pareto:
        return None
    up, down = data.spec.pareto
    trials = [r for r in data.ranked if r.best and up in r.best and down in r.best]
    if not trials:
        return None
    front = sorted(pareto_front(trials, data.spec.pareto), key=lambda r: r.best[down])
    fig, (ax,) = _figure()
    ax.scatter([r.best[down] for r in trials], [r.best[up] for r in trials], color="C0", alpha=0.5, label=TRIAL_LABEL)
    ax.plot([r.best[down] for r in front], [r.best[up] for r in front], "o-", color="C3", label=FRONT_LABEL)
    across, along = _paper_band(ax, data, down, vertical=True), _paper_band(ax, data, up)
    if across is not None and along is not None:
        ax.scatter([across], [along], marker="*", s=250, color="C2", zorder=3, label="paper")
    ax.set(xlabel=f"validation {down} (lower is better)", ylabel=f"validation {up} (higher is better)",
           title=f"Validation {up} against {down}: {len(front)} of {len(trials)} trials on the front")
    ax.legend(fontsize="small")
    return fig


def _templates(data: PlotInput) -> Figure | None:
    if TEMPLATE_KEY not in data.searched:
        return None
    metric = data.spec.headline[0]
    summary = best_per_template(data.ranked, metric)
    if not summary:
        return None
    templates = list(dict.fromkeys([*(data.searched[TEMPLATE_KEY].get("values") or []), *summary]))
    by_id = {r.trial_id: r for r in data.ranked}
    fig, (ax,) = _figure()
    validation, test = [], []
    for x, template in enumerate(templates):
        entry = summary.get(template)
        if entry is None or entry["best"] is None:
            # Its trials were all stopped early (or none ran): no bar would be comparable.
            ax.text(x, 0.5, "stopped early" if entry else "no result", transform=ax.get_xaxis_transform(),
                    ha="center", va="center", color="gray")
            continue
        validation.append((x - 0.1, by_id[entry["trial_id"]].best))
        if entry["test"] and metric in entry["test"]:
            test.append((x + 0.1, entry["test"]))
    for points, label, color in ((validation, VALIDATION_LABEL, "C0"), (test, TEST_LABEL, "C1")):
        if points:
            ax.errorbar([x for x, _ in points], [f[metric] for _, f in points],
                        yerr=_errors([f for _, f in points], metric), fmt="o", capsize=4, color=color, label=label)
    _paper_band(ax, data, metric)
    ax.set_xticks(range(len(templates)), templates)
    ax.set(xlim=(-0.5, len(templates) - 0.5), xlabel=TEMPLATE_KEY, ylabel=f"{metric} (95% CI)",
           title=f"Best {metric} per prompt template\n"
                 "(chosen on the whole validation split; its test figure beside it)")
    ax.legend(fontsize="small")
    return fig


def _epoch_curves(data: PlotInput) -> Figure | None:
    curves = [(r.trial_id, sorted(data.histories.get(r.trial_id, {}).get(names.PAPER_DISTANCE) or []))
              for r in data.ranked]
    curves = [(trial_id, points) for trial_id, points in curves if points][:EPOCH_CURVES]
    if not curves:
        return None
    fig, (ax,) = _figure()
    for trial_id, points in curves:
        ax.plot(*zip(*points), marker="o", label=trial_id)
    epochs = [epoch for _, points in curves for epoch, _ in points]
    ax.set_xlim(min(*epochs, 1) - 0.5, max(*epochs, data.max_epochs) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel=DISTANCE_LABEL,
           title=f"Validation paper distance per epoch, {len(curves)} closest trials (lower is closer)")
    _distance_scale(ax, [value for _, points in curves for _, value in points])
    ax.legend(title="trial", fontsize="small")
    return fig
