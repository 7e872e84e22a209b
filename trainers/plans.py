"""Parsing LLMCompiler plans and scoring them with TinyAgent's own plan-success rule.

The paper's plan success rate (and so every figure we compare against) comes from the
evaluation helpers in SqueezeAILab/TinyAgent: `src/utils/plan_utils.py` (parsing,
`get_parsed_planner_output_from_raw`) and `src/utils/graph_utils.py` (`build_graph`,
`node_match`, `compare_graphs_with_success_rate`). `plan_success` re-implements that rule
from scratch; the behaviour, odd corners included, is meant to be identical, because those
corners move the figure. In short:

1. Steps are found by searching the whole text, not by reading it line by line, so prose
   between steps is skipped. A step is `<digits>. <name>(<args>)`: exactly one space after
   the dot, a word for the name, and for the arguments everything up to the LAST `)` on that
   line. A `Thought: ...` line directly before a step (blank space in between allowed) is
   swallowed together with it, so a call written on such a Thought line is not a step.
   A number seen again overwrites the earlier step with that number, which keeps its place
   in the order. Nothing after the first `join` step is read. No `join` is needed.
2. Argument text goes through `ast.literal_eval`. When that fails (keyword arguments,
   `false`, code, unbalanced text...) the whole argument text becomes one string argument;
   the step is not rejected. A value that is not a tuple or list becomes a one-element
   tuple, so `f(["$1", "$2"])` has the two strings as its top-level arguments. Empty text
   means no arguments.
3. The step list is cut at the first name that is neither one of the 16 tools nor `join`:
   that step and all later ones are dropped, and what remains is still scored.
4. References: a top-level string argument refers to the number in the FIRST `$<digits>` it
   contains, wherever it is (`"link: $2"` -> 2, `"pay $50"` -> 50); a top-level list
   contributes the same for each of its string items. Tuples, nested lists and non-strings
   are not looked into. `$k` means the k-th step kept, counted by position, not by the number
   written before it. A reference past the end, a step referring to itself, and a cycle of
   references all make TinyAgent raise (index error, its explicit self-dependency check,
   unbounded recursion), which counts as a failure. `$0` indexes position -1 in TinyAgent,
   i.e. the last step's content, but its graph edge comes from an extra node that carries no
   tool name, and matching that node raises: a plan with `$0` can never succeed. We reject it
   at parse time for that reason.
5. The plan is a directed graph: one node per kept step (join included) labelled with the
   tool name, and one edge per distinct (referenced step, referring step) pair. Every node
   also carries a dependency list with duplicates kept: one entry per reference, holding
   the referenced tool's name and that step's own dependency list, recursively.
6. Two plans match when `networkx.is_isomorphic` finds an isomorphism whose paired nodes
   have the same tool and equal dependency lists. Two dependency lists are equal when they
   have the same length and, once each is stably sorted by tool name only, agree entry by
   entry (tool name, then the nested lists by the same rule). Same-named entries therefore
   keep their written order, so this is not a plain multiset comparison.
7. Any exception on either side is a failure. Two texts that both yield no step at all give
   two empty graphs, which are isomorphic: TinyAgent counts that as a success. Dataset
   loading flags such targets (`target_problem`).

Safety bounds that TinyAgent does not have (each only matters for absurd inputs): a text
longer than MAX_PLAN_CHARS fails; more than MAX_STEPS kept steps fail; argument text longer
than MAX_ARGS_CHARS is not given to `ast.literal_eval` and is kept as one raw string, exactly
as TinyAgent's fallback keeps text it cannot evaluate (the results differ only if such a long
text was a valid literal). Model output is parsed, never evaluated. The step search is
written without backtracking-heavy regular expressions, because TinyAgent's pattern takes
time cubic in the length of a run of blank lines; it finds the same steps.

`tool_set_match` is an extra figure (same tools, ignoring wiring). The older, stricter
line-by-line parser is kept as `strict_parse_plan` / `strict_plan_success`: a separately
named figure, never the success rule.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from dataclasses import dataclass

import networkx as nx

from trainers.tools import END_OF_PLAN, JOIN_TOOL, PLAN_TOOL_NAMES

MAX_PLAN_CHARS = 20_000  # generated text past this is runaway output, not a plan
MAX_ARGS_CHARS = 4_000  # bounds what ast.literal_eval is given for one call
MAX_STEPS = 256  # kept steps; real plans have about ten

# The start of a step: a whole run of digits (never the tail of a longer run), a dot, one
# space, a word and an opening parenthesis. Possessive quantifiers: nothing to backtrack into.
_STEP_HEAD = re.compile(r"(?<!\d)(\d++)\. (\w++)\(")
_BLANK = re.compile(r"\s*+")
_THOUGHT = "Thought: "
_DOLLAR_NUMBER = re.compile(r"\$(\d+)")


class PlanError(ValueError):
    """Why a text is not a plan the scorer can use."""


@dataclass(frozen=True)
class PlanStep:
    """One step as the scorer sees it.

    number: the number written before the call (only used to merge repeated numbers).
    tool: the tool name, one of the 16 tools or `join`.
    args: the top-level arguments after TinyAgent's argument rule (see the module docstring).
    references: the `$k` values found in `args`, in argument order, duplicates kept. Each is a
        1-based position in the parsed plan (not a step number); parse_plan guarantees they
        are in range, never 0, never the step's own position and free of cycles.
    """

    number: int
    tool: str
    args: tuple
    references: tuple[int, ...]


# ---------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------


def _step_at(text: str, start: int) -> tuple[str, str, str, int] | None:
    """The step whose digits begin exactly at `start`: (digits, name, argument text, end)."""
    head = _STEP_HEAD.match(text, start)
    if head is None:
        return None
    return _complete_step(text, head)


def _complete_step(text: str, head: re.Match) -> tuple[str, str, str, int] | None:
    """Closes a step head at the last `)` of its line; None when the line has none."""
    open_paren = head.end()
    line_end = text.find("\n", open_paren)
    if line_end < 0:
        line_end = len(text)
    close = text.rfind(")", open_paren, line_end)
    if close < 0:
        return None
    return head.group(1), head.group(2), text[open_paren:close], close + 1


def _next_step(text: str, pos: int) -> tuple[int, str, str, str, int] | None:
    """The first step starting at or after pos: (start, digits, name, args, end)."""
    while True:
        head = _STEP_HEAD.search(text, pos)
        if head is None:
            return None
        step = _complete_step(text, head)
        if step is not None:
            return (head.start(), *step)
        # No `)` on the rest of this line, so no later head on it can close either.
        line_end = text.find("\n", head.end())
        if line_end < 0:
            return None
        pos = line_end + 1


def _step_after_thought(text: str, thought_start: int, cache: dict[int, tuple | None]):
    """The step that a `Thought: ...` line at thought_start is swallowed with, if any: the
    step must begin at the first non-blank character after the end of that line."""
    line_end = text.find("\n", thought_start)
    if line_end < 0:
        return None
    if line_end not in cache:
        cache[line_end] = _step_at(text, _BLANK.match(text, line_end + 1).end())
    return cache[line_end]


def _scan(text: str) -> list[tuple[str, str, str]]:
    """Every (digits, name, argument text) TinyAgent's search would find, in order, up to
    and including the first join. Matches its regular-expression search step for step:
    steps are taken left to right without overlap; a Thought line that is directly followed
    by a step is consumed together with that step (hiding any call written on the Thought
    line itself), while a Thought line followed by anything else is just text."""
    found: list[tuple[str, str, str]] = []
    thought_cache: dict[int, tuple | None] = {}
    pos = 0
    while True:
        step = _next_step(text, pos)
        limit = step[0] if step is not None else len(text)
        chosen = None
        thought = text.find(_THOUGHT, pos, limit)
        while thought >= 0 and chosen is None:
            chosen = _step_after_thought(text, thought, thought_cache)
            thought = text.find(_THOUGHT, thought + 1, limit)
        if chosen is None:
            if step is None:
                return found
            chosen = step[1:]
        digits, name, args, pos = chosen
        found.append((digits, name, args))
        if name == JOIN_TOOL:
            return found


def called_tools(text: str) -> set[str]:
    """Every name the scorer's search reads as a step anywhere in `text`: from each line on, so
    also past a `join` and in any document of a concatenation. Says whether a text holds a plan
    of some tools (the planner base's corpus must hold none of TinyAgent's)."""
    starts = [0] + [i + 1 for i, char in enumerate(text) if char == "\n"]
    return {name for start in starts for _, name, _ in _scan(text[start:])}


def _arguments(raw: str) -> tuple:
    """TinyAgent's argument rule: a literal when the text is one, else the raw text."""
    if raw == "":
        return ()
    value: object = raw
    if len(raw) <= MAX_ARGS_CHARS:
        try:
            value = ast.literal_eval(raw)
        except Exception:  # includes MemoryError and RecursionError from deep nesting
            value = raw
    if isinstance(value, (tuple, list)):
        return tuple(value)
    return (value,)


