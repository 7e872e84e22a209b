"""The names of the figures a trial reports: the contract between the trainers, which write
them, and the search (scheduler, tracking, closing table, test scoring), which reads them.

Every module imports the name from here, so a rename cannot leave a reader behind.
"""

from __future__ import annotations

# Closeness to the paper: per epoch, and the best epoch so far.
PAPER_DISTANCE = "paper_distance"
BEST_PAPER_DISTANCE = "best_paper_distance"
# The planner's ASHA signal: the best distance with a tie-break (see trainers/planner.py).
BEST_EARLY_STOP_SCORE = "best_early_stop_score"

EPOCH = "epoch"
# 1.0 when a report's figures are its trial's best so far (trainers/selection.py decides), 0.0
# otherwise; and the epoch whose weights those best figures, and the trial's checkpoint, hold.
BEST_SO_FAR = "best_so_far"
BEST_EPOCH = "best_epoch"
# In a checkpoint's held-out score only: each example's outcome (1 = success: every needed tool
# retrieved, or the plan right), in split order, for paired comparisons between trials.
PER_EXAMPLE_SUCCESS = "per_example_success"
EVAL_EXAMPLES = "eval_examples"
# 1.0 when a report scores the whole validation split (every ToolRAG epoch; a planner trial's
# last), 0.0 when it scores the per-epoch subset.
FULL_VALIDATION_SET = "full_validation_set"
TRAIN_LOSS = "train_loss"

# ToolRAG's figures.
TOOL_RECALL = "tool_recall"
TOOL_COUNT = "tool_count"
TOOL_PRECISION = "tool_precision"
# The mean number of tools the scored examples need: a tool-count target relative to the data
# (generated data, see search_spaces/targets.yaml) is measured from it.
GOLD_TOOL_COUNT = "gold_tool_count"
PER_TOOL_RECALL_PREFIX = "recall/"
# The planner's.
PLAN_SUCCESS = "plan_success"
PLAN_SUCCESS_WITH_TOOLRAG = "plan_success_with_toolrag"
TOOL_SET_ACCURACY = "tool_set_accuracy"
PLAN_PARSE_RATE = "plan_parse_rate"
STRICT_PLAN_SUCCESS = "strict_plan_success"
EMPTY_OUTPUT_RATE = "empty_output_rate"
PROMPTS_CUT = "prompts_cut"
EXAMPLES_OVER_MAX_LENGTH = "examples_over_max_length"
# JSON text of a few generated plans beside their targets.
SAMPLE_PLANS = "sample_plans"

# A rate's or a mean's 95% interval: f"{name}{CI_LOW}", f"{name}{CI_HIGH}".
CI_LOW = "_ci_low"
CI_HIGH = "_ci_high"

# What a trial costs, reported with every epoch.
CPU_SECONDS = "cpu_seconds"
GPU_SECONDS = "gpu_seconds"
TRAIN_FN_SECONDS = "train_fn_seconds"
DATA_PREP_SECONDS = "data_prep_seconds"
PADDING_WASTE = "padding_waste"
MEAN_INPUT_TOKENS = "mean_input_tokens"
WORLD_SIZE = "world_size"
# The epoch of the checkpoint a restarted worker group went on from (0: none).
RESUMED_FROM_EPOCH = "resumed_from_epoch"
# Where the report's checkpoint lives: set by Ray's callback, or by a trainer that reports an
# ended run's last epoch again.
CHECKPOINT_PATH = "checkpoint_path"


def interval(name: str) -> tuple[str, str]:
    """The names of `name`'s 95% interval bounds."""
    return name + CI_LOW, name + CI_HIGH
