"""Proposals and early stops that timing cannot change (tuning/ordered_search.py).

A small event simulation plays the part of Tune with two lanes: trials take random wall times,
so they end in a different order under each timing seed, while each trial's figures depend on
its settings only (as a seeded trial's do). The searcher and the rung rule must give the same
proposals and the same stops whatever the timing.
"""

from __future__ import annotations

import random

import optuna
import pytest

from tuning.ordered_search import OrderedSearch, _quantile, rung_epochs

SPACE = {"x": {"type": "uniform", "low": 0.0, "high": 1.0},
         "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
         "template": {"type": "choice", "values": ["a", "b", "c"]}}
METRIC = "best_paper_distance"


def figure(config: dict, epoch: int) -> float:
    """A trial's rung figure: its settings decide it, not when it runs."""
    return (config["x"] - 0.3) ** 2 + {"a": 0.2, "b": 0.0, "c": 0.4}[config["template"]] + 1.0 / epoch


def simulate(searcher, timing_seed: int, trials: int = 10, lanes: int = 2, epochs: int = 3, decide=None):
    """Run `trials` trials `lanes` at a time through the Searcher API; returns (proposals in
    trial order, {trial: epochs trained}). `decide(trial_id, result)` is the rung rule, if any."""
    clock, timing = 0.0, random.Random(timing_seed)
    running: dict[str, tuple[float, dict, int]] = {}  # trial id -> (ends at, config, epochs trained)
    proposals, trained, created = [], {}, 0
    while created < trials or running:
        while len(running) < lanes and created < trials:
            trial_id = f"t{timing_seed}-{created}-{clock:.3f}"
            config = searcher.suggest(trial_id)
            if config is None:  # waits for an older trial
                break
            created += 1
            proposals.append(config)
            # Each epoch takes a random time; the rung rule may stop the trial at any epoch.
            done, ends = epochs, clock
            for epoch in range(1, epochs + 1):
                ends += timing.uniform(0.1, 3.0)
                result = {"epoch": epoch, "training_iteration": epoch, METRIC: figure(config, epoch)}
                searcher.on_trial_result(trial_id, result)
                if decide is not None and decide(trial_id, result) == "STOP":
                    done = epoch
                    break
            running[trial_id] = (ends, config, done)
        trial_id = min(running, key=lambda t: running[t][0])
        clock, config, done = running.pop(trial_id)
        trained[len(trained)] = (config, done)
        searcher.on_trial_complete(trial_id, {"epoch": done, METRIC: figure(config, done)})
    return proposals, sorted(trained.values(), key=lambda item: proposals.index(item[0]))


def ordered(seed: int = 0, rungs: list[int] | None = None) -> OrderedSearch:
    return OrderedSearch(SPACE, METRIC, "min", optuna.samplers.TPESampler(seed=seed, n_startup_trials=2), lag=2,
                         warm_start=[{"x": 0.5, "lr": 1e-3, "template": "a"}], rung_metric=METRIC,
                         rungs=rungs or [], reduction_factor=2)


def test_one_seed_proposes_the_same_settings_in_the_same_order_whatever_the_timing():
    runs = [simulate(ordered(), timing_seed) for timing_seed in (1, 2, 3)]
    assert runs[0][0] == runs[1][0] == runs[2][0]
    assert runs[0][0][0] == {"x": 0.5, "lr": 1e-3, "template": "a"}, "the warm start goes first"
    assert len({str(p) for p in runs[0][0]}) == 10
    # Another seed proposes otherwise: the agreement is not a constant.
    assert simulate(ordered(seed=1), 1)[0] != runs[0][0]


