"""Evaluate ToolRAG and the planner together, as TinyAgent runs them, against the planner alone.

    python tuning/evaluate.py --planner models:/tinyagent-planner@closest-to-paper \\
                              --toolrag models:/tinyagent-toolrag@closest-to-paper
    python tuning/evaluate.py --planner DIR --toolrag DIR --reference-planner OTHER_DIR --data DATA_DIR
    python tuning/evaluate.py ... --reference-planner squeeze-ai-lab/TinyAgent-1.1B   # needs the hub

Each example is scored twice: the planner on the prompt it was trained with, and on the prompt
TinyAgent builds from ToolRAG's tools and examples (trainers/pipeline.py). Prints the figures
with 95% intervals and McNemar's exact test, and records an MLflow run. The split is scored
here, not selected on: run it on test once, after choosing the models on validation.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Score ToolRAG + planner together, with paired statistics.")
    parser.add_argument("--planner", required=True,
                        help="the planner: models:/NAME@ALIAS or models:/NAME/VERSION, runs:/RUN_ID/model, or a "
                             "checkpoint folder")
    parser.add_argument("--toolrag", required=True, help="the ToolRAG model, given the same ways")
    parser.add_argument("--reference-planner",
                        help="a planner to compare with on the same examples and prompts: the same ways, or a "
                             "hub id such as squeeze-ai-lab/TinyAgent-1.1B (a plain causal LM)")
    parser.add_argument("--reference-template", help="prompt template for a plain causal-LM reference "
                                                     "(default: the planner's)")
    parser.add_argument("--data", help="folder with training_data.json and testing_data.json (default: the data "
                                       "the planner's search recorded)")
    parser.add_argument("--split", default="test", choices=("test", "val"), help="which split to score (default test)")
    parser.add_argument("--val-fraction", type=float, help="as in the search (default: the planner's search's)")
    parser.add_argument("--skip-invalid", action="store_true", help="skip malformed records instead of stopping")
    parser.add_argument("--max-examples", type=int,
                        help="score the first N examples of the split (default: as many as the search scored "
                             "on test, the planner's max_eval_examples)")
    parser.add_argument("--results-dir", default="results", help="where downloaded models are kept")
    parser.add_argument("--tracking-uri", help="MLflow store (default: sqlite:////abs/RESULTS_DIR/mlflow.db)")
    parser.add_argument("--experiment-name", default="tinyagent-evaluation")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A new sqlite store announces its table set-up at INFO: noise around a one-line error.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from trainers.data import DataError
    from trainers.models import SourceUnavailable
    from tuning.config import UserError
    from tuning.pipeline_eval import run_evaluation

    try:
        return run_evaluation(args)
    except (UserError, DataError, SourceUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