def _first_reference(value: str) -> int | None:
    match = _DOLLAR_NUMBER.search(value)
    return None if match is None else int(match.group(1))


def _references(args: tuple) -> tuple[int, ...]:
    """`$k` values of the top-level string arguments and of the string items of top-level
    lists (not tuples), the first one per string, in order, duplicates kept."""
    found: list[int | None] = []
    for arg in args:
        if isinstance(arg, list):
            found.extend(_first_reference(item) for item in arg if isinstance(item, str))
        elif isinstance(arg, str):
            found.append(_first_reference(arg))
    return tuple(k for k in found if k is not None)


def _dependency_signatures(steps: list[PlanStep], table: dict[tuple, int]) -> list[int]:
    """Per step, an id of its recursive dependency list such that two ids are equal exactly
    when TinyAgent's list comparison calls the lists equal. A list is a tuple of
    (tool, id of that step's list) pairs, stably sorted by tool name only, then numbered
    through `table` (shared by the plans being compared), so shared sub-plans are compared
    once instead of being unfolded. Raises PlanError on a cycle of references."""
    signature: list[int | None] = [None] * len(steps)
    state = [0] * len(steps)  # 0 unseen, 1 on the current path, 2 done
    for root in range(len(steps)):
        if state[root]:
            continue
        state[root] = 1
        stack = [(root, iter(steps[root].references))]
        while stack:
            index, pending = stack[-1]
            for k in pending:
                if state[k - 1] == 1:
                    raise PlanError(f"step {index + 1} is part of a cycle of references")
                if state[k - 1] == 0:
                    state[k - 1] = 1
                    stack.append((k - 1, iter(steps[k - 1].references)))
                    break
            else:
                stack.pop()
                state[index] = 2
                entries = sorted(((steps[k - 1].tool, signature[k - 1]) for k in steps[index].references),
                                 key=lambda entry: entry[0])
                signature[index] = table.setdefault(tuple(entries), len(table))
    return signature  # type: ignore[return-value]


