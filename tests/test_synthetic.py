"""The synthetic generator: deterministic, realistic label statistics, and the published format."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainers import synthetic
from trainers.data import load_dataset_dir, normalize_query, parse_messages
from trainers.tools import END_OF_PLAN, TOOL_NAMES

NUM_TRAIN, NUM_TEST = 2000, 500  # the documented defaults of write_dataset
CALL_LINE = re.compile(r"^(\d+)\. ([a-z_]+)\((.*)\)$")
REFERENCE = re.compile(r"\$(\d+)")


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    """write_dataset with its default sizes, once for the module."""
    folder = tmp_path_factory.mktemp("synthetic")
    stats = synthetic.write_dataset(folder)
    return folder, stats


@pytest.fixture(scope="module")
def splits(written) -> dict[str, dict]:
    folder, _ = written
    return {
        "train": json.loads((folder / "training_data.json").read_text()),
        "test": json.loads((folder / "testing_data.json").read_text()),
    }


def all_records(splits):
    for split, records in splits.items():
        for key, record in records.items():
            yield split, key, record


def plan_point(record: dict) -> dict:
    plans = [p for p in record["output"] if p["type"] == "plan"]
    assert plans, "record without a plan point"
    return plans[0]


def plan_tools(record: dict) -> set[str]:
    return {call["tool_name"] for call in plan_point(record)["parsed_output"]} - {"join"}


def strings_in(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in strings_in(item)]
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings_in(item)]
    return []


# --- determinism ----------------------------------------------------------------------------


def digest(data) -> str:
    """Compare big outputs by hash: pytest's diff of two megabyte strings would take minutes."""
    if not isinstance(data, bytes):
        data = json.dumps(data).encode()
    return hashlib.sha256(data).hexdigest()


def test_same_seed_gives_identical_json():
    first = synthetic.generate_split(300, seed=3, split="train")
    second = synthetic.generate_split(300, seed=3, split="train")
    assert digest(first) == digest(second)


def test_different_seed_gives_different_json():
    first = synthetic.generate_split(300, seed=3, split="train")
    second = synthetic.generate_split(300, seed=4, split="train")
    assert digest(first) != digest(second)
    # The requests themselves differ, not only the shared prompt text.
    assert [r["input"] for r in first.values()] != [r["input"] for r in second.values()]
    assert [plan_point(r)["raw_output"] for r in first.values()] != [
        plan_point(r)["raw_output"] for r in second.values()
    ]


def test_train_and_test_splits_differ_for_one_seed():
    train = synthetic.generate_split(50, seed=3, split="train")
    test = synthetic.generate_split(50, seed=3, split="test")
    assert [r["input"] for r in train.values()] != [r["input"] for r in test.values()]


def test_write_dataset_is_byte_identical_for_a_seed(tmp_path):
    synthetic.write_dataset(tmp_path / "a", num_train=150, num_test=50, seed=11)
    synthetic.write_dataset(tmp_path / "b", num_train=150, num_test=50, seed=11)
    synthetic.write_dataset(tmp_path / "c", num_train=150, num_test=50, seed=12)
    for name in ("training_data.json", "testing_data.json"):
        a, b, c = (digest((tmp_path / d / name).read_bytes()) for d in "abc")
        assert a == b
        assert a != c


