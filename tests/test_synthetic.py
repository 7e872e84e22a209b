"""The synthetic generator: deterministic, realistic label statistics, TinyAgent's plan shapes,
context-dependent tools, no keyword shortcut, and the published format."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import random

from trainers import synthetic
from trainers.data import load_dataset_dir, normalize_query, parse_messages
from trainers.plans import parse_plan, plan_success
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
def test_mean_distinct_tools_per_query_is_in_the_calibrated_range(splits, split):
    """2.5 to 3.5 gold tools per query: the range the calibration aims at (docs/data.md, Generated data)."""
    records = splits[split].values()
    mean = sum(len(plan_tools(r)) for r in records) / len(records)
    assert 2.5 <= mean <= 3.5, mean


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


# --- plans shaped like TinyAgent's ------------------------------------------------------------


def all_plans(splits):
    return [(key, plan_point(record)) for _, key, record in all_records(splits)]


def test_every_generated_plan_parses_under_the_papers_scorer_as_written(splits):
    """TinyAgent's parser reads every target: one step per call plus join, the same tools in the
    same order, the `$N` references the arguments hold (in a list, alone, or inside text), and
    each target matches itself under the scorer's graph rule."""
    for key, point in all_plans(splits):
        steps = parse_plan(point["raw_output"])
        assert [s.tool for s in steps] == [c["tool_name"] for c in point["parsed_output"]], key
        for step, call in zip(steps, point["parsed_output"]):
            written = [int(n) for text in strings_in(call["tool_args"]) for n in REFERENCE.findall(text)]
            assert sorted(step.references) == sorted(written), (key, call)
        assert plan_success(point["raw_output"], point["raw_output"]), key


def test_plans_have_1_to_8_calls_and_long_plans_occur(splits):
    lengths = Counter(len(point["parsed_output"]) - 1 for _, point in all_plans(splits))
    assert min(lengths) == 1 and max(lengths) == synthetic.MAX_CALLS == 8, lengths
    assert sum(n for length, n in lengths.items() if length >= 6) >= 0.05 * sum(lengths.values()), lengths


def test_fan_in_lists_of_several_references_occur(splits):
    """A call whose list argument holds two or more results (the paper's two-invitee example)."""
    fan_ins = [key for key, point in all_plans(splits) for call in point["parsed_output"]
               for arg in call["tool_args"]
               if isinstance(arg, list) and sum(bool(REFERENCE.fullmatch(str(item))) for item in arg) >= 2]
    assert len(fan_ins) >= 0.05 * len(all_plans(splits)), len(fan_ins)


def test_references_inside_text_occur_for_links_and_summaries(splits):
    """A result inside a longer string: a Zoom link or a summary in a message body or note."""
    inside = Counter()
    for _, point in all_plans(splits):
        calls = point["parsed_output"]
        for call in calls:
            for text in (a for a in call["tool_args"] if isinstance(a, str)):
                for number in REFERENCE.findall(text):
                    if text != f"${number}":
                        inside[calls[int(number) - 1]["tool_name"]] += 1
    assert inside["get_zoom_meeting_link"] >= 20 and inside["summarize_pdf"] >= 20, inside


def test_dependencies_cross_intents():
    """A later intent uses an earlier one's result (the link of a meeting in a text, the file
    of one clause attached in another)."""
    rng = random.Random(5)
    crossing = 0
    for _ in range(500):
        request = synthetic.draw_request(rng)
        for call in request.calls:
            for text in strings_in(call.args):
                crossing += any(request.calls[int(n) - 1].intent != call.intent for n in REFERENCE.findall(text))
    assert crossing >= 25, crossing


def test_thought_lines_sit_only_right_before_join_as_in_tinyagents_examples(splits):
    thoughts = 0
    for key, point in all_plans(splits):
        lines = point["raw_output"].splitlines()
        for position, line in enumerate(lines):
            if line.startswith("Thought: "):
                thoughts += 1
                assert position == len(lines) - 2 and lines[-1].endswith(". join()"), key
    assert thoughts >= 0.5 * len(all_plans(splits))


def test_the_same_tool_appears_twice_in_some_plans(splits):
    repeated = sum(max(Counter(c["tool_name"] for c in point["parsed_output"]).values()) >= 2
                   for _, point in all_plans(splits))
    assert repeated >= 0.1 * len(all_plans(splits)), repeated


# --- context decides the tools ----------------------------------------------------------------


def _requests(count: int, seed: int = 11):
    rng = random.Random(seed)
    return [synthetic.draw_request(rng) for _ in range(count)]


