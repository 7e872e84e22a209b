"""Proposals and early stops that depend on results only, never on which trial finished first.

With two trials at once, Tune hands results to Optuna and ASHA in the order trials happen to
finish, so two runs of one seeded search drift apart after a few trials: Optuna's TPE sees a
different history when it proposes, and ASHA compares a trial against whichever trials had
reached its rung by then. Here both look at *settled* trials only:

- trials are numbered in the order they are proposed;
- proposal k is made once every trial numbered k - lag or lower has ended (lag = the number of
  trials at once), and Optuna is told those trials' results, in trial-number order, just
  before it is asked, so its history at each proposal is fixed;
- ASHA's rung decision for trial k compares it with the rung figures of trials numbered
  k - lag or lower only, which had all ended before k began.

The price is idle time: a lane whose trial ended waits when an older trial still runs. Both
figures are measured by `bench/seed_spread.py`. The rung rule is ASHA's (Li et al., 2020): at
rung r a trial goes on when its figure is no worse than the 1 - 1/reduction_factor quantile of
its peers' figures at r; with no peers yet it goes on.
"""

from __future__ import annotations

import math
import pickle
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from trainers import metric_names as names


class _PickledState(Searcher):
    """Tune's searcher checkpoint (for --resume): the whole state, restored into this object, so
    the scheduler holding it keeps its reference."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__dict__, handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))


def optuna_distributions(param_space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The project's search-space specs (tuning/config.py) as Optuna distributions."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    converted = {}
    for key, spec in param_space.items():
        kind = spec["type"]
        if kind == "loguniform":
            converted[key] = FloatDistribution(spec["low"], spec["high"], log=True)
        elif kind == "uniform":
            converted[key] = FloatDistribution(spec["low"], spec["high"])
        elif kind == "randint":
            converted[key] = IntDistribution(int(spec["low"]), int(spec["high"]))
        else:
            converted[key] = CategoricalDistribution(list(spec["values"]))
    return converted


def rung_epochs(grace_period: int, reduction_factor: int, max_epochs: int) -> list[int]:
    """The epochs at which ASHA decides: grace, grace x rf, ... below the last epoch."""
    rungs, epoch = [], grace_period
    while epoch < max_epochs:
        rungs.append(epoch)
        epoch *= reduction_factor
    return rungs


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method), without numpy."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


class OrderedSearch(_PickledState):
    """Optuna behind a Tune searcher whose history is the settled trials, in trial-number order.

    metric/mode: one name and "min"/"max", or lists for a multi-objective study. `rung_metric`
    (lower is better) is what the rung decisions of `OrderedASHA` compare.
    """

    def __init__(self, param_space: dict[str, dict[str, Any]], metric: str | list[str], mode: str | list[str],
                 sampler, *, lag: int, warm_start: list[dict[str, Any]] | None = None, rung_metric: str | None = None,
                 rungs: list[int] | None = None, reduction_factor: int = 2):
        import optuna

        super().__init__(metric=metric if isinstance(metric, str) else None,
                         mode=mode if isinstance(mode, str) else None)
        self.objectives = [metric] if isinstance(metric, str) else list(metric)
        modes = [mode] if isinstance(mode, str) else list(mode)
        self.distributions = optuna_distributions(param_space)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial told, in a search's log
        self.study = optuna.create_study(directions=["minimize" if m == "min" else "maximize" for m in modes],
                                         sampler=sampler)
        for point in warm_start or []:
            self.study.enqueue_trial(point)
        self.lag = max(1, lag)
        self.rung_metric = rung_metric
        self.rungs = list(rungs or [])
        self.reduction_factor = reduction_factor
        # trial id -> its number (proposal order) and its Optuna trial
        self.numbers: dict[str, int] = {}
        self.optuna_trials: dict[str, Any] = {}
        # number -> final result (None for an error), kept until Optuna is told, in order
        self.ended: dict[int, dict[str, Any] | None] = {}
        self.told = 0
        # rung epoch -> {trial number: rung figure}
        self.rung_figures: dict[int, dict[int, float]] = {epoch: {} for epoch in self.rungs}
        # (number, params) in proposal order: what two runs of one seed must agree on.
        self.proposals: list[tuple[int, dict[str, Any]]] = []

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # everything was given to the constructor

    # ----- proposals ------------------------------------------------------------------
    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        number = len(self.numbers)
        settled_up_to = number - self.lag
        if any(n not in self.ended for n in range(settled_up_to + 1)):
            return None  # an older trial still runs: asking now would depend on timing
        self._tell_up_to(settled_up_to)
        trial = self.study.ask(self.distributions)
        self.numbers[trial_id] = number
        self.optuna_trials[trial_id] = trial
        self.proposals.append((number, dict(trial.params)))
        return dict(trial.params)

    def _tell_up_to(self, last: int) -> None:
        from optuna.trial import TrialState

        by_number = {n: t for t, n in self.numbers.items()}
        while self.told <= last:
            trial_id = by_number[self.told]
            result = self.ended[self.told]
            trial = self.optuna_trials[trial_id]
            values = None if result is None else [result.get(m) for m in self.objectives]
            if values is None or any(v is None or not math.isfinite(v) for v in values):
                self.study.tell(trial, state=TrialState.FAIL)
            else:
                self.study.tell(trial, values if len(values) > 1 else values[0])
            self.told += 1

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        number = self.numbers.get(trial_id)
        if number is not None and number not in self.ended:
            self.ended[number] = None if error or result is None else dict(result)

    # ----- rung decisions (used by OrderedASHA) ---------------------------------------
    def rung_decision(self, trial_id: str, result: dict[str, Any]) -> str:
        number, epoch = self.numbers.get(trial_id), result.get(names.EPOCH)
        if number is None or epoch is None or int(epoch) not in self.rung_figures or self.rung_metric not in result:
            return TrialScheduler.CONTINUE
        figures = self.rung_figures[int(epoch)]
        figure = float(result[self.rung_metric])
        figures[number] = figure
        peers = [value for peer, value in figures.items() if peer <= number - self.lag]
        if not peers:
            return TrialScheduler.CONTINUE
        cutoff = _quantile(peers, 1 / self.reduction_factor)  # lower is better
        return TrialScheduler.STOP if figure > cutoff else TrialScheduler.CONTINUE



class OrderedASHA(FIFOScheduler):
    """ASHA's rung rule, deciding through `OrderedSearch.rung_decision` so that a trial is only
    compared with trials that had ended before it began."""

    def __init__(self, searcher: OrderedSearch):
        super().__init__()
        self.searcher = searcher

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        return self.searcher.rung_decision(trial.trial_id, result)

    def debug_string(self) -> str:
        return f"OrderedASHA: rungs at epochs {self.searcher.rungs}, lag {self.searcher.lag}"


class FixedConfigs(_PickledState):
    """Proposes the given configurations in order, then finishes: the full-budget reruns."""

    def __init__(self, configs: list[dict[str, Any]]):
        super().__init__()
        self.configs = [dict(c) for c in configs]
        self.assigned: dict[str, int] = {}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if trial_id in self.assigned:
            return dict(self.configs[self.assigned[trial_id]])
        if len(self.assigned) >= len(self.configs):
            return Searcher.FINISHED
        self.assigned[trial_id] = len(self.assigned)
        return dict(self.configs[self.assigned[trial_id]])

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        pass
