"""Does TPE with ASHA find a configuration near the paper sooner than random search?

    python bench/search_efficiency.py [--preset linear] [--seeds 0,1,2] [--trials 30] [--target 1.0]
    python bench/search_efficiency.py --preset tiny --trials 12 --target 60

For each seed, the real search CLI (Ray, Tune, MLflow, in-process trials, two at a time) runs
the preset twice at the same number of trials: as shipped (Optuna's TPE, seeded, with ASHA
stopping trials), and with Optuna's random sampler and no early stopping. Printed per seed, then
as medians with the ratio TPE+ASHA / random:

- time to target: wall seconds from the first trial's start until an epoch first scores a
  validation distance to the paper at most --target ("never" when no epoch does);
- best validation distance with the whole budget (--trials trials), and within the wall time
  the faster of the two searches took (the same seconds for both);
- the Spearman correlation between a trial's epoch-1 validation distance and its final one (its
  best epoch), over the random searches' trials, which all train every epoch. ASHA's cuts at
  epoch 1 are sound only where it is high. A one-epoch preset (linear) has no early epochs.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_runs import PROJECT, Search, median, run_search  # noqa: E402

METHODS = {"tpe+asha": {"sampler": "tpe", "early_stopping": True},
           "random": {"sampler": "random", "early_stopping": False}}


def distance_history(client, search: Search) -> list[tuple[float, float, int, str]]:
    """(seconds since the first trial started, validation distance, epoch, trial run id) per
    reported epoch, in time order."""
    origin = min(r.info.start_time for r in search.trials)
    points = []
    for run in search.trials:
        for point in client.get_metric_history(run.info.run_id, "paper_distance"):
            points.append(((point.timestamp - origin) / 1000, point.value, point.step, run.info.run_id))
    return sorted(points)


def time_to(points, target: float) -> float:
    return next((seconds for seconds, value, _, _ in points if value <= target), math.inf)


def best_within(points, seconds: float) -> float:
    return min((value for at, value, _, _ in points if at <= seconds), default=math.inf)


def epoch_one_and_final(points) -> list[tuple[float, float]]:
    by_trial: dict[str, dict[int, float]] = {}
    for _, value, epoch, run_id in points:
        by_trial.setdefault(run_id, {})[epoch] = value
    return [(epochs[1], min(epochs.values())) for epochs in by_trial.values() if 1 in epochs and len(epochs) > 1]


def spearman(pairs) -> float:
    from scipy.stats import spearmanr

    if len(pairs) < 3:
        return math.nan
    return float(spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)


def shown(seconds: float) -> str:
    return "never" if math.isinf(seconds) else f"{seconds:.0f} s"


def main() -> None:
    from mlflow.tracking import MlflowClient

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="linear", help="a ToolRAG preset (default linear)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--target", type=float, default=1.0, help="validation distance to reach (default 1.0)")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    preset = yaml.safe_load((PROJECT / "search_spaces" / "presets" / "toolrag" / f"{args.preset}.yaml").read_text())
    rows = {method: [] for method in METHODS}
    correlations, pooled = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in seeds:
            searches = {}
            for method, settings in METHODS.items():
                root = Path(scratch) / f"{method}-{seed}"
                root.mkdir()
                variant = {**preset, "search": {**preset["search"], **settings, "num_samples": args.trials,
                                                "time_budget_s": None}}
                (root / "preset.yaml").write_text(yaml.safe_dump(variant))
                search = run_search(root, ["--model", "toolrag", "--preset", str(root / "preset.yaml"),
                                           "--seed", str(seed), "--max-concurrent", "2"])
                client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
                searches[method] = (search, distance_history(client, search))
            same_seconds = min(search.span_seconds for search, _ in searches.values())
            for method, (search, points) in searches.items():
                row = {"to_target": time_to(points, args.target), "best": min(v for _, v, _, _ in points),
                       "best_same_time": best_within(points, same_seconds), "span": search.span_seconds,
                       "trials": len(search.trials)}
                rows[method].append(row)
                print(f"seed {seed} {method:9s}: target reached {shown(row['to_target'])}, best {row['best']:.2f} "
                      f"({row['trials']} trials in {row['span']:.0f} s), best within {same_seconds:.0f} s "
                      f"{row['best_same_time']:.2f}", flush=True)
            pairs = epoch_one_and_final(searches["random"][1])
            pooled += pairs
            correlations.append(spearman(pairs))

    print(f"\n{args.preset} preset, {args.trials} trials per search, seeds {seeds}, target distance {args.target}")
    for method in METHODS:
        reached = [row["to_target"] for row in rows[method]]
        print(f"  {method:9s}: time to target median {shown(median(reached))} {[shown(s) for s in reached]}; "
              f"best distance median {median(r['best'] for r in rows[method]):.2f}; within the same seconds "
              f"{median(r['best_same_time'] for r in rows[method]):.2f}; span median "
              f"{median(r['span'] for r in rows[method]):.0f} s")
    tpe, rnd = (median(r["to_target"] for r in rows[m]) for m in METHODS)
    reached = {m: sum(math.isfinite(r["to_target"]) for r in rows[m]) for m in METHODS}
    if math.isfinite(tpe) and math.isfinite(rnd):
        print(f"  ratio of median times to target, tpe+asha / random: {tpe / rnd:.2f} (the aim: at most 0.5)")
    else:
        print(f"  target reached in {reached['tpe+asha']} of {len(seeds)} seeds by tpe+asha, {reached['random']} of "
              f"{len(seeds)} by random: no ratio of median times")
    best = {m: median(r["best_same_time"] for r in rows[m]) for m in METHODS}
    print(f"  ratio of median best distances within the same seconds, tpe+asha / random: "
          f"{best['tpe+asha'] / best['random']:.2f}")
    if pooled:
        print(f"  Spearman(epoch-1 distance, final distance) over random search's trials: per seed "
              f"{[round(c, 2) for c in correlations]}, median {median(correlations):.2f}, pooled "
              f"{spearman(pooled):.2f} ({len(pooled)} trials)")
    else:
        print("  Spearman(epoch-1, final): the preset trains one epoch, so ASHA has no early epoch to cut on")


if __name__ == "__main__":
    main()
