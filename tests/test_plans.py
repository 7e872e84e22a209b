"""Plan parsing and the paper's success rule (dependency-graph isomorphism), on hand-written plans."""

from __future__ import annotations

import pytest

from trainers.plans import PlanError, parse_plan, plan_success, tool_set_match

TARGET = """1. get_email_address("Amir")
2. get_zoom_meeting_link("Budget sync", "2024-05-03 15:00:00", 60, ["$1"])
3. create_calendar_event("Budget sync", "2024-05-03 15:00:00", "2024-05-03 16:00:00", "", ["$1"], "$2", None)
Thought: The meeting is scheduled and the link is in the event.
4. join()<END_OF_PLAN>"""


def test_identical_plan_succeeds_and_argument_values_do_not_count():
    other_values = TARGET.replace("Amir", "Sid").replace("60", "30").replace("Budget sync", "Retro")
    assert plan_success(TARGET, TARGET)
    assert plan_success(other_values, TARGET)


def test_thought_lines_and_end_marker_are_optional():
    bare = "\n".join(line for line in TARGET.splitlines() if not line.startswith("Thought")).replace("<END_OF_PLAN>", "")
    assert plan_success(bare, TARGET)


def test_order_of_independent_steps_and_numbering_do_not_count():
    target = '1. get_email_address("A")\n2. get_phone_number("B")\n3. compose_new_email(["$1"], [], "s", "c", [])\n' \
             '4. send_sms(["$2"], "hi")\n5. join()'
    swapped = '1. get_phone_number("B")\n2. get_email_address("A")\n3. send_sms(["$1"], "hi")\n' \
              '4. compose_new_email(["$2"], [], "s", "c", [])\n5. join()'
    assert plan_success(swapped, target)


def test_references_count_alone_and_inside_lists():
    alone = '1. open_and_get_file_path("x")\n2. summarize_pdf("$1")\n3. join()'
    unlinked = '1. open_and_get_file_path("x")\n2. summarize_pdf("x.pdf")\n3. join()'
    in_list = '1. get_email_address("A")\n2. compose_new_email(["$1"], [], "s", "c", [])\n3. join()'
    not_in_list = '1. get_email_address("A")\n2. compose_new_email(["a@b.c"], [], "s", "c", [])\n3. join()'
    assert not plan_success(unlinked, alone)
    assert not plan_success(not_in_list, in_list)
    assert parse_plan(in_list)[1].depends_on == {1}


def test_same_node_signatures_but_different_wiring_fails():
    """In both plans each email depends on one address look-up, so the multisets of
    (tool, tools below) agree. Only the wiring differs: in the target each look-up feeds its
    own email; in the prediction one look-up feeds both and the other feeds nothing. A
    multiset comparison calls this a match; graph isomorphism does not."""
    target = ('1. get_email_address("A")\n2. get_email_address("B")\n3. compose_new_email(["$1"], [], "s", "c", [])\n'
              '4. compose_new_email(["$2"], [], "s", "c", [])\n5. join()')
    crossed = ('1. get_email_address("A")\n2. get_email_address("B")\n3. compose_new_email(["$1"], [], "s", "c", [])\n'
               '4. compose_new_email(["$1"], [], "s", "c", [])\n5. join()')
    assert not plan_success(crossed, target)


def test_wrong_tool_or_missing_step_fails_but_tool_set_can_still_match():
    wrong_tool = TARGET.replace("get_zoom_meeting_link", "summarize_pdf")
    assert not plan_success(wrong_tool, TARGET)
    extra_step = TARGET.replace("4. join()", '4. create_reminder("x", "2024-01-01 10:00:00", "", None, 0, False)\n5. join()')
    assert not plan_success(extra_step, TARGET)
    flat = '1. get_email_address("A")\n2. get_zoom_meeting_link("t", "d", 60, [])\n' \
           '3. create_calendar_event("t", "s", "e", "", [], "", None)\n4. join()'
    assert not plan_success(flat, TARGET)
    assert tool_set_match(flat, TARGET)


@pytest.mark.parametrize("bad", [
    "",
    "I cannot help with that.",
    '1. get_email_address("A")\n2. send_sms(["$1"], "hi")',                       # no join
    '1. launch_rockets("now")\n2. join()',                                        # unknown tool
    '1. summarize_pdf("$2")\n2. open_and_get_file_path("x")\n3. join()',          # refers forward
    '1. get_email_address("A")\n2. send_sms(["$7"], "hi")\n3. join()',             # refers to a missing step
    '1. get_email_address(__import__("os").system("echo pwned"))\n2. join()',     # code, not a literal
    '1. get_email_address("A"\n2. join()',                                        # unbalanced
    '2. get_email_address("A")\n1. join()',                                       # numbering goes back
    '1. get_email_address("' + "x" * 30_000 + '")\n2. join()',                    # oversized
])
def test_invalid_output_is_a_failure_never_an_exception(bad):
    assert plan_success(bad, TARGET) is False
    assert tool_set_match(bad, TARGET) is False
    with pytest.raises(PlanError):
        parse_plan(bad)


def test_text_after_join_is_ignored():
    assert plan_success(TARGET + "\nThe plan is complete. 5. send_sms([], 'x')", TARGET)
