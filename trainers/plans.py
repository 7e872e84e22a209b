"""Parsing LLMCompiler plans and scoring them the way the paper does.

A plan succeeds when its dependency graph is isomorphic to the target's: one node per call
(join included) labelled with the tool name, an edge i -> j when call j's arguments refer to
`$i`. Argument values other than references, step numbers and the order of independent
steps do not count. Output that cannot be parsed, names an unknown tool, refers to a step
that does not precede it, or lacks `join()` fails; it never raises.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

import networkx as nx

from trainers.tools import END_OF_PLAN, JOIN_TOOL, PLAN_TOOL_NAMES

MAX_PLAN_CHARS = 20_000  # generated text past this is truncated garbage, not a plan
MAX_ARGS_CHARS = 4_000  # bounds what ast.literal_eval is given for one call
MAX_STEPS = 64
CALL_LINE = re.compile(r"^\s*(\d+)\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*$", re.DOTALL)
REFERENCE = re.compile(r"^\$(\d+)$")


@dataclass(frozen=True)
class PlanStep:
    number: int
    tool: str
    depends_on: frozenset[int]


class PlanError(ValueError):
    """Why a text is not a valid plan."""


def _references(value: object) -> set[int]:
    """`$N` strings, alone or inside a list/tuple, anywhere in an argument."""
    if isinstance(value, str):
        match = REFERENCE.match(value.strip())
        return {int(match.group(1))} if match else set()
    if isinstance(value, (list, tuple)):
        found: set[int] = set()
        for item in value:
            found |= _references(item)
        return found
    return set()


def parse_plan(text: str) -> list[PlanStep]:
    """Steps of a plan text; raises PlanError with the reason when it is not a valid plan."""
    if len(text) > MAX_PLAN_CHARS:
        raise PlanError("plan text too long")
    body = text.split(END_OF_PLAN, 1)[0]
    steps: list[PlanStep] = []
    for line in body.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("Thought:"):
            continue
        match = CALL_LINE.match(stripped)
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
        depends_on = frozenset(_references(list(args)))
        if steps and number <= steps[-1].number:
            raise PlanError(f"step {number} does not follow step {steps[-1].number}")
        known = {step.number for step in steps}
        missing = depends_on - known
        if missing:
            raise PlanError(f"step {number} refers to ${min(missing)}, which does not precede it")
        steps.append(PlanStep(number, tool, depends_on))
        if len(steps) > MAX_STEPS:
            raise PlanError("too many steps")
        if tool == JOIN_TOOL:
            break  # anything after join() is not part of the plan
    if not steps or steps[-1].tool != JOIN_TOOL:
        raise PlanError("no join() call")
    return steps


def plan_graph(steps: list[PlanStep]) -> nx.DiGraph:
    graph = nx.DiGraph()
    for step in steps:
        graph.add_node(step.number, tool=step.tool)
        graph.add_edges_from((dependency, step.number) for dependency in step.depends_on)
    return graph


def _try_parse(text: str) -> list[PlanStep] | None:
    try:
        return parse_plan(text)
    except PlanError:
        return None


def plan_success(predicted: str, target: str) -> bool:
    """True when the predicted plan's dependency graph is isomorphic to the target's, with
    nodes matched on tool name. Any invalid plan, on either side, is a failure."""
    predicted_steps, target_steps = _try_parse(predicted), _try_parse(target)
    if predicted_steps is None or target_steps is None or len(predicted_steps) != len(target_steps):
        return False
    return nx.is_isomorphic(plan_graph(predicted_steps), plan_graph(target_steps),
                            node_match=lambda a, b: a["tool"] == b["tool"])


def tool_set_match(predicted: str, target: str) -> bool:
    """True when both are valid plans calling the same set of tools (join excluded)."""
    predicted_steps, target_steps = _try_parse(predicted), _try_parse(target)
    if predicted_steps is None or target_steps is None:
        return False
    tools = lambda steps: {s.tool for s in steps if s.tool != JOIN_TOOL}  # noqa: E731
    return tools(predicted_steps) == tools(target_steps)
