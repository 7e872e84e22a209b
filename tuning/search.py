"""Search for the training configuration closest to the TinyAgent paper.

    python tuning/search.py --model toolrag                 # laptop default: local preset
    python tuning/search.py --model toolrag --smoke         # tiny model, a few trials, ~1-2 min
    python tuning/search.py --model toolrag --preset linear # the linear baseline: TF-IDF + logistic regression
    python tuning/search.py --model toolrag --preset paper --address auto --data DIR --gpus-per-worker 1
    python tuning/search.py --model planner                 # laptop planner: builds a small base once
    python tuning/search.py --model planner --smoke
    python tuning/search.py --model planner --resume        # after a crash: same options plus --resume
    python tuning/search.py --model planner --preset paper ... --submit --address http://127.0.0.1:8265
                                                            # as a Ray Job on a cluster; returns at once

Parse, validate, run, report: the work lives in tuning/prepare.py and tuning/execute.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainers.registry import TASKS  # noqa: E402
from tuning.ray_search import TRIAL_RUNNERS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Ray Tune + Optuna search for TinyAgent training configurations.")
    parser.add_argument("--model", required=True, choices=TASKS, help="which of TinyAgent's models to search for")
    parser.add_argument("--preset", default="local",
                        help="a preset of search_spaces/presets/MODEL/ or a preset YAML file. paper: the paper's "
                             "model (GPU cluster); local: laptop default; tiny: tests; linear (toolrag): TF-IDF and "
                             "logistic regression, the linear baseline")
    parser.add_argument("--smoke", action="store_true", help="a few trials at test size, about a minute or two: the preset's own "
                                                             "PRESET-smoke if shipped (linear), else the tiny preset")
    parser.add_argument("--data", help="folder with training_data.json and testing_data.json, or the hub id "
                                       "squeeze-ai-lab/TinyAgent-dataset (default: synthetic data, generated once)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip malformed records, and records whose target plan TinyAgent's parser cannot "
                             "parse, instead of stopping (or, for unparseable targets, keeping and counting them)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of the training file carved out as the validation split, by record key and "
                             "whole queries (default 0.1); every selection (epochs, ASHA, Optuna, the closest "
                             "trial) uses it, and test is scored once per trial after the search")
    parser.add_argument("--model-path", help="local folder with the preset's model (instead of its hub name)")
    parser.add_argument("--space", help="search-space YAML (default: the preset's)")
    parser.add_argument("--num-samples", type=int, help="number of trials (default: the preset's)")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the CPUs/GPUs hold)")
    parser.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers (DDP ranks) per trial")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--trial-runner", default="auto", choices=TRIAL_RUNNERS,
                        help="in-process: each trial trains in one reused process (one CPU worker); ray-train: each "
                             "trial fits a TorchTrainer with its own worker group (several workers, GPUs, clusters). "
                             "auto (default): in-process for one CPU worker per trial on a local Ray, else ray-train")
    parser.add_argument("--address", help="Ray cluster address, e.g. 'auto' on a cluster head (default: start a local "
                                          "Ray); with --submit, the cluster's dashboard, e.g. http://127.0.0.1:8265 "
                                          "(default: RAY_ADDRESS)")
    parser.add_argument("--submit", action="store_true",
                        help="check the search here, then run it as a Ray Job on the cluster --address names, and "
                             "return at once (python -m tuning.jobs lists the searches; ray job logs / ray job stop "
                             "follow and stop one). Results go to --results-dir on the head (default "
                             "~/tinyagent-results)")
    parser.add_argument("--storage", help="Ray storage: a shared folder or s3://... (default: RESULTS_DIR/ray)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: sqlite:////abs/RESULTS_DIR/mlflow.db)")
    parser.add_argument("--experiment-name", help="MLflow experiment (default: tinyagent-MODEL-PRESET)")
    parser.add_argument("--results-dir", default="results", help="where data, caches, Ray storage and MLflow go")
    parser.add_argument("--objective", default="distance", choices=("distance", "pareto"),
                        help="distance: minimise paper_distance; pareto (toolrag): recall up and tools retrieved down")
    parser.add_argument("--time-budget-s", type=float, help="stop starting trials after this many seconds")
    parser.add_argument("--top-k", type=int, default=5, help="how many closest trials to tag and print")
    parser.add_argument("--retries-per-trial", type=int,
                        help="restarts of a trial's workers after a failure such as a lost node; each resumes "
                             "from the trial's last checkpoint (default: 2 with --address, 0 on the local Ray)")
    parser.add_argument("--max-failed-trials", type=int, default=5,
                        help="stop the search once this many trials have failed (default 5; each failure is "
                             "recorded in MLflow with its reason)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the latest interrupted search of this experiment, given the same options: "
                             "ended trials are kept, interrupted ones continue from their last checkpoint, and the "
                             "MLflow parent run continues")
    parser.add_argument("--evaluate-with-toolrag", metavar="URI",
                        help="(planner) after the search, score the closest trial on the test split with this "
                             "ToolRAG model building its prompts, as TinyAgent does, and without: "
                             "models:/NAME@ALIAS, runs:/RUN_ID/model or a checkpoint folder (see tuning/evaluate.py)")
    parser.add_argument("--verbose", action="store_true",
                        help="print Tune's trial table and every worker's output here, as well as in the log "
                             "files (default: one progress line per ended trial; logs under RESULTS_DIR/logs/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-full-budget-reruns", action="store_true",
                        help="skip the reruns that train each template's best configuration (and the lowest "
                             "pos_weight's) to the end; the comparisons then use only trials the search trained to "
                             "the end")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from trainers.data import DataError
    from trainers.models import SourceUnavailable
    from tuning.config import UserError
    from tuning.execute import execute
    from tuning.job_context import SearchStopped
    from tuning.prepare import prepare

    try:
        if args.submit:
            from tuning import jobs

            return jobs.submit(argv, args.address, parse_args)
        prepared = prepare(args)
        return execute(prepared)
    except (UserError, DataError, SourceUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SearchStopped as stopped:
        print(f"[search] {stopped}: Tune's state is saved and every MLflow run is closed; the same command "
              "with --resume continues the search", file=sys.stderr)
        return 143  # 128 + SIGTERM


if __name__ == "__main__":
    sys.exit(main())
