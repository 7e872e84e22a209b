"""How much the default laptop searches' answers move with the seed, and whether one seed repeats.

    python bench/seed_spread.py                       # both models, seeds 0 1 2, then seed 0 again
    python bench/seed_spread.py --model toolrag --seeds 0 1 2 --repeat 0
    python bench/seed_spread.py --model toolrag --seeds 0 --repeat -1 --against KEPT   # vs an earlier --keep

Each seed runs `python tuning/search.py --model MODEL --seed S` in its own results folder: the
seed draws the generated data, Optuna's proposals and every trial's initialisation, so the
spread is that of the whole answer. Printed per search: the closest trial (chosen on
validation) and its test figures, each template's full-budget test figure, the template
comparison and the pos_weight contrast, what the full-budget reruns cost, and how busy the
two lanes were. Then, per model, the median and range over the seeds; with --repeat, whether a
second run of that seed proposed the same settings with the same figures (its ratio of wall
times is the run-to-run noise of this machine). --against compares each seed's search with the
one kept under that folder by an earlier --keep, so one seed is checked again at the cost of one
search, not two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.search_runs import Search, run_search, trial_runs  # noqa: E402

HEADLINE = {"toolrag": "tool_recall", "planner": "plan_success"}


def parent_run(root: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bench")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.search = 'parent'")
    return client, parent


def what_repeats(client, search: Search) -> list:
    """Per searched trial, in proposal order: its settings and its per-epoch validation distance."""
    rows = []
    searched = [r for r in search.trials if "full_budget_for" not in r.data.tags]
    for run in sorted(searched, key=lambda r: int(r.data.tags["trial_number"])):
        history = sorted(client.get_metric_history(run.info.run_id, "paper_distance"), key=lambda p: p.step)
        settings = {k: v for k, v in sorted(run.data.params.items()) if k in json.loads(
            parent_run_params(client, run)["search_space"])}
        rows.append((settings, [p.value for p in history]))
    return rows


def parent_run_params(client, run) -> dict:
    return client.get_run(run.data.tags["mlflow.parentRunId"]).data.params


def figures(model: str, root: Path, search: Search) -> dict:
    client, parent = parent_run(root)
    metric = HEADLINE[model]
    m, tags = parent.data.metrics, parent.data.tags
    searched = [r for r in search.trials if "full_budget_for" not in r.data.tags]
    result = {
        "wall_seconds": search.wall_seconds,
        # The search's own clock starts after the data and any base build (a first run's cost).
        "search_seconds": m.get("search_wall_seconds", float("nan")),
        "trials": len(searched),
        "stopped_early": sum(r.data.tags.get("stopped_early") == "true" for r in searched),
        "reruns": m.get("full_budget_reruns", 0.0),
        "rerun_seconds": m.get("full_budget_seconds", 0.0),
        "lane_utilisation": Search(searched, 0.0, "").lane_utilisation(2) if searched else float("nan"),
        "best_val_distance": m.get("best_paper_distance", float("nan")),
        f"closest_test_{metric}": m.get(f"closest_test_{metric}", float("nan")),
        f"closest_test_{metric}_ci": (m.get(f"closest_test_{metric}_ci_low"), m.get(f"closest_test_{metric}_ci_high")),
        "templates": {key.split("_")[2]: value for key, value in m.items()
                      if key.startswith("prompt_template_") and key.endswith(f"_test_{metric}")},
        "template_answer": tags.get("comparison_prompt_template", "-"),
        "template_difference": m.get("prompt_template_difference"),
        "template_p": m.get("prompt_template_mcnemar_p"),
        "pos_weight_answer": tags.get("comparison_pos_weight", "-"),
        "repeats": what_repeats(client, search),
    }
    for side in ("lowest", "closest"):
        result[f"pos_weight_{side}"] = (m.get(f"pos_weight_{side}_value"), m.get(f"pos_weight_{side}_test_{metric}"))
    return result


def first_difference(first: list, second: list) -> str:
    """Where two searches' proposals or per-epoch validation distances first part."""
    for number, (one, other) in enumerate(zip(first, second)):
        if one[0] != other[0]:
            return f"trial {number}'s settings: {one[0]} against {other[0]}"
        for epoch, (a, b) in enumerate(zip(one[1], other[1]), start=1):
            if a != b:
                return f"trial {number} ({one[0]}), epoch {epoch}: validation distance {a!r} against {b!r}"
        if len(one[1]) != len(other[1]):
            return f"trial {number}: {len(one[1])} epochs against {len(other[1])}"
    return f"{len(first)} trials against {len(second)}"