def test_output_does_not_depend_on_the_process_hash_seed():
    """Same seed in another interpreter (different PYTHONHASHSEED) gives the same bytes."""
    code = (
        "import hashlib, json; from trainers import synthetic; "
        "print(hashlib.sha256(json.dumps(synthetic.generate_split(200, 5, 'test')).encode()).hexdigest())"
    )
    here = digest(synthetic.generate_split(200, 5, "test"))
    env = {**os.environ, "PYTHONHASHSEED": "12345" if os.environ.get("PYTHONHASHSEED") != "12345" else "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here


def test_record_count_and_keys_follow_the_requested_size():
    records = synthetic.generate_split(37, seed=0, split="test")
    assert len(records) == 37
    assert len(set(records)) == 37
    assert all(key.startswith("test-") for key in records)


# --- label statistics at the default sizes --------------------------------------------------


def test_default_sizes(written, splits):
    assert len(splits["train"]) == NUM_TRAIN
    assert len(splits["test"]) == NUM_TEST


@pytest.mark.parametrize("split", ["train", "test"])
def test_mean_distinct_tools_per_query_is_realistic(splits, split):
    records = splits[split].values()
    mean = sum(len(plan_tools(r)) for r in records) / len(records)
    assert 2.0 <= mean <= 3.5, mean


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_tool_appears_in_at_least_two_percent_of_records(splits, split):
    records = list(splits[split].values())
    for tool in TOOL_NAMES:
        share = sum(tool in plan_tools(r) for r in records) / len(records)
        assert share >= 0.02, f"{tool} is in only {share:.1%} of {split} records"


def test_returned_statistics_match_the_written_files(written, splits):
    _, stats = written
    for split, records in splits.items():
        tool_sets = [plan_tools(r) for r in records.values()]
        assert stats[split]["records"] == len(records)
        assert stats[split]["mean_tools_per_query"] == pytest.approx(
            sum(map(len, tool_sets)) / len(tool_sets)
        )
        for tool in TOOL_NAMES:
            assert stats[split]["tool_share"][tool] == pytest.approx(
                sum(tool in s for s in tool_sets) / len(tool_sets)
            )


def test_only_known_tools_are_used(splits):
    for _, key, record in all_records(splits):
        for call in plan_point(record)["parsed_output"]:
            assert call["tool_name"] in set(TOOL_NAMES) | {"join"}, key


# --- plan text and parsed plan ---------------------------------------------------------------


def test_raw_output_ends_with_a_numbered_join(splits):
    for _, key, record in all_records(splits):
        text = plan_point(record)["raw_output"]
        assert END_OF_PLAN not in text, key  # the marker is appended at training time
        call_lines = [line for line in text.splitlines() if not line.startswith("Thought: ")]
        numbers = [int(CALL_LINE.match(line).group(1)) for line in call_lines]
        assert numbers == list(range(1, len(call_lines) + 1)), key
        assert text.splitlines()[-1] == f"{len(call_lines)}. join()", key


def test_raw_output_lines_match_parsed_output(splits):
    for _, key, record in all_records(splits):
        point = plan_point(record)
        call_lines = [line for line in point["raw_output"].splitlines() if not line.startswith("Thought: ")]
        names = [CALL_LINE.match(line).group(2) for line in call_lines]
        assert names == [call["tool_name"] for call in point["parsed_output"]], key
        assert point["parsed_output"][-1] == {"tool_name": "join", "tool_args": []}, key
        assert all(c["tool_name"] != "join" for c in point["parsed_output"][:-1]), key


def test_references_only_point_at_earlier_steps(splits):
    seen_reference = False
    for _, key, record in all_records(splits):
        for step, call in enumerate(plan_point(record)["parsed_output"], start=1):
            for text in strings_in(call["tool_args"]):
                for number in REFERENCE.findall(text):
                    seen_reference = True
                    assert 1 <= int(number) < step, f"{key}: step {step} references ${number}"
    assert seen_reference, "no plan uses a $N reference: dependencies are missing"


def test_raw_output_references_only_point_at_earlier_lines(splits):
    for _, key, record in all_records(splits):
        for line in plan_point(record)["raw_output"].splitlines():
            match = CALL_LINE.match(line)
            if match:
                step = int(match.group(1))
                assert all(1 <= int(n) < step for n in REFERENCE.findall(match.group(3))), (key, line)


# --- messages, points, and loading back ------------------------------------------------------


def test_raw_input_is_system_then_question(splits):
    for _, key, record in all_records(splits):
        point = plan_point(record)
        assert point["raw_input"].startswith("[{'role': 'system'"), key  # Python repr, not JSON
        messages = parse_messages(point["raw_input"])
        assert [m["role"] for m in messages] == ["system", "user"], key
        assert messages[1]["content"] == f"Question: {record['input']}", key
        assert record["input"].strip(), key


def test_system_prompt_lists_every_tool_and_join(splits):
    record = next(iter(splits["train"].values()))
    system = parse_messages(plan_point(record)["raw_input"])[0]["content"]
    for name in (*TOOL_NAMES, "join"):
        assert f"{name}(" in system


def test_each_record_has_a_plan_point_and_a_join_point(splits):
    for _, key, record in all_records(splits):
        types = [point["type"] for point in record["output"]]
        assert types.count("plan") == 1 and types.count("join") == 1, key
        join = next(p for p in record["output"] if p["type"] == "join")
        assert join["parsed_output"]["action"] in ("Finish", "Replan"), key
        assert isinstance(join["raw_output"], str) and join["raw_output"], key
        parse_messages(join["raw_input"])  # raises ValueError if it is not a message list


def test_written_files_load_back(written, splits):
    folder, _ = written
    dataset = load_dataset_dir(folder)
    assert len(dataset.train) + len(dataset.val) == NUM_TRAIN
    assert len(dataset.test) == NUM_TEST
    assert dataset.skipped_invalid == 0
    assert dataset.skipped_without_plan == 0
    assert dataset.unparseable_targets == 0, "every generated target parses with TinyAgent's parser"
    for split, examples in (("train", dataset.train), ("train", dataset.val), ("test", dataset.test)):
        for example in examples:
            record = splits[split][example.key]
            assert example.query == record["input"]
            assert set(example.tools) == plan_tools(record)
            assert example.plan == plan_point(record)["raw_output"]
            assert sum(example.label_vector) == len(plan_tools(record))


def test_write_dataset_leaves_no_temporary_files(written):
    folder, _ = written
    assert sorted(p.name for p in folder.iterdir()) == ["testing_data.json", "training_data.json"]


def test_no_validation_or_test_query_occurs_in_train_and_no_query_plan_pair_crosses_splits(written):
    """Leakage, checked on the loaded splits: normalised queries of validation and test are
    absent from what the trials train on, and no identical (query, plan) pair is in two splits."""
    folder, _ = written
    dataset = load_dataset_dir(folder)
    assert len(dataset.val) > 0
    queries = {name: {normalize_query(e.query) for e in examples}
               for name, examples in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test))}
    assert not queries["val"] & queries["train"]
    assert not queries["test"] & queries["train"]
    assert not queries["test"] & queries["val"]
    pairs = {name: {(normalize_query(e.query), e.plan) for e in examples}
             for name, examples in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test))}
    assert not (pairs["train"] & pairs["val"]) and not (pairs["train"] & pairs["test"]) and not (pairs["val"] & pairs["test"])
    assert dataset.test_queries_in_train == 0


def test_the_generator_would_repeat_test_queries_in_train_without_the_exclusion():
    """The exclusion above is doing work: drawn alone, train repeats some test queries."""
    test = synthetic.generate_split(NUM_TEST, 0, "test")
    unfiltered = synthetic.generate_split(NUM_TRAIN, 0, "train")
    test_queries = {normalize_query(r["input"]) for r in test.values()}
    assert sum(normalize_query(r["input"]) in test_queries for r in unfiltered.values()) > 0
    filtered = synthetic.generate_split(NUM_TRAIN, 0, "train", frozenset(test_queries))
    assert not any(normalize_query(r["input"]) in test_queries for r in filtered.values())