def parse_plan(text: str) -> list[PlanStep]:
    """The steps TinyAgent's scorer builds its graph from (rules in the module docstring).

    Raises PlanError exactly where the scorer could never count the text a success: a
    reference past the end, `$0`, a step referring to itself, a cycle of references, a
    number too long for int(); and past the safety bounds (MAX_PLAN_CHARS, MAX_STEPS).
    Text without any step gives an empty list.
    """
    if len(text) > MAX_PLAN_CHARS:
        raise PlanError(f"plan text longer than {MAX_PLAN_CHARS} characters")
    try:
        found = _scan(text)
        merged: dict[int, tuple[str, str]] = {}
        for digits, name, raw_args in found:
            merged[int(digits)] = (name, raw_args)  # a repeated number keeps its first place
        steps: list[PlanStep] = []
        for number, (name, raw_args) in merged.items():
            if name not in PLAN_TOOL_NAMES:
                break  # the plan is cut here, not failed
            if len(steps) == MAX_STEPS:
                raise PlanError(f"more than {MAX_STEPS} steps")
            args = _arguments(raw_args)
            steps.append(PlanStep(number, name, args, _references(args)))
    except (ValueError, MemoryError, RecursionError) as error:  # int() of a huge digit run
        if isinstance(error, PlanError):
            raise
        raise PlanError(f"unreadable plan: {type(error).__name__}") from None
    for position, step in enumerate(steps, start=1):
        for k in step.references:
            if k == 0:
                raise PlanError(f"step {position} refers to $0, which the scorer can never match")
            if k > len(steps):
                raise PlanError(f"step {position} refers to ${k}, past the last of {len(steps)} steps")
            if k == position:
                raise PlanError(f"step {position} refers to itself")
    _dependency_signatures(steps, {})  # rejects cycles
    return steps


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------


def plan_graph(steps: list[PlanStep], table: dict[tuple, int] | None = None) -> nx.DiGraph:
    """The scorer's graph: nodes are 1-based positions with `tool` and `dependencies` (a
    signature id from `table`; pass the same table for graphs that will be compared)."""
    signatures = _dependency_signatures(steps, {} if table is None else table)
    graph = nx.DiGraph()
    for position, (step, signature) in enumerate(zip(steps, signatures), start=1):
        graph.add_node(position, tool=step.tool, dependencies=signature)
    for position, step in enumerate(steps, start=1):
        graph.add_edges_from((k, position) for k in step.references)
    return graph


def _node_label(node: dict) -> tuple[str, int]:
    return node["tool"], node["dependencies"]


def _same_plan(predicted: list[PlanStep], target: list[PlanStep]) -> bool:
    table: dict[tuple, int] = {}
    first, second = plan_graph(predicted, table), plan_graph(target, table)
    labels = lambda graph: Counter(_node_label(data) for _, data in graph.nodes(data=True))  # noqa: E731
    if len(first) != len(second) or labels(first) != labels(second):
        return False  # a necessary condition, checked before the general search
    return nx.is_isomorphic(first, second, node_match=lambda a, b: _node_label(a) == _node_label(b))


def plan_success(predicted: str, target: str) -> bool:
    """TinyAgent's plan success: True when both texts give scorer graphs that are isomorphic
    with matching tools and dependency lists. Any problem on either side is False; never
    raises. Two texts without any step count as a success, as in TinyAgent."""
    try:
        return _same_plan(parse_plan(predicted), parse_plan(target))
    except Exception:
        return False