def same_as_kept(kept_root: Path, result: dict) -> str:
    if not (kept_root / "mlflow.db").exists():
        return f"no earlier search under {kept_root} to compare with"
    # A search an earlier --keep left, read back from its MLflow store (its wall time is not kept).
    client, parent = parent_run(kept_root)
    kept = what_repeats(client, Search(trial_runs(client, parent.info.experiment_id), float("nan"), ""))
    if kept == result["repeats"]:
        return (f"the same as the search kept under {kept_root}: proposals and per-epoch validation distances of "
                f"all {len(kept)} trials")
    return f"NOT the same as the search kept under {kept_root}: first at {first_difference(kept, result['repeats'])}"


def spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"median {statistics.median(values):.3f} (range {min(values):.3f} to {max(values):.3f}, n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["toolrag", "planner", "both"], default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeat", type=int, nargs="?", const=0, default=0,
                        help="run this seed a second time and compare (default: 0; pass -1 to skip)")
    parser.add_argument("--keep", help="keep each search's results under this folder")
    parser.add_argument("--against", help="a folder an earlier --keep wrote: compare each seed's search with its own")
    args = parser.parse_args()
    models = ["toolrag", "planner"] if args.model == "both" else [args.model]
    with TemporaryDirectory(prefix="seed-spread-") as scratch:
        base = Path(args.keep or scratch)
        for model in models:
            metric = HEADLINE[model]
            by_seed = {}
            runs = [(seed, "") for seed in args.seeds] + ([(args.repeat, "-again")] if args.repeat >= 0 else [])
            for seed, suffix in runs:
                root = base / f"{model}-seed{seed}{suffix}"
                root.mkdir(parents=True, exist_ok=True)
                search = run_search(root, ["--model", model, "--seed", str(seed)])
                result = figures(model, root, search)
                by_seed[(seed, suffix)] = result
                low, high = result[f"closest_test_{metric}_ci"]
                print(f"[{model} seed {seed}{suffix}] {result['wall_seconds']:.0f} s ({result['search_seconds']:.0f} s "
                      f"after the data and base), {result['trials']} trials "
                      f"({result['stopped_early']} stopped early), {result['reruns']:.0f} full-budget reruns in "
                      f"{result['rerun_seconds']:.0f} s, lanes busy {result['lane_utilisation']:.2f}; closest: "
                      f"validation distance {result['best_val_distance']:.3f}, test {metric} "
                      f"{result[f'closest_test_{metric}']:.3f} [{low:.3f}, {high:.3f}]", flush=True)
                print("  templates on test: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(result["templates"].items())),
                      flush=True)
                print(f"  {result['template_answer']}", flush=True)
                if model == "toolrag":
                    print(f"  {result['pos_weight_answer']}", flush=True)
                if args.against and not suffix:
                    print(f"  {same_as_kept(Path(args.against) / root.name, result)}", flush=True)
            seeds = [by_seed[(seed, "")] for seed in args.seeds]
            print(f"\n== {model}, seeds {' '.join(map(str, args.seeds))} ==")
            print(f"  best validation distance: {spread([r['best_val_distance'] for r in seeds])}")
            print(f"  closest trial's test {metric}: {spread([r[f'closest_test_{metric}'] for r in seeds])}")
            for template in sorted({t for r in seeds for t in r["templates"]}):
                print(f"  `{template}` best full-budget test {metric}: "
                      f"{spread([r['templates'].get(template) for r in seeds])}")
            print(f"  template difference (best two, paired): {spread([r['template_difference'] for r in seeds])}")
            if model == "toolrag":
                for side in ("lowest", "closest"):
                    print(f"  {side} pos_weight: {spread([r[f'pos_weight_{side}'][0] for r in seeds])}, its test "
                          f"{metric}: {spread([r[f'pos_weight_{side}'][1] for r in seeds])}")
            print(f"  McNemar p: {spread([r['template_p'] for r in seeds])}")
            print(f"  full-budget reruns: {spread([r['reruns'] for r in seeds])}, their seconds: "
                  f"{spread([r['rerun_seconds'] for r in seeds])}; share of the search's wall time: "
                  f"{spread([r['rerun_seconds'] / r['wall_seconds'] for r in seeds])}")
            print(f"  search wall seconds: {spread([r['wall_seconds'] for r in seeds])}, of which after the data and "
                  f"base: {spread([r['search_seconds'] for r in seeds])}; lanes busy: "
                  f"{spread([r['lane_utilisation'] for r in seeds])}")
            if args.repeat >= 0:
                first, again = by_seed[(args.repeat, "")], by_seed[(args.repeat, "-again")]
                same = first["repeats"] == again["repeats"]
                print(f"  seed {args.repeat} run twice: {'the same' if same else 'DIFFERENT'} proposals and per-epoch "
                      f"validation distances for all {len(first['repeats'])} trials; same answers: "
                      f"{first['template_answer'] == again['template_answer']}; wall time ratio "
                      f"{again['wall_seconds'] / first['wall_seconds']:.2f}")
            print(flush=True)


if __name__ == "__main__":
    main()
