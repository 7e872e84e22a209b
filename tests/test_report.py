"""The report page and the MLflow description, built from a store the SearchTracker wrote (no Ray)."""

from __future__ import annotations

import json
import re

from tuning.mlflow_store import NOTE_TAG
from tuning.report import markdown_note, publish, report_path
from tuning.tracking import SearchTracker

SPACE = {"pos_weight": {"type": "loguniform", "low": 1.0, "high": 100.0},
         "prompt_template": {"type": "choice", "values": ["query", "instruction"]}}
TARGETS = {"tool_recall": {"value": 0.99, "tolerance": 0.01},
           "tool_count": {"value": 1.0, "tolerance": 0.1, "relative_to": "gold_tool_count"}}


def _search(tmp_path, trials: dict[str, tuple[float, float, str] | None]) -> SearchTracker:
    """A finished search: {trial: (pos_weight, recall, template), or None for a trial that failed}."""
    tracker = SearchTracker(f"sqlite:///{tmp_path / 'm.db'}", "exp", max_epochs=2,
                            artifact_location=(tmp_path / "artifacts").as_uri())
    tracker.start_parent("search-1", {"model": "toolrag", "search_space": json.dumps(SPACE),
                                      "paper_targets": json.dumps(TARGETS), "objective": "distance"}, {}, [])
    for trial_id, figures in trials.items():
        if figures is None:
            tracker.trial_ended(trial_id, "FAILED", "ValueError: broken", {"pos_weight": 2.0}, fixed={})
            continue
        pos_weight, recall, template = figures
        tracker.trial_started(trial_id, {"pos_weight": pos_weight, "prompt_template": template}, {"epochs": 2})
        for epoch in (1, 2):  # the second epoch reaches `recall`
            count, reached = 2.0 + pos_weight / 10, recall - 0.1 * (2 - epoch)
            tracker.trial_result(trial_id, {
                "epoch": epoch, "tool_recall": reached, "tool_recall_ci_low": reached - 0.2,
                "tool_recall_ci_high": min(reached + 0.02, 1.0), "tool_count": count, "tool_count_ci_low": count - 0.2,
                "tool_count_ci_high": count + 0.2, "gold_tool_count": 2.9, "paper_distance": abs(reached - 0.99) / 0.01})
        tracker.trial_ended(trial_id, "FINISHED")
    tracker.mark_closest(2, "reg")
    tracker.finish_parent("FINISHED", {"trials_finished": len(trials), "trials_failed": 0, "search_wall_seconds": 60.0,
                                       "trials_stopped_early": 0, "trials_scored_on_test": 0})
    return tracker


def test_the_page_and_the_description_show_the_closest_trial_linked_and_every_plot(tmp_path):
    tracker = _search(tmp_path, {"low": (1.2, 0.70, "query"), "mid": (12.0, 0.97, "instruction"),
                                 "high": (80.0, 0.995, "query"), "bad": None})
    page = publish(tracker.tracking_uri, "exp", tracker.parent_run_id, tmp_path / "results", closing_text="TABLE")
    assert page == report_path(tmp_path / "results", "search-1") and page.is_file()
    run = tracker.client.get_run(tracker.parent_run_id)
    note = run.data.tags[NOTE_TAG]
    high = tracker.trials["high"]
    assert note.startswith(f"**Closest to the paper (chosen on validation):** trial [high](#/experiments/"
                           f"{tracker.experiment_id}/runs/{high.run_id}?workflowType=machine_learning)")
    # Two ranked (the top-k the search tagged), in validation order.
    linked = re.findall(r"^\| \d+ \| \[(\w+)\]", note, flags=re.MULTILINE)
    assert linked == ["high", "mid"]
    assert "| instruction | 0.970 [0.770, 0.990] | not scored | mid | 1 |" in note
    plots = {a.path.split("/")[-1] for a in tracker.client.list_artifacts(tracker.parent_run_id, "plots")}
    assert {"optimisation_history.png", "pos_weight.png", "templates.png", "epoch_curves.png", "slices.png",
            "param_importances.png"} == plots
    html = page.read_text()
    assert html.count("<img ") == len(plots) and "<pre>TABLE</pre>" in html
    assert f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs/{high.run_id}?workflowType=machine_learning" in html
    assert not list(page.parent.glob("*.partial"))


def test_a_search_where_every_trial_failed_still_gets_a_page_that_says_so(tmp_path):
    tracker = _search(tmp_path, {"bad1": None, "bad2": None})
    page = publish(tracker.tracking_uri, "exp", tracker.parent_run_id, tmp_path / "results")
    assert "No trial produced a result" in page.read_text() and "<img " not in page.read_text()
    note = tracker.client.get_run(tracker.parent_run_id).data.tags[NOTE_TAG]
    assert note.startswith("**No trial produced a result.**")
    assert not tracker.client.list_artifacts(tracker.parent_run_id, "plots")


def test_the_description_stays_within_what_mlflow_keeps(tmp_path):
    from tuning.report import NOTE_LIMIT, load_search

    trials = {f"t{i:02d}": (1.0 + i, 0.5 + i / 100, "query" if i % 2 else "instruction" + "x" * 300) for i in range(40)}
    tracker = _search(tmp_path, trials)
    view = load_search(tracker.client, "exp", tracker.parent_run_id)
    view.top_k = 40
    note = markdown_note(view, None)
    assert len(note) <= NOTE_LIMIT and note.endswith("(cut; see the report page)")
