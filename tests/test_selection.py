"""The one rule for "best" on validation (trainers/selection.py)."""

from __future__ import annotations

from trainers.selection import epoch_key, improves, scored_on_whole_validation, trial_key


def _figures(distance, tool_sets=0.0, parse=0.0, full=1.0):
    return {"paper_distance": distance, "tool_set_accuracy": tool_sets, "plan_parse_rate": parse,
            "full_validation_set": full}


def test_a_lower_distance_wins_and_ties_are_broken_by_tool_sets_then_parsing():
    assert improves(epoch_key(_figures(10.0)), None)
    assert improves(epoch_key(_figures(9.0)), epoch_key(_figures(10.0)))
    assert not improves(epoch_key(_figures(11.0, 1.0, 1.0)), epoch_key(_figures(10.0)))
    assert improves(epoch_key(_figures(10.0, 0.3)), epoch_key(_figures(10.0, 0.2, 1.0)))
    assert improves(epoch_key(_figures(10.0, 0.2, 0.9)), epoch_key(_figures(10.0, 0.2, 0.8)))
    assert not improves(epoch_key(_figures(10.0, 0.2, 0.7)), epoch_key(_figures(10.0, 0.2, 0.8)))


def test_a_full_tie_goes_to_the_later_epoch():
    assert improves(epoch_key(_figures(10.0, 0.2, 0.8)), epoch_key(_figures(10.0, 0.2, 0.8)))


def test_toolrag_figures_without_tie_breaks_compare_on_distance_alone():
    toolrag = {"paper_distance": 1.5, "tool_recall": 0.97}
    assert epoch_key(toolrag) == (1.5, 0.0, 0.0) and scored_on_whole_validation(toolrag)


def test_trials_scored_on_the_whole_split_rank_before_those_scored_on_a_subset():
    subset_but_closer = _figures(1.0, full=0.0)
    whole = _figures(5.0)
    assert sorted([subset_but_closer, whole], key=trial_key) == [whole, subset_but_closer]