def target_problem(text: str) -> str | None:
    """None when a target plan is usable by the scorer (parses to at least one step and a
    graph can be built); otherwise a short reason, for counting bad targets at load time."""
    try:
        steps = parse_plan(text)
        if not steps:
            return "parses to an empty plan"
        plan_graph(steps)
    except PlanError as error:
        return f"does not parse: {error}"
    except Exception as error:  # never expected; reported rather than raised
        return f"does not parse: {type(error).__name__}"
    return None


def tool_set_match(predicted: str, target: str) -> bool:
    """True when both texts parse (scorer's parser) to non-empty plans calling the same set
    of tools, join excluded. Wiring and counts do not matter. Never raises."""
    try:
        predicted_steps, target_steps = parse_plan(predicted), parse_plan(target)
    except Exception:
        return False
    if not predicted_steps or not target_steps:
        return False
    tools = lambda steps: {s.tool for s in steps if s.tool != JOIN_TOOL}  # noqa: E731
    return tools(predicted_steps) == tools(target_steps)


# ---------------------------------------------------------------------------------------
# The strict parser: a separate, stricter figure, never the success rule
# ---------------------------------------------------------------------------------------

STRICT_MAX_STEPS = 64
_STRICT_CALL_LINE = re.compile(r"^\s*(\d+)\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*$", re.DOTALL)
_STRICT_REFERENCE = re.compile(r"^\$(\d+)$")


@dataclass(frozen=True)
class StrictPlanStep:
    number: int
    tool: str
    depends_on: frozenset[int]


def _strict_references(value: object) -> set[int]:
    """`$N` strings, alone or inside a list/tuple, anywhere in an argument."""
    if isinstance(value, str):
        match = _STRICT_REFERENCE.match(value.strip())
        return {int(match.group(1))} if match else set()
    if isinstance(value, (list, tuple)):
        found: set[int] = set()
        for item in value:
            found |= _strict_references(item)
        return found
    return set()


def strict_parse_plan(text: str) -> list[StrictPlanStep]:
    """Steps of a plan read line by line; raises PlanError unless every non-blank line
    (Thought lines aside) is a numbered call of a known tool with literal arguments, numbers
    increase, each `$N` names an earlier step and the plan ends with join()."""
    if len(text) > MAX_PLAN_CHARS:
        raise PlanError("plan text too long")
    body = text.split(END_OF_PLAN, 1)[0]
    steps: list[StrictPlanStep] = []
    for line in body.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("Thought:"):
            continue
        match = _STRICT_CALL_LINE.match(stripped)
        if match is None:
            raise PlanError(f"not a numbered call: {stripped[:80]!r}")
        number, tool, raw_args = int(match.group(1)), match.group(2), match.group(3).strip()
        if tool not in PLAN_TOOL_NAMES:
            raise PlanError(f"unknown tool {tool!r}")
        if len(raw_args) > MAX_ARGS_CHARS:
            raise PlanError(f"arguments of step {number} too long")
        try:
            args = ast.literal_eval(f"({raw_args},)") if raw_args else ()
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            raise PlanError(f"arguments of step {number} are not Python literals") from None
        depends_on = frozenset(_strict_references(list(args)))
        if steps and number <= steps[-1].number:
            raise PlanError(f"step {number} does not follow step {steps[-1].number}")
        known = {step.number for step in steps}
        missing = depends_on - known
        if missing:
            raise PlanError(f"step {number} refers to ${min(missing)}, which does not precede it")
        steps.append(StrictPlanStep(number, tool, depends_on))
        if len(steps) > STRICT_MAX_STEPS:
            raise PlanError("too many steps")
        if tool == JOIN_TOOL:
            break  # anything after join() is not part of the plan
    if not steps or steps[-1].tool != JOIN_TOOL:
        raise PlanError("no join() call")
    return steps


def _strict_graph(steps: list[StrictPlanStep]) -> nx.DiGraph:
    graph = nx.DiGraph()
    for step in steps:
        graph.add_node(step.number, tool=step.tool)
        graph.add_edges_from((dependency, step.number) for dependency in step.depends_on)
    return graph


def strict_plan_success(predicted: str, target: str) -> bool:
    """The strict figure: both texts pass strict_parse_plan and their graphs are isomorphic
    with nodes matched on tool name only. Never raises."""
    try:
        predicted_steps, target_steps = strict_parse_plan(predicted), strict_parse_plan(target)
    except PlanError:
        return False
    if len(predicted_steps) != len(target_steps):
        return False
    return nx.is_isomorphic(_strict_graph(predicted_steps), _strict_graph(target_steps),
                            node_match=lambda a, b: a["tool"] == b["tool"])