def test_the_stock_optuna_searcher_drifts_with_timing_which_is_what_the_order_prevents():
    """The same simulation with Ray's OptunaSearch: Optuna hears of trials as they end, so two
    timings give two histories and two sets of proposals. Without this, the test above could
    pass for a searcher that never looked at results."""
    from ray.tune.search.optuna import OptunaSearch

    from tuning.ordered_search import optuna_distributions

    def stock():
        return OptunaSearch(space=optuna_distributions(SPACE), metric=METRIC, mode="min",
                            sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2),
                            points_to_evaluate=[{"x": 0.5, "lr": 1e-3, "template": "a"}])

    first, second = simulate(stock(), 1)[0], simulate(stock(), 2)[0]
    assert first != second


def test_proposal_k_waits_until_trial_k_minus_lag_has_ended():
    searcher = ordered()
    assert searcher.suggest("a") is not None and searcher.suggest("b") is not None
    assert searcher.suggest("c") is None, "trial 2 waits for trial 0 with two lanes"
    searcher.on_trial_complete("b", {METRIC: 1.0})
    assert searcher.suggest("c") is None, "trial 1 ending is not enough: trial 0 still runs"
    searcher.on_trial_complete("a", {METRIC: 2.0})
    assert searcher.suggest("c") is not None
    # Optuna was told trial 0 only (in trial-number order); trial 1's result waits for proposal 3.
    told = [t for t in searcher.study.trials if t.state.is_finished()]
    assert [t.number for t in told] == [0] and told[0].value == 2.0


def test_an_errored_trial_is_told_as_failed_and_does_not_block():
    searcher = ordered()
    searcher.suggest("a"), searcher.suggest("b")
    searcher.on_trial_complete("a", None, error=True)
    assert searcher.suggest("c") is not None
    assert searcher.study.trials[0].state == optuna.trial.TrialState.FAIL


def test_rung_decisions_compare_only_with_trials_that_ended_before_and_agree_across_timings():
    rungs = rung_epochs(grace_period=1, reduction_factor=2, max_epochs=3)
    assert rungs == [1, 2]
    runs = []
    for timing_seed in (1, 2, 3):
        searcher = ordered(rungs=rungs)
        runs.append(simulate(searcher, timing_seed, decide=searcher.rung_decision))
    assert runs[0] == runs[1] == runs[2]
    trained = [done for _, done in runs[0][1]]
    assert 3 in trained and min(trained) < 3, f"some trials stopped early, some trained to the end: {trained}"


def test_the_rung_rule_is_ashas_quantile_of_the_settled_peers():
    searcher = ordered(rungs=[1])
    for index in range(5):
        searcher.suggest(f"t{index}")
        searcher.on_trial_complete(f"t{index}", {METRIC: 0.0}) if index < 3 else None
    searcher.rung_figures[1].update({0: 1.0, 1: 2.0, 2: 3.0})
    # Trial 4 (lag 2) compares with trials 0-2: the median of 1, 2, 3 is 2 (lower is better).
    assert searcher.rung_decision("t4", {"epoch": 1, METRIC: 2.0}) == "CONTINUE"
    assert searcher.rung_decision("t4", {"epoch": 1, METRIC: 2.5}) == "STOP"
    # Trial 3's figure is never among trial 4's peers: it may still be running.
    searcher.rung_figures[1][3] = 0.1
    assert searcher.rung_decision("t4", {"epoch": 1, METRIC: 2.5}) == "STOP"
    # Not a rung epoch: always go on.
    assert searcher.rung_decision("t4", {"epoch": 2, METRIC: 99.0}) == "CONTINUE"
    assert _quantile([1.0, 2.0, 3.0, 4.0], 1 / 3) == pytest.approx(2.0)


def test_the_searcher_state_survives_save_and_restore(tmp_path):
    searcher = ordered()
    searcher.suggest("a"), searcher.suggest("b")
    searcher.on_trial_complete("a", {METRIC: 0.5})
    searcher.save(str(tmp_path / "state.pkl"))
    restored = ordered(seed=5)
    restored.restore(str(tmp_path / "state.pkl"))
    assert restored.numbers == {"a": 0, "b": 1} and restored.ended == {0: {METRIC: 0.5}}
    assert restored.suggest("c") == searcher.suggest("c2")
