"""Loading and validating files in the published TinyAgent format (trainers.data)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from trainers.data import (
    MAX_RAW_INPUT_CHARS, DataError, Example, carve_validation, load_dataset_dir, load_split, normalize_query,
    parse_messages,
)
from trainers.tools import TOOL_NAMES

# The label order as published in the design note (index -> tool), written out by hand so a
# reordering of trainers.tools.TOOL_NAMES is caught.
PAPER_LABEL_ORDER = [
    "create_calendar_event", "get_phone_number", "get_email_address", "open_and_get_file_path",
    "summarize_pdf", "compose_new_email", "reply_to_email", "forward_email", "maps_open_location",
    "maps_show_directions", "create_note", "open_note", "append_note_content", "create_reminder",
    "send_sms", "get_zoom_meeting_link",
]

# raw_input exactly as the real dataset stores it: the Python repr of a message list, with
# single-quoted strings (so it is not JSON).
RAW_INPUT = (
    "[{'role': 'system', 'content': 'Given a user query, create a plan to solve it.\\n1. send_sms(recipients, message)'}, "
    "{'role': 'user', 'content': \"Question: Text Sid that I'm late\"}]"
)
JOIN_RAW_INPUT = "[{'role': 'system', 'content': 'Decide.'}, {'role': 'user', 'content': 'Question: Text Sid'}]"


def plan_point(tools: list[str], raw_input: str = RAW_INPUT) -> dict[str, Any]:
    calls = [{"tool_name": name, "tool_args": [f"${i}"] if i else ["x"]} for i, name in enumerate(tools)]
    calls.append({"tool_name": "join", "tool_args": []})
    lines = [f"{i}. {name}()" for i, name in enumerate(tools, start=1)] + [f"{len(tools) + 1}. join()"]
    return {
        "type": "plan",
        "raw_input": raw_input,
        "raw_output": "\n".join(lines),
        "parsed_output": calls,
        "id": "00000000-0000-0000-0000-000000000001",
        "index": 0,
    }


def join_point() -> dict[str, Any]:
    return {
        "type": "join",
        "raw_input": JOIN_RAW_INPUT,
        "raw_output": "Thought: done.\nAction: Finish(Task completed!)",
        "parsed_output": {"thought": "done.", "action": "Finish", "message": "Task completed!"},
        "id": "00000000-0000-0000-0000-000000000002",
        "index": 1,
    }


def record(query: str = "Text Sid that I'm late", tools: list[str] | None = None) -> dict[str, Any]:
    tools = ["get_phone_number", "send_sms"] if tools is None else tools
    return {"input": query, "output": [plan_point(tools), join_point()], "closest_5_queries": ["Text Amir"]}


def write(path: Path, records: Any) -> Path:
    path.write_text(json.dumps(records))
    return path


# --- the happy path ---------------------------------------------------------------------------


def test_loads_a_file_in_the_published_format(tmp_path):
    path = write(tmp_path / "training_data.json", {
        "k1": record("Text Sid that I'm late"),
        "k2": record("Email Amir the budget", ["open_and_get_file_path", "get_email_address", "compose_new_email"]),
    })
    report = load_split(path)
    assert [e.key for e in report.examples] == ["k1", "k2"]
    first, second = report.examples
    assert first.query == "Text Sid that I'm late"
    assert set(first.tools) == {"get_phone_number", "send_sms"}
    assert set(second.tools) == {"open_and_get_file_path", "get_email_address", "compose_new_email"}
    assert first.messages == (
        ("system", "Given a user query, create a plan to solve it.\n1. send_sms(recipients, message)"),
        ("user", "Question: Text Sid that I'm late"),
    )
    assert first.plan == "1. get_phone_number()\n2. send_sms()\n3. join()"
    assert report.skipped_invalid == 0 and report.skipped_without_plan == 0


def test_parse_messages_reads_the_single_quoted_repr():
    assert parse_messages(RAW_INPUT) == [
        {"role": "system", "content": "Given a user query, create a plan to solve it.\n1. send_sms(recipients, message)"},
        {"role": "user", "content": "Question: Text Sid that I'm late"},
    ]


def test_tool_names_follow_the_published_label_order():
    assert list(TOOL_NAMES) == PAPER_LABEL_ORDER


def test_labels_come_out_in_tool_names_order_with_join_excluded(tmp_path):
    # Listed out of label order, with a repeat: the label is the set, placed by label index.
    tools = ["send_sms", "get_zoom_meeting_link", "get_phone_number", "create_calendar_event", "get_phone_number"]
    path = write(tmp_path / "training_data.json", {"k": record(tools=tools)})
    (example,) = load_split(path).examples
    assert "join" not in example.tools
    assert sorted(example.tools) == sorted(set(tools))  # each tool once, however often it is called
    vector = example.label_vector
    assert len(vector) == 16
    expected_on = {PAPER_LABEL_ORDER.index(name) for name in tools}
    assert expected_on == {0, 1, 14, 15}
    assert vector == [1.0 if i in expected_on else 0.0 for i in range(16)]


def test_a_plan_of_only_join_has_an_empty_label(tmp_path):
    path = write(tmp_path / "training_data.json", {"k": record(tools=[])})
    (example,) = load_split(path).examples
    assert example.tools == ()
    assert example.label_vector == [0.0] * 16


def test_records_without_a_plan_point_are_skipped_and_counted(tmp_path):
    no_plan = {"input": "What is the weather?", "output": [join_point()]}
    no_points = {"input": "Hello", "output": []}
    path = write(tmp_path / "training_data.json", {"a": record(), "b": no_plan, "c": no_points, "d": record()})
    report = load_split(path)
    assert [e.key for e in report.examples] == ["a", "d"]
    assert report.skipped_without_plan == 2
    assert report.skipped_invalid == 0


def test_a_file_with_no_usable_record_is_an_error(tmp_path):
    path = write(tmp_path / "training_data.json", {"b": {"input": "Hi", "output": [join_point()]}})
    with pytest.raises(DataError, match="no usable record") as caught:
        load_split(path)
    assert str(path) in str(caught.value)


def test_load_dataset_dir_reads_both_splits_and_sums_skips(tmp_path):
    write(tmp_path / "training_data.json", {"a": record(), "b": {"input": "Hi", "output": [join_point()]},
                                            "c": record("Email Amir the budget")})
    write(tmp_path / "testing_data.json", {"t": record(), "u": {"input": "Hi", "output": []}})
    dataset = load_dataset_dir(tmp_path)
    assert sorted(e.key for e in dataset.train + dataset.val) == ["a", "c"]
    assert len(dataset.val) == 1 and len(dataset.train) == 1  # one query each side, never none
    assert [e.key for e in dataset.test] == ["t"]
    assert dataset.skipped_without_plan == 2
    assert dataset.skipped_invalid == 0


def test_load_dataset_dir_names_a_missing_split(tmp_path):
    write(tmp_path / "training_data.json", {"a": record()})
    with pytest.raises(DataError) as caught:
        load_dataset_dir(tmp_path)
    assert str(tmp_path / "testing_data.json") in str(caught.value)


# --- malformed inputs --------------------------------------------------------------------------

BAD_KEY = "rec-bad-7"


def bad_record(mutate: Callable[[dict[str, Any]], Any]) -> Callable[[Path], tuple[Path, str]]:
    """A file holding a good record, then the mutated record under BAD_KEY."""

    def build(folder: Path) -> Path:
        broken = copy.deepcopy(record())
        replacement = mutate(broken)  # mutators edit in place and return None, or return a replacement
        broken = broken if replacement is None else replacement
        return write(folder / "training_data.json", {"rec-good-1": record(), BAD_KEY: broken})

    return build


def raw_text(text: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / "training_data.json"
        path.write_text(text)
        return path

    return build


def set_plan(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(rec: dict[str, Any]) -> None:
        rec["output"][0][field] = value

    return mutate


LONG_BUT_VALID_RAW_INPUT = repr([{"role": "user", "content": "Question: " + "a" * MAX_RAW_INPUT_CHARS}])

# (id, builder, record key expected in the message or None, field text expected or None)
MALFORMED = [
    ("not-json", raw_text('{"k": {"input": "x",'), None, None),
    ("top-level-list", raw_text(json.dumps([record()])), None, None),
    ("record-not-object", bad_record(lambda rec: ["input", "output"]), BAD_KEY, "<record>"),
    ("missing-input", bad_record(lambda rec: rec.__delitem__("input")), BAD_KEY, "input"),
    ("empty-input", bad_record(lambda rec: rec.update(input="   ")), BAD_KEY, "input"),
    ("output-not-list", bad_record(lambda rec: rec.update(output=rec["output"][0])), BAD_KEY, "output"),
    ("point-not-object", bad_record(lambda rec: rec["output"].insert(0, "plan")), BAD_KEY, "output[0]"),
    ("bad-point-type", bad_record(set_plan("type", "planning")), BAD_KEY, "output[0].type"),
    ("raw-input-not-literal", bad_record(set_plan("raw_input", "[{'role': 'user', 'content': 'Question: hi'")),
     BAD_KEY, "output[0].raw_input"),
    ("raw-input-name-not-literal", bad_record(set_plan("raw_input", "[{'role': user, 'content': 'hi'}]")),
     BAD_KEY, "output[0].raw_input"),
    ("raw-input-literal-dict", bad_record(set_plan("raw_input", "{'role': 'user', 'content': 'Question: hi'}")),
     BAD_KEY, "output[0].raw_input"),
    ("raw-input-literal-list-of-ints", bad_record(set_plan("raw_input", "[1, 2, 3]")), BAD_KEY, "output[0].raw_input"),
    ("raw-input-empty-list", bad_record(set_plan("raw_input", "[]")), BAD_KEY, "output[0].raw_input"),
    ("raw-input-message-without-content", bad_record(set_plan("raw_input", "[{'role': 'user'}]")),
     BAD_KEY, "output[0].raw_input"),
    ("raw-input-not-string", bad_record(set_plan("raw_input", [{"role": "user", "content": "hi"}])),
     BAD_KEY, "output[0].raw_input"),
    ("raw-input-too-long", bad_record(set_plan("raw_input", LONG_BUT_VALID_RAW_INPUT)), BAD_KEY, "output[0].raw_input"),
    ("unknown-tool", bad_record(lambda rec: rec["output"][0]["parsed_output"][0].update(tool_name="send_fax")),
     BAD_KEY, "send_fax"),
    ("unknown-tool-field", bad_record(lambda rec: rec["output"][0]["parsed_output"][0].update(tool_name="send_fax")),
     BAD_KEY, "parsed_output[0].tool_name"),
    ("parsed-output-not-list", bad_record(set_plan("parsed_output", {"tool_name": "send_sms", "tool_args": []})),
     BAD_KEY, "output[0].parsed_output"),
    ("parsed-output-empty", bad_record(set_plan("parsed_output", [])), BAD_KEY, "output[0].parsed_output"),
    ("join-parsed-output-not-object", bad_record(lambda rec: rec["output"][1].update(parsed_output="Finish")),
     BAD_KEY, "output[1].parsed_output"),
]


def test_the_long_raw_input_is_only_bad_because_of_its_length():
    assert len(LONG_BUT_VALID_RAW_INPUT) > MAX_RAW_INPUT_CHARS
    with pytest.raises(ValueError):
        parse_messages(LONG_BUT_VALID_RAW_INPUT)
    shorter = repr([{"role": "user", "content": "Question: " + "a" * (MAX_RAW_INPUT_CHARS - 100)}])
    assert parse_messages(shorter)[0]["role"] == "user"


@pytest.mark.parametrize("build, key, field", [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_input_raises_data_error_naming_file_record_and_field(tmp_path, build, key, field):
    path = build(tmp_path)
    with pytest.raises(DataError) as caught:
        load_split(path)
    message = str(caught.value)
    assert str(path) in message
    if key is not None:
        assert repr(key) in message
    if field is not None:
        assert field in message


def test_missing_file_raises_data_error_naming_the_path(tmp_path):
    path = tmp_path / "nowhere" / "training_data.json"
    with pytest.raises(DataError) as caught:
        load_split(path)
    assert str(path) in str(caught.value)


def test_deeply_nested_json_raises_data_error(tmp_path):
    path = tmp_path / "training_data.json"
    path.write_text('{"k": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DataError) as caught:
        load_split(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("build, key, field", [case[1:] for case in MALFORMED if case[2] is not None],
                         ids=[case[0] for case in MALFORMED if case[2] is not None])
def test_skip_invalid_skips_and_counts_bad_records(tmp_path, build, key, field):
    path = build(tmp_path)
    report = load_split(path, skip_invalid=True)
    assert [e.key for e in report.examples] == ["rec-good-1"]
    assert report.skipped_invalid == 1
    assert repr(key) in report.first_error and field in report.first_error


def test_skip_invalid_counts_several_bad_records_and_keeps_the_first_error(tmp_path):
    bad_input = record()
    del bad_input["input"]
    bad_type = record()
    bad_type["output"][0]["type"] = "plans"
    path = write(tmp_path / "training_data.json", {
        "good-1": record(), "bad-1": bad_input, "no-plan": {"input": "Hi", "output": [join_point()]},
        "bad-2": bad_type, "bad-3": "not a record", "good-2": record(),
    })
    report = load_split(path, skip_invalid=True)
    assert [e.key for e in report.examples] == ["good-1", "good-2"]
    assert report.skipped_invalid == 3
    assert report.skipped_without_plan == 1
    assert "'bad-1'" in report.first_error and str(path) in report.first_error


def test_skip_invalid_counts_reach_the_dataset(tmp_path):
    write(tmp_path / "training_data.json", {"good": record(), "bad": {"output": []}, "also-good": record("Hi there")})
    write(tmp_path / "testing_data.json", {"good": record(), "bad": 5, "worse": []})
    with pytest.raises(DataError):
        load_dataset_dir(tmp_path)
    dataset = load_dataset_dir(tmp_path, skip_invalid=True)
    assert len(dataset.train) + len(dataset.val) == 2 and len(dataset.test) == 1
    assert dataset.skipped_invalid == 3


# --- raw_input is parsed, never executed --------------------------------------------------------


def hostile_inputs(marker: Path) -> list[str]:
    command = f"__import__('os').system('touch {marker}')"
    return [
        command,
        f"[{{'role': 'user', 'content': {command}}}]",
        f"[{{'role': 'user', 'content': f\"{{{command}}}\"}}]",
        f"[{{'role': 'user', 'content': 'hi'}}] + [{command}]",
        f"(lambda: {command})()",
    ]


@pytest.mark.parametrize("variant", range(5))
@pytest.mark.parametrize("skip_invalid", [False, True])
def test_code_in_raw_input_is_rejected_and_never_run(tmp_path, variant, skip_invalid):
    marker = tmp_path / "PWNED"
    hostile = hostile_inputs(marker)[variant]
    rec = record()
    rec["output"][0]["raw_input"] = hostile
    path = write(tmp_path / "training_data.json", {"good": record(), "evil": rec})
    if skip_invalid:
        report = load_split(path, skip_invalid=True)
        assert report.skipped_invalid == 1
        assert "'evil'" in report.first_error and "raw_input" in report.first_error
    else:
        with pytest.raises(DataError) as caught:
            load_split(path)
        assert "'evil'" in str(caught.value) and "raw_input" in str(caught.value)
    assert not marker.exists()


def test_the_hostile_command_would_create_the_marker_if_executed(tmp_path):
    """Guards the test above: evaluating the payload really creates the file."""
    marker = tmp_path / "PWNED"
    eval(hostile_inputs(marker)[0])  # noqa: S307 - deliberate, on a string built by this test
    assert marker.exists()


# --- the validation split, leakage and bad targets ----------------------------------------------


def _examples(queries: list[str], prefix: str = "k") -> list[Example]:
    return [Example(f"{prefix}{i:04d}", query, ("send_sms",), (("user", query),), "1. send_sms()\n2. join()")
            for i, query in enumerate(queries)]


def test_validation_is_carved_by_record_key_and_never_shares_a_query_with_train():
    queries = [f"Text person {i % 150} that I am late" for i in range(300)]  # each query twice
    queries[7] = queries[8].upper() + "!!"  # joins the group of query 8 once normalised
    train = _examples(queries)
    kept, val = carve_validation(train, 0.1)
    assert sorted(e.key for e in kept + val) == sorted(e.key for e in train)
    assert {normalize_query(e.query) for e in kept}.isdisjoint(normalize_query(e.query) for e in val)
    assert 0 < len(val) < len(train) / 2
    # By record key, not by file order: reversing the file changes nothing.
    kept_reversed, val_reversed = carve_validation(list(reversed(train)), 0.1)
    assert {e.key for e in val_reversed} == {e.key for e in val}
    # Records added elsewhere do not move a group that was already placed.
    more = train + _examples([f"Email colleague {i} the slides" for i in range(100)], prefix="z")
    _, val_more = carve_validation(more, 0.1)
    assert {e.key for e in val} <= {e.key for e in val_more}


def test_a_larger_fraction_moves_more_groups_and_keeps_the_smaller_ones():
    train = _examples([f"Remind me about task {i}" for i in range(400)])
    small = {e.key for e in carve_validation(train, 0.1)[1]}
    large = {e.key for e in carve_validation(train, 0.3)[1]}
    assert small < large


def test_test_queries_that_also_occur_in_train_are_counted(tmp_path):
    write(tmp_path / "training_data.json", {f"tr{i}": record(f"Text person {i} that I'm late") for i in range(40)})
    write(tmp_path / "testing_data.json", {"t1": record("Text person 3 that I'm late"),
                                           "t2": record("TEXT PERSON 5, THAT I'M LATE."),
                                           "t3": record("Something never seen")})
    dataset = load_dataset_dir(tmp_path)
    in_train = {normalize_query(e.query) for e in dataset.train}
    expected = sum(normalize_query(q) in in_train for q in ("Text person 3 that I'm late", "TEXT PERSON 5, THAT I'M LATE."))
    assert dataset.test_queries_in_train == expected
    assert expected >= 1  # 40 groups, 10% to validation: at least one of the two stays in train


def _with_output(query: str, raw_output: str) -> dict[str, Any]:
    built = record(query)
    built["output"][0]["raw_output"] = raw_output
    return built


def test_target_plans_the_scorer_cannot_parse_are_counted_and_kept_unless_skip_invalid(tmp_path):
    write(tmp_path / "training_data.json", {
        **{f"ok{i}": record(f"Text person {i}") for i in range(10)},
        "chatter": _with_output("Say hi", "I am not sure what you want."),           # parses to no step
        "past-end": _with_output("Forward it", '1. forward_email(["$5"], [], "x", [])\n2. join()'),  # $5 past the end
    })
    write(tmp_path / "testing_data.json", {"t": record(), "t-bad": _with_output("Hmm", "no plan here")})
    kept = load_dataset_dir(tmp_path)
    assert kept.unparseable_targets == 3 and kept.skipped_unparseable == 0
    assert {"chatter", "past-end"} <= {e.key for e in kept.train + kept.val}
    assert "t-bad" in {e.key for e in kept.test}
    assert "record 'chatter'" in kept.first_unparseable and "raw_output" in kept.first_unparseable
    skipped = load_dataset_dir(tmp_path, skip_invalid=True)
    assert skipped.unparseable_targets == 3 and skipped.skipped_unparseable == 3
    assert not {"chatter", "past-end", "t-bad"} & {e.key for e in skipped.train + skipped.val + skipped.test}