# Which arguments of a call hold recipients, cc or invitees (tools.py signatures).
PEOPLE_ARGUMENTS = {"compose_new_email": (0, 1), "forward_email": (0, 1), "reply_to_email": (0,), "send_sms": (0,),
                    "create_calendar_event": (4,), "get_zoom_meeting_link": (3,)}


def test_a_named_recipient_is_looked_up_and_a_literal_address_or_number_is_not():
    literal_seen = {"email": 0, "sms": 0}
    for request in _requests(1500):
        for call in request.calls:
            if call.tool not in PEOPLE_ARGUMENTS:
                continue
            lists = [call.args[i] for i in PEOPLE_ARGUMENTS[call.tool]]
            lookup = "get_phone_number" if call.tool == "send_sms" else "get_email_address"
            for recipient in (r for group in lists for r in group):
                if REFERENCE.fullmatch(recipient):
                    assert request.calls[int(recipient[1:]) - 1].tool == lookup, (request.query, call)
                elif call.tool == "send_sms":
                    literal_seen["sms"] += 1
                    assert re.fullmatch(r"\d{3}-555-\d{4}", recipient), recipient
                    assert recipient[:3] in request.query and recipient[-4:] in request.query
                else:
                    literal_seen["email"] += 1
                    assert "@" in recipient and recipient in request.query, (request.query, recipient)
                    assert not any(c.tool == "get_email_address" and c.args == [recipient] for c in request.calls)
    assert literal_seen["email"] >= 20 and literal_seen["sms"] >= 20, literal_seen


def test_sending_a_summary_needs_the_file_and_its_summary_first():
    seen = 0
    for request in _requests(1500):
        for position, call in enumerate(request.calls, start=1):
            if call.tool in ("compose_new_email", "send_sms") and any(
                    request.calls[int(n) - 1].tool == "summarize_pdf" for a in call.args if isinstance(a, str)
                    for n in REFERENCE.findall(a)):
                seen += 1
                summary = next(int(n) for a in call.args if isinstance(a, str) for n in REFERENCE.findall(a))
                assert summary < position
                assert request.calls[int(request.calls[summary - 1].args[0][1:]) - 1].tool == "open_and_get_file_path"
    assert seen >= 20, seen


def test_a_negated_channel_is_not_used():
    """"don't email him, just text him ..." as the whole request: an SMS and no email."""
    seen = 0
    for request in _requests(4000):
        text = request.query.lower()
        if request.intents == 1 and ("don't email" in text or "no email for" in text):
            seen += 1
            tools = {c.tool for c in request.calls}
            assert "send_sms" in tools and "compose_new_email" not in tools, request.query
    assert seen >= 5, seen


def test_requests_combine_one_to_four_intents():
    counts = Counter(r.intents for r in _requests(1000))
    assert set(counts) == {1, 2, 3, 4}, counts


# --- no keyword shortcut ----------------------------------------------------------------------


def test_single_words_do_not_solve_tool_retrieval(written):
    """The probe that knows only which words occur solely in training queries needing a tool
    recalls every tool of a test query for few queries; on the old fixed phrasings it reached 0.87."""
    folder, _ = written
    dataset = load_dataset_dir(folder)
    probe = synthetic.single_word_probe(dataset.train, dataset.test)
    assert probe["tool_recall"] < 0.5, probe


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
    assert sorted(p.name for p in folder.iterdir()) == [synthetic.MARKER_FILE, "testing_data.json", "training_data.json"]


def test_the_marker_names_the_generator_version_and_marks_the_folder_generated(written, tmp_path):
    folder, _ = written
    marker = json.loads((folder / synthetic.MARKER_FILE).read_text())
    assert marker == {"generator_version": synthetic.GENERATOR_VERSION, "seed": 0, "train": NUM_TRAIN, "test": NUM_TEST}
    assert synthetic.is_generated(folder)
    assert not synthetic.is_generated(tmp_path)


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


def test_excluded_queries_are_drawn_again():
    """The exclusion does work: the same (seed, split) would draw exactly the excluded queries
    first, and with them excluded none of them comes back (nor does a query repeat in a split)."""
    excluded = {normalize_query(r["input"]) for r in synthetic.generate_split(200, 0, "test").values()}
    again = synthetic.generate_split(200, 0, "test", frozenset(excluded))
    queries = [normalize_query(r["input"]) for r in again.values()]
    assert not set(queries) & excluded
    assert len(set(queries)) == len(queries)
