"""Per-trial framework overhead, tokenization cache effect and padding waste of a ToolRAG search.

    python bench/trial_overhead.py [--trials 4]

Runs the real CLI twice on the tiny preset, one trial at a time so trials do not compete for
cores: once with Ray Train's default control-loop settings (the baseline) and once with the
settings this project uses for a local Ray. For each trial:

- overhead = trial wall time (driver's view, start to completion) - time inside the
  training function; the medians of both runs and their ratio are printed;
- data preparation time of the first trial of each template (cache miss) against later
  trials of the same template (cache hit);
- pad tokens as a share of all tokens in training batches (padded to the longest in each
  batch, batches grouped by length), against padding every input to the preset's
  max_length and to the paper's 512.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

PROJECT = Path(__file__).resolve().parent.parent
BASELINE_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}


def run_search(root: Path, trials: int, env_overrides: dict[str, str], two_templates: bool) -> list:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {**os.environ, **env_overrides}
    command = [sys.executable, "tuning/search.py", "--model", "toolrag", "--smoke", "--num-samples", str(trials),
               "--max-concurrent", "1", "--results-dir", str(root), "--tracking-uri", uri,
               "--experiment-name", "bench"]
    if two_templates:
        # Two templates among 4+ trials: some trials repeat a template and hit the cache.
        space = root / "space.yaml"
        space.write_text((PROJECT / "search_spaces" / "toolrag-smoke.yaml").read_text()
                         .replace("values: [query, question, instruction]", "values: [query, question]"))
        command += ["--space", str(space)]
    completed = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.exit(f"search failed:\n{completed.stderr[-3000:]}")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("bench")
    runs = client.search_runs([experiment.experiment_id], "tags.search = 'trial'")
    return sorted(runs, key=lambda run: run.info.start_time)


def overheads(runs) -> list[float]:
    return [r.data.metrics["trial_wall_seconds"] - r.data.metrics["train_fn_seconds"]
            for r in runs if "train_fn_seconds" in r.data.metrics]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as baseline_dir, tempfile.TemporaryDirectory() as tuned_dir:
        baseline = run_search(Path(baseline_dir), args.trials, BASELINE_ENV, two_templates=False)
        tuned = run_search(Path(tuned_dir), args.trials, {}, two_templates=True)

    base_overhead, tuned_overhead = statistics.median(overheads(baseline)), statistics.median(overheads(tuned))
    print(f"per-trial framework overhead (trial wall - training function), median of {args.trials} trials:")
    print(f"  Ray Train defaults:   {base_overhead:6.1f} s   {[round(x, 1) for x in overheads(baseline)]}")
    print(f"  this project's local: {tuned_overhead:6.1f} s   {[round(x, 1) for x in overheads(tuned)]}")
    print(f"  ratio: {tuned_overhead / base_overhead:.2f}")

    seen, misses, hits = set(), [], []
    for run in tuned:
        template = run.data.params["prompt_template"]
        (hits if template in seen else misses).append(run.data.metrics["data_prep_seconds"])
        seen.add(template)
    if hits:
        ratio = statistics.median(hits) / statistics.median(misses)
        print(f"data preparation (tiny preset: 1,200 train + ~200 validation queries): first trial of a template "
              f"{statistics.median(misses):.3f} s, "
              f"later trials {statistics.median(hits):.3f} s, ratio {ratio:.2f}")
    else:
        print("data preparation: every trial drew a new template; run with more --trials")

    waste = [run.data.metrics["padding_waste"] for run in tuned + baseline if "padding_waste" in run.data.metrics]
    max_length = int(tuned[0].data.params["max_length"])
    mean_tokens = statistics.median(run.data.metrics.get("mean_input_tokens", 0) for run in tuned)
    print(f"padding waste in training batches (dynamic padding, length-grouped), median over trials: "
          f"{statistics.median(waste):.1%}")
    if mean_tokens:
        print(f"  padding every input to the preset's max_length={max_length}: {1 - mean_tokens / max_length:.1%}")
        print(f"  padding every input to the paper's 512 tokens: {1 - mean_tokens / 512:.1%}")


if __name__ == "__main__":
    main()
