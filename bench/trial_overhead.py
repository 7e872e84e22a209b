"""What a trial costs beyond its training, on each trial runner, and how well two lanes are used.

    python bench/trial_overhead.py [--trials 8] [--epochs 6] [--default-search]

Runs the real CLI (Ray, Tune, MLflow) on the tiny ToolRAG preset with a fixed-cost space: only
pos_weight is searched (it changes the loss, not the work) and ASHA never stops a trial (its
grace period is the last epoch), so every trial does the same work. Three searches:

1. in-process runner, one trial at a time;
2. ray-train runner (a TorchTrainer and its worker group per trial), one trial at a time;
3. in-process runner, two trials at once.

Printed, with the ratios measured in this run:
- per-trial overhead = trial wall time (the driver's view, start to end) - time inside the
  training function, medians of (1) and (2);
- trials per hour of (3) against (1), each over the span from the first trial's start to the
  last trial's end, and again once each lane's first trial has ended (its cold start);
- lane utilisation of (3): Σ time in training / (span × 2);
- data preparation of the first trial (tokenizing, a cache miss) against later ones (cache
  hits), and the share of pad tokens in training batches against fixed-length padding.

`--default-search` also runs the default laptop ToolRAG search (`python tuning/search.py --model
toolrag`) on each runner and prints its end-to-end wall time and lane utilisation (about 15
minutes more).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_runs import PROJECT, Search, median, run_search  # noqa: E402

TINY_PRESET = PROJECT / "search_spaces" / "presets" / "toolrag" / "tiny.yaml"


def fixed_cost_search(root: Path, trials: int, epochs: int, runner: str, concurrent: int) -> Search:
    root.mkdir(parents=True)
    preset = yaml.safe_load(TINY_PRESET.read_text())
    preset["trainer"].update(epochs=epochs, learning_rate=2e-3, batch_size=32, prompt_template="query")
    preset["search"].update(num_samples=trials, grace_period=epochs)
    space = {"model": "toolrag", "parameters": {"pos_weight": {"type": "loguniform", "low": 1.0, "high": 150.0}}}
    (root / "preset.yaml").write_text(yaml.safe_dump(preset))
    (root / "space.yaml").write_text(yaml.safe_dump(space))
    return run_search(root, ["--model", "toolrag", "--preset", str(root / "preset.yaml"), "--space",
                             str(root / "space.yaml"), "--max-concurrent", str(concurrent), "--trial-runner", runner])


def rounded(values) -> list[float]:
    return [round(value, 1) for value in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="trials per search (default 8)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per trial, all trained (default 6)")
    parser.add_argument("--default-search", action="store_true",
                        help="also run the default laptop ToolRAG search on each runner")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        in_process = fixed_cost_search(root / "in-process-1", args.trials, args.epochs, "in-process", 1)
        ray_train = fixed_cost_search(root / "ray-train-1", args.trials, args.epochs, "ray-train", 1)
        two_lanes = fixed_cost_search(root / "in-process-2", args.trials, args.epochs, "in-process", 2)
        defaults = {}
        if args.default_search:
            for runner in ("in-process", "ray-train"):
                (root / runner).mkdir()
                defaults[runner] = run_search(root / runner, ["--model", "toolrag", "--trial-runner", runner],
                                              experiment="default")

    print(f"tiny ToolRAG, {args.trials} trials x {args.epochs} epochs, same work per trial, 2 cores")
    fast, slow = median(in_process.overheads()), median(ray_train.overheads())
    print("per-trial overhead (trial wall - time in the training function), median, one trial at a time:")
    print(f"  in-process: {fast:5.1f} s   {rounded(in_process.overheads())}")
    print(f"  ray-train:  {slow:5.1f} s   {rounded(ray_train.overheads())}")
    print(f"  ratio in-process / ray-train: {fast / slow:.2f}")
    print(f"  time in training per trial, median: in-process {median(in_process.train_seconds()):.1f} s, "
          f"ray-train {median(ray_train.train_seconds()):.1f} s")
    one, two = in_process.trials_per_hour(), two_lanes.trials_per_hour()
    print(f"trials per hour (in-process): 1 at a time {one:.0f} (span {in_process.span_seconds:.0f} s), "
          f"2 at a time {two:.0f} (span {two_lanes.span_seconds:.0f} s); ratio {two / one:.2f}")
    warm_one, warm_two = in_process.warm_trials_per_hour(1), two_lanes.warm_trials_per_hour(2)
    print(f"  after each lane's first trial (its process start, with Ray's and the driver's): 1 at a time "
          f"{warm_one:.0f}, 2 at a time {warm_two:.0f}; ratio {warm_two / warm_one:.2f}")
    print(f"  ray-train, 1 at a time: {ray_train.trials_per_hour():.0f} (span {ray_train.span_seconds:.0f} s)")
    print(f"lane utilisation, 2 at a time, in-process: {two_lanes.lane_utilisation(2):.2f} "
          f"(1 at a time: in-process {in_process.lane_utilisation(1):.2f}, ray-train {ray_train.lane_utilisation(1):.2f})")
    cold, *warm = [run.data.metrics["data_prep_seconds"] for run in in_process.trials]
    print(f"data preparation (1,200 train + ~200 validation queries, one template): first trial {cold:.2f} s "
          f"(tokenizes, fills the cache), later trials median {median(warm):.2f} s; ratio {median(warm) / cold:.2f}")
    waste = median(run.data.metrics["padding_waste"] for run in in_process.trials)
    tokens = median(run.data.metrics["mean_input_tokens"] for run in in_process.trials)
    max_length = int(in_process.trials[0].data.params["max_length"])
    print(f"padding waste in training batches (padded to the longest, length-grouped), median: {waste:.1%}; "
          f"padding every input to the preset's {max_length} tokens: {1 - tokens / max_length:.1%}, "
          f"to the paper's 512: {1 - tokens / 512:.1%}")
    for runner, search in defaults.items():
        print(f"default laptop ToolRAG search, {runner}: {search.wall_seconds:.0f} s end to end, "
              f"{len(search.trials)} trials over {search.span_seconds:.0f} s, lane utilisation "
              f"{search.lane_utilisation(2):.2f}, overhead per trial {median(search.overheads()):.1f} s, "
              f"best validation distance {search.best():.2f}")
    if len(defaults) == 2:
        print(f"  ratio of end-to-end times in-process / ray-train: "
              f"{defaults['in-process'].wall_seconds / defaults['ray-train'].wall_seconds:.2f}")


if __name__ == "__main__":
    main()
