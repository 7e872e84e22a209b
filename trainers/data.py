"""Loading and validating TinyAgent-format data, and turning it into training examples.

The published dataset is two JSON files (training_data.json, testing_data.json), each one
object mapping a record key to {"input", "output": [data points]}. Every record is checked
once, in the search driver, before Ray starts: a bad record is reported by file, record key
and field, so the user can fix it, and trials only ever see clean examples.

The published data has no validation split, and selecting epochs or trials on the test split
makes its interval say nothing. So a validation split is carved from the training file,
deterministically by record key and whole query groups at a time (see `carve_validation`).
What cannot be prevented in user data is counted: test queries that also occur in train,
and target plans the scorer cannot parse.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainers.plans import target_problem
from trainers.tools import JOIN_TOOL, PLAN_TOOL_NAMES, tools_to_label_vector

HUB_DATASET_ID = "squeeze-ai-lab/TinyAgent-dataset"
SPLIT_FILES = {"train": "training_data.json", "test": "testing_data.json"}
# raw_input strings are parsed with ast.literal_eval; the cap keeps a hostile or corrupt
# file from making the parser allocate without bound. Real planner prompts are ~10 KB.
MAX_RAW_INPUT_CHARS = 200_000
POINT_TYPES = ("plan", "join", "replan")
DEFAULT_VAL_FRACTION = 0.1
_NOT_WORD = re.compile(r"[\W_]+")


class DataError(ValueError):
    """A dataset problem the user can fix; the message names file, record and field."""


@dataclass(frozen=True)
class Example:
    """One usable record: what both models train on.

    `tools` is the ToolRAG label (tool names of the plan, join excluded); `messages` and
    `plan` are the planner's input and target (plan text without <END_OF_PLAN>).
    """

    key: str
    query: str
    tools: tuple[str, ...]
    messages: tuple[tuple[str, str], ...]
    plan: str

    @property
    def label_vector(self) -> list[float]:
        return tools_to_label_vector(self.tools)


@dataclass
class SplitReport:
    file: str
    examples: list[Example] = field(default_factory=list)
    skipped_invalid: int = 0
    skipped_without_plan: int = 0
    first_error: str | None = None
    # Target plans the scorer cannot parse (or that parse to no step): every trial would fail
    # those examples whatever it writes.
    unparseable_targets: int = 0
    skipped_unparseable: int = 0
    first_unparseable: str | None = None


def _fail(path: Path, key: str, field_name: str, problem: str) -> DataError:
    return DataError(f"{path}: record {key!r}: field {field_name}: {problem}")


def parse_messages(raw_input: str) -> list[dict[str, str]]:
    """Parse a raw_input string (the Python repr of a message list) without evaluating it.

    Raises ValueError with a short reason when it is not a list of {'role', 'content'} dicts.
    """
    if len(raw_input) > MAX_RAW_INPUT_CHARS:
        raise ValueError(f"longer than {MAX_RAW_INPUT_CHARS} characters")
    try:
        messages = ast.literal_eval(raw_input)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as error:
        raise ValueError(f"not a Python literal ({type(error).__name__})") from None
    if not isinstance(messages, list) or not messages:
        raise ValueError("not a non-empty list of messages")
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(
            message.get("content"), str
        ):
            raise ValueError(f"message {position} is not a {{'role': str, 'content': str}} dict")
    return messages


def _validate_record(path: Path, key: str, record: Any) -> Example | None:
    """Check one record against the published format; None when it has no plan point."""
    if not isinstance(record, dict):
        raise _fail(path, key, "<record>", "must be an object")
    query = record.get("input")
    if not isinstance(query, str) or not query.strip():
        raise _fail(path, key, "input", "must be a non-empty string")
    points = record.get("output")
    if not isinstance(points, list):
        raise _fail(path, key, "output", "must be a list of data points")
    closest = record.get("closest_5_queries")
    if closest is not None and not (isinstance(closest, list) and all(isinstance(q, str) for q in closest)):
        raise _fail(path, key, "closest_5_queries", "must be a list of strings")
    example = None
    for position, point in enumerate(points):
        where = f"output[{position}]"
        if not isinstance(point, dict):
            raise _fail(path, key, where, "must be an object")
        point_type = point.get("type")
        if point_type not in POINT_TYPES:
            raise _fail(path, key, f"{where}.type", f"must be one of {', '.join(POINT_TYPES)}, got {point_type!r}")
        for text_field in ("raw_input", "raw_output"):
            if not isinstance(point.get(text_field), str):
                raise _fail(path, key, f"{where}.{text_field}", "must be a string")
        try:
            messages = parse_messages(point["raw_input"])
        except ValueError as error:
            raise _fail(path, key, f"{where}.raw_input", str(error)) from None
        parsed = point.get("parsed_output")
        if point_type == "plan":
            if not isinstance(parsed, list) or not parsed:
                raise _fail(path, key, f"{where}.parsed_output", "must be a non-empty list of calls for a plan")
            tools = []
            for call_position, call in enumerate(parsed):
                call_where = f"{where}.parsed_output[{call_position}]"
                if not isinstance(call, dict) or not isinstance(call.get("tool_name"), str):
                    raise _fail(path, key, f"{call_where}.tool_name", "must be a string")
                if call["tool_name"] not in PLAN_TOOL_NAMES:
                    raise _fail(path, key, f"{call_where}.tool_name", f"unknown tool {call['tool_name']!r}")
                if not isinstance(call.get("tool_args", []), (list, dict)):
                    raise _fail(path, key, f"{call_where}.tool_args", "must be a list")
                if call["tool_name"] != JOIN_TOOL:
                    tools.append(call["tool_name"])
            if example is None:  # the first plan point is the one both models learn from
                example = Example(
                    key=key,
                    query=query,
                    tools=tuple(sorted(set(tools))),
                    messages=tuple((m["role"], m["content"]) for m in messages),
                    plan=point["raw_output"],
                )
        elif not isinstance(parsed, dict):
            raise _fail(path, key, f"{where}.parsed_output", f"must be an object for a {point_type} point")
    return example


def load_split(path: Path, skip_invalid: bool = False) -> SplitReport:
    """Load and validate one published JSON file.

    Raises DataError on the first bad record unless skip_invalid, in which case bad records
    are counted in the report and left out. A record whose target plan the scorer cannot parse
    is counted either way, and left out only with skip_invalid.
    """
    report = SplitReport(file=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read: {error}") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to be TinyAgent data") from None
    if not isinstance(records, dict):
        raise DataError(f"{path}: top level must be an object mapping record keys to records")
    for key, record in records.items():
        try:
            example = _validate_record(path, key, record)
        except DataError as error:
            if not skip_invalid:
                raise
            report.skipped_invalid += 1
            report.first_error = report.first_error or str(error)
            continue
        if example is None:
            report.skipped_without_plan += 1
            continue
        problem = target_problem(example.plan)
        if problem is not None:
            report.unparseable_targets += 1
            report.first_unparseable = report.first_unparseable or f"{path}: record {key!r}: raw_output: {problem}"
            if skip_invalid:
                report.skipped_unparseable += 1
                continue
        report.examples.append(example)
    if not report.examples:
        raise DataError(f"{path}: no usable record (every record lacks a plan point or is invalid)")
    return report


def fingerprint_files(paths: list[Path]) -> str:
    """Content hash of the data files: names caches and tags MLflow runs."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def split_digest(examples: list[Example]) -> str:
    """Content hash of one split's examples (keys, queries, tools, plans), in order: what MLflow
    shows as the digest of the split it records as a dataset input."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.key, example.query, list(example.tools), example.plan]).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:12]


def normalize_query(query: str) -> str:
    """The form in which two queries count as the same: case, punctuation and spacing ignored."""
    return _NOT_WORD.sub(" ", query.casefold()).strip()


def _unit_hash(text: str) -> float:
    """A number in [0, 1) fixed by `text` alone (not by Python's per-process hash seed)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def carve_validation(train: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """(what stays in train, validation): a deterministic split of the training examples.

    Records that share a normalised query go to the same side, so validation never holds a
    query that train also holds. A group goes to validation when the hash of its smallest
    record key falls below `fraction`: the split depends on record keys only, not on file
    order, and adding records elsewhere does not move a group. At least one group is kept
    on each side when there are two or more.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be between 0 and 1, got {fraction}")
    queries = [normalize_query(e.query) for e in train]
    smallest_key: dict[str, str] = {}
    for example, query in zip(train, queries):
        smallest_key[query] = min(smallest_key.get(query, example.key), example.key)
    draws = {query: _unit_hash(key) for query, key in smallest_key.items()}
    chosen = {query for query, draw in draws.items() if draw < fraction}
    if len(draws) >= 2:
        ordered = sorted(draws, key=draws.__getitem__)
        if not chosen:
            chosen = {ordered[0]}
        elif len(chosen) == len(draws):
            chosen.discard(ordered[-1])
    kept = [e for e, query in zip(train, queries) if query not in chosen]
    validation = [e for e, query in zip(train, queries) if query in chosen]
    return kept, validation


def queries_also_in(examples: list[Example], others: list[Example]) -> int:
    """How many of `examples` have a query (normalised) that also occurs in `others`."""
    seen = {normalize_query(e.query) for e in others}
    return sum(normalize_query(e.query) in seen for e in examples)


@dataclass
class Dataset:
    """The three splits, validated, with where they came from and what could not be prevented.

    `val` is carved from the training file (see `carve_validation`); `train` is what remains.
    """

    train: list[Example]
    test: list[Example]
    source: str
    fingerprint: str
    val: list[Example] = field(default_factory=list)
    val_fraction: float = DEFAULT_VAL_FRACTION
    skipped_invalid: int = 0
    skipped_without_plan: int = 0
    # Test queries (normalised) that also occur in what the trials train on.
    test_queries_in_train: int = 0
    unparseable_targets: int = 0
    skipped_unparseable: int = 0
    first_unparseable: str | None = None

    @property
    def split_fingerprint(self) -> str:
        """Names caches of anything derived from the splits (tokens, the planner's base): the
        files' content and the validation fraction that carved them."""
        return f"{self.fingerprint}-val{self.val_fraction:g}"


def load_dataset_dir(data_dir: Path, skip_invalid: bool = False,
                     val_fraction: float = DEFAULT_VAL_FRACTION) -> Dataset:
    """Load training_data.json and testing_data.json from a directory, and carve validation
    out of the training file."""
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a directory holding {' and '.join(SPLIT_FILES.values())}")
    paths = {split: data_dir / name for split, name in SPLIT_FILES.items()}
    for path in paths.values():
        if not path.is_file():
            raise DataError(f"{path}: file not found (a data directory holds {' and '.join(SPLIT_FILES.values())})")
    reports = {split: load_split(path, skip_invalid) for split, path in paths.items()}
    train, val = carve_validation(reports["train"].examples, val_fraction)
    if not val or not train:
        raise DataError(f"{paths['train']}: too few distinct queries to carve a validation split "
                        f"(fraction {val_fraction}) and keep some to train on")
    return Dataset(
        train=train,
        val=val,
        val_fraction=val_fraction,
        test=reports["test"].examples,
        source=str(data_dir.resolve()),
        fingerprint=fingerprint_files(list(paths.values())),
        skipped_invalid=sum(r.skipped_invalid for r in reports.values()),
        skipped_without_plan=sum(r.skipped_without_plan for r in reports.values()),
        test_queries_in_train=queries_also_in(reports["test"].examples, train),
        unparseable_targets=sum(r.unparseable_targets for r in reports.values()),
        skipped_unparseable=sum(r.skipped_unparseable for r in reports.values()),
        first_unparseable=next((r.first_unparseable for r in reports.values() if r.first_unparseable), None),
    )


def query_label_split(examples: list[Example]) -> dict[str, list]:
    """A split as ToolRAG trainers read it: the queries and their 16-float label rows."""
    return {"queries": [e.query for e in examples], "labels": [e.label_vector for e in examples]}


def message_plan_split(examples: list[Example]) -> list[dict[str, Any]]:
    """A split as the planner reads it: each record's messages and its target plan."""
    return [{"messages": [list(m) for m in e.messages], "plan": e.plan} for e in examples]
