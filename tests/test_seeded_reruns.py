"""One --seed, two searches, the same answer: proposals, per-epoch figures, early stops, the
full-budget reruns, test figures and the comparisons, with two trials at once."""

from __future__ import annotations

import pytest

PER_EPOCH = ("paper_distance", "tool_recall", "tool_count", "train_loss")


def _search(root, seed: int) -> dict:
    from tuning.execute import execute
    from tuning.prepare import prepare
    from tuning.search import parse_args

    uri = f"sqlite:///{root / 'mlflow.db'}"
    args = parse_args(["--model", "toolrag", "--smoke", "--num-samples", "6", "--max-concurrent", "2",
                       "--seed", str(seed), "--results-dir", str(root), "--tracking-uri", uri,
                       "--storage", str(root / "storage"), "--experiment-name", "seeded"])
    assert execute(prepare(args)) == 0
    return _what_a_rerun_must_repeat(uri)


def _what_a_rerun_must_repeat(uri: str) -> dict:
    from tests.conftest import _trial_or_parent_runs

    client, trials = _trial_or_parent_runs(uri, "seeded", "trial")
    _, (parent,) = _trial_or_parent_runs(uri, "seeded", "parent")
    searched = [run for run in trials if "full_budget_for" not in run.data.tags]
    reruns = [run for run in trials if "full_budget_for" in run.data.tags]

    def figures(run) -> dict:
        per_epoch = {name: [(p.step, p.value) for p in sorted(client.get_metric_history(run.info.run_id, name),
                                                               key=lambda p: p.step)] for name in PER_EPOCH}
        test = {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}
        settings = {k: run.data.params[k] for k in ("pos_weight", "learning_rate", "batch_size", "prompt_template")}
        return {"settings": settings, "per_epoch": per_epoch, "test": test,
                "epochs_completed": run.data.metrics["epochs_completed"],
                "stopped_early": run.data.tags["stopped_early"]}

    return {
        "trials": {int(run.data.tags["trial_number"]): figures(run) for run in searched},
        "reruns": {run.data.tags["full_budget_for"]: figures(run) for run in reruns},
        "comparisons": {k: v for k, v in parent.data.tags.items() if k.startswith("comparison_")},
        "closest": parent.data.metrics["best_paper_distance"],
    }


@pytest.mark.ray
@pytest.mark.slow
def test_one_seed_twice_gives_the_same_proposals_figures_stops_and_comparisons(ray_2_cpus, tmp_path):
    # Seed 1 stops trials at both rungs and owes two reruns (a template, the lowest pos_weight).
    first = _search(tmp_path / "first", seed=1)
    second = _search(tmp_path / "second", seed=1)
    assert sorted(first["trials"]) == list(range(6))
    for number in range(6):
        assert first["trials"][number] == second["trials"][number], f"trial {number} differs"
    assert first["reruns"] == second["reruns"]
    assert any(t["stopped_early"] == "true" for t in first["trials"].values()), "no early stop was exercised"
    assert "pos_weight lowest" in first["reruns"], first["reruns"].keys()
    assert first["comparisons"] == second["comparisons"] and first["comparisons"]
    assert first["closest"] == second["closest"]
    # Every template has a full-budget trial, whatever ASHA stopped.
    templates = {t["settings"]["prompt_template"] for t in [*first["trials"].values(), *first["reruns"].values()]
                 if t["stopped_early"] == "false"}
    assert templates == {"query", "question", "instruction"}
    # A rerun repeats its source configuration's epochs exactly where both trained.
    for reason, rerun in first["reruns"].items():
        source = next((t for t in first["trials"].values() if t["settings"] == rerun["settings"]), None)
        if source is not None:
            trained = len(source["per_epoch"]["paper_distance"])
            assert rerun["per_epoch"]["paper_distance"][:trained] == source["per_epoch"]["paper_distance"], reason
