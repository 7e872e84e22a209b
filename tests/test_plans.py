"""Plan parsing and scoring on hand-written plans.

The first part pins TinyAgent's own plan-success rule (`parse_plan`, `plan_success`), one test
per rule, quirks included; each was checked to fail when its rule is broken in the code.
The last part keeps the older strict parser's tests, now aimed at `strict_*`.
"""

from __future__ import annotations

import pytest

from trainers.plans import (
    MAX_PLAN_CHARS, PlanError, parse_plan, plan_success, strict_parse_plan, strict_plan_success, target_problem,
    tool_set_match,
)

TARGET = """1. get_email_address("Amir")
2. get_zoom_meeting_link("Budget sync", "2024-05-03 15:00:00", 60, ["$1"])
3. create_calendar_event("Budget sync", "2024-05-03 15:00:00", "2024-05-03 16:00:00", "", ["$1"], "$2", None)
Thought: The meeting is scheduled and the link is in the event.
4. join()<END_OF_PLAN>"""

LOOKUP_AND_SMS = '1. get_phone_number("Sid")\n2. send_sms(["$1"], "hi")\n3. join()'


def tools(text: str) -> list[str]:
    return [step.tool for step in parse_plan(text)]


def references(text: str) -> list[tuple[int, ...]]:
    return [step.references for step in parse_plan(text)]


# --- the scorer's rule -------------------------------------------------------------------

def test_identical_plan_succeeds_and_argument_values_do_not_count():
    other_values = TARGET.replace("Amir", "Sid").replace("60", "30").replace("Budget sync", "Retro")
    assert plan_success(TARGET, TARGET)
    assert plan_success(other_values, TARGET)
    assert tools(TARGET) == ["get_email_address", "get_zoom_meeting_link", "create_calendar_event", "join"]
    assert references(TARGET) == [(), (1,), (1, 2), ()]


def test_order_of_independent_steps_and_numbering_do_not_count():
    target = ('1. get_email_address("A")\n2. get_phone_number("B")\n3. compose_new_email(["$1"], [], "s", "c", [])\n'
              '4. send_sms(["$2"], "hi")\n5. join()')
    swapped = ('1. get_phone_number("B")\n2. get_email_address("A")\n3. send_sms(["$1"], "hi")\n'
               '4. compose_new_email(["$2"], [], "s", "c", [])\n5. join()')
    assert plan_success(swapped, target)


def test_wrong_tool_missing_step_or_wiring_fails():
    assert not plan_success(TARGET.replace("get_zoom_meeting_link", "summarize_pdf"), TARGET)
    extra = TARGET.replace("4. join()", '4. create_reminder("x", "2024-01-01 10:00:00", "", None, 0, False)\n5. join()')
    assert not plan_success(extra, TARGET)
    target = ('1. get_email_address("A")\n2. get_email_address("B")\n3. compose_new_email(["$1"], [], "s", "c", [])\n'
              '4. compose_new_email(["$2"], [], "s", "c", [])\n5. join()')
    crossed = target.replace('["$2"]', '["$1"]')  # one look-up feeds both emails, the other none
    assert not plan_success(crossed, target)


def test_reference_embedded_in_text_counts():
    in_text = '1. get_zoom_meeting_link("t", "d", 30, [])\n2. send_sms(["Sid"], "Join here: $1")\n3. join()'
    unlinked = '1. get_zoom_meeting_link("t", "d", 30, [])\n2. send_sms(["Sid"], "Join here")\n3. join()'
    alone = '1. get_zoom_meeting_link("t", "d", 30, [])\n2. send_sms(["Sid"], "$1")\n3. join()'
    assert references(in_text)[1] == (1,)
    assert plan_success(in_text, alone)
    assert not plan_success(unlinked, in_text)


def test_dollar_amount_in_text_is_a_reference():
    pay = '1. get_phone_number("Sid")\n2. send_sms(["$1"], "pay $50")\n3. join()'
    with pytest.raises(PlanError, match=r"\$50"):
        parse_plan(pay)  # $50 is read as a reference to step 50, past the end
    assert not plan_success(pay, pay)
    assert not plan_success(pay.replace("$50", "50 dollars"), pay)
    assert plan_success(pay.replace("$50", "50 dollars"), LOOKUP_AND_SMS)


def test_only_the_first_reference_in_a_string_counts():
    text = ('1. get_phone_number("A")\n2. get_phone_number("B")\n'
            '3. send_sms(["$1"], "from $2 and $1")\n4. join()')
    assert references(text)[2] == (1, 2)
    assert references(text.replace("from $2 and $1", "from $1 and $2"))[2] == (1, 1)


def test_tuples_nested_lists_and_non_strings_are_not_searched_for_references():
    base = '1. get_phone_number("A")\n2. send_sms({}, "hi")\n3. join()'
    for hidden in ['("$1",)', '[["$1"]]', '[b"$1"]', '{"$1"}']:
        assert references(base.format(hidden))[1] == (), hidden
    assert references(base.format('["x", "$1"]'))[1] == (1,)


def test_a_single_list_argument_becomes_the_argument_tuple():
    """`f([...])` evaluates to a list, which is taken as the arguments themselves, so one more
    level of nesting is searched than with two arguments."""
    single = '1. get_phone_number("A")\n2. send_sms([["$1"]])\n3. join()'
    assert parse_plan(single)[1].args == (["$1"],)
    assert references(single)[1] == (1,)
    assert references(single.replace('[["$1"]]', '[["$1"]], "hi"'))[1] == ()


def test_chatter_before_between_and_after_steps_is_skipped():
    chatty = ('Sure! Here is the plan.\n' + LOOKUP_AND_SMS.replace("\n2.", "\nI will now text Sid.\n2.")
              + "\nDone, that is all.")
    assert tools(chatty) == ["get_phone_number", "send_sms", "join"]
    assert plan_success(chatty, LOOKUP_AND_SMS)


def test_thought_line_directly_before_a_step_hides_a_call_written_on_it():
    swallowed = 'Thought: first 5. get_phone_number("Sid") then\n1. get_email_address("Sid")\n2. join()'
    assert tools(swallowed) == ["get_email_address", "join"]
    not_before_a_step = 'Thought: first 5. get_phone_number("Sid") then\nok\n2. join()'
    assert tools(not_before_a_step) == ["get_phone_number", "join"]


def test_trailing_comma_is_accepted():
    assert parse_plan('1. get_phone_number("Sid",)\n2. join()')[0].args == ("Sid",)
    assert plan_success('1. get_phone_number("Sid",)\n2. send_sms(["$1"], "hi",)\n3. join()', LOOKUP_AND_SMS)


def test_keyword_arguments_become_one_raw_string_and_still_refer():
    kwargs = '1. get_phone_number(name="Sid")\n2. send_sms(recipients=["$1"], message="hi")\n3. join()'
    steps = parse_plan(kwargs)
    assert steps[1].args == ('recipients=["$1"], message="hi"',)
    assert steps[1].references == (1,)
    assert plan_success(kwargs, LOOKUP_AND_SMS)


def test_lowercase_literals_are_kept_as_raw_text_not_rejected():
    lower = '1. get_phone_number("Sid")\n2. send_sms(["$1"], "hi", false)\n3. join()'
    assert parse_plan(lower)[1].args == ('["$1"], "hi", false',)
    assert references(lower)[1] == (1,)  # the first $ of the raw text
    assert plan_success(lower, LOOKUP_AND_SMS)


def test_duplicate_references_count_as_a_multiset():
    twice = '1. get_phone_number("Sid")\n2. send_sms(["$1", "$1"], "hi")\n3. join()'
    assert references(twice)[1] == (1, 1)
    assert plan_success(twice, twice)
    assert not plan_success(twice, LOOKUP_AND_SMS)  # same edges, but the dependency lists differ


def test_same_named_dependencies_are_compared_in_written_order():
    """Dependency lists are sorted by tool name only, stably: two email look-ups with different
    histories keep the order in which they are referred to."""
    plan = ('1. get_phone_number("A")\n2. get_email_address("$1")\n3. get_email_address("B")\n'
            '4. compose_new_email(["$2", "$3"], [], "s", "c", [])\n5. join()')
    assert plan_success(plan, plan)
    assert not plan_success(plan.replace('["$2", "$3"]', '["$3", "$2"]'), plan)


def test_unknown_tool_cuts_the_plan_there():
    cut = ('1. get_phone_number("Sid")\n2. search("weather")\n3. send_sms(["$9"], "hi")\n'
           '4. get_email_address("Sid")\n5. join()')
    assert tools(cut) == ["get_phone_number"]  # the bad $9 after the cut is never looked at
    assert plan_success(cut, '1. get_phone_number("Amir")')
    assert not plan_success(cut, LOOKUP_AND_SMS)


def test_reference_past_the_end_fails():
    past = '1. get_phone_number("Sid")\n2. send_sms(["$3"], "hi")'
    with pytest.raises(PlanError, match=r"\$3"):
        parse_plan(past)
    assert not plan_success(past, past)
    assert not plan_success(past.replace("$3", "$1"), past)


def test_references_count_positions_not_step_numbers():
    numbered = '2. get_phone_number("Sid")\n5. send_sms(["$1"], "hi")\n7. join()'
    assert plan_success(numbered, LOOKUP_AND_SMS)
    by_number = '2. get_phone_number("Sid")\n5. send_sms(["$2"], "hi")\n7. join()'  # position 2 is itself
    with pytest.raises(PlanError, match="itself"):
        parse_plan(by_number)


def test_repeated_step_number_replaces_the_earlier_step_in_its_place():
    repeated = '1. create_note("a", "b", "c")\n2. get_phone_number("Sid")\n1. open_note("a", "c")\n3. join()'
    steps = parse_plan(repeated)
    assert [(s.number, s.tool) for s in steps] == [(1, "open_note"), (2, "get_phone_number"), (3, "join")]
    assert steps[0].args == ("a", "c")


def test_parsing_stops_after_the_first_join():
    after = LOOKUP_AND_SMS + '\n4. send_sms(["$9"], "late")\n1. create_note("x", "y", "z")'
    assert tools(after) == ["get_phone_number", "send_sms", "join"]
    assert plan_success(after, LOOKUP_AND_SMS)
    assert tools('1. join()\n2. get_phone_number("Sid")') == ["join"]


def test_join_is_not_required():
    assert plan_success(LOOKUP_AND_SMS.replace("\n3. join()", ""), '1. get_phone_number("A")\n2. send_sms("$1")')
    assert not plan_success(LOOKUP_AND_SMS.replace("\n3. join()", ""), LOOKUP_AND_SMS)


@pytest.mark.parametrize("line", ['1.get_phone_number("Sid")', '1.  get_phone_number("Sid")',
                                  '1. get_phone_number ("Sid")', '1 . get_phone_number("Sid")'])
def test_a_step_needs_exactly_one_space_after_the_dot(line):
    text = f'{line}\n2. send_sms(["Sid"], "hi")\n3. join()'
    assert tools(text) == ["send_sms", "join"]


def test_arguments_run_to_the_last_parenthesis_on_the_line():
    two = '1. get_phone_number("Sid")\n2. get_email_address("Sid") 3. send_sms(["$1"], "hi")\n4. join()'
    steps = parse_plan(two)
    assert [s.tool for s in steps] == ["get_phone_number", "get_email_address", "join"]
    assert steps[1].args == ('"Sid") 3. send_sms(["$1"], "hi"',)  # not a literal: kept raw
    assert steps[1].references == (1,)  # ... so the e-mail look-up now depends on step 1


def test_dollar_zero_resolves_to_the_last_step_and_can_never_match():
    """TinyAgent indexes `$0` as position -1 (the last step), but names the edge's source node
    "0: <tool>", a node without attributes; matching it raises, so the plan always fails."""
    zero = '1. get_phone_number("Sid")\n2. send_sms(["$0"], "hi")'
    with pytest.raises(PlanError, match=r"\$0"):
        parse_plan(zero)
    assert not plan_success(zero, zero)
    assert not plan_success(zero.replace("$0", "$1"), zero)
    assert target_problem(zero).startswith("does not parse")


def test_self_reference_fails():
    itself = '1. get_phone_number("Sid")\n2. send_sms(["$2"], "hi")\n3. join()'
    with pytest.raises(PlanError, match="itself"):
        parse_plan(itself)
    assert not plan_success(itself, itself)


def test_cycle_of_references_fails():
    cycle = '1. get_email_address("$2")\n2. send_sms(["$1"], "hi")\n3. join()'
    with pytest.raises(PlanError, match="cycle"):
        parse_plan(cycle)
    assert not plan_success(cycle, cycle)


def test_forward_reference_without_a_cycle_is_accepted():
    forward = '1. send_sms(["$2"], "hi")\n2. get_phone_number("Sid")\n3. join()'
    assert plan_success(forward, LOOKUP_AND_SMS)


def test_two_texts_without_steps_count_as_a_success():
    """Two empty graphs are isomorphic, and TinyAgent counts that; targets like this are
    flagged by target_problem."""
    assert parse_plan("I cannot help with that.") == []
    assert plan_success("", "I cannot help with that.")
    assert not plan_success("", LOOKUP_AND_SMS)
    assert not tool_set_match("", "")


@pytest.mark.parametrize("bad", [
    "",
    "I cannot help with that.",
    '1. launch_rockets("now")\n2. join()',
    '1. summarize_pdf("$2")\n2. summarize_pdf("$1")\n3. join()',
    '1. get_email_address(__import__("os").system("echo pwned"))\n2. join()',
    '1. get_email_address("A"\n2. join()',
    '1. get_email_address("' + "x" * MAX_PLAN_CHARS + '")\n2. join()',
    "1. get_email_address(" + "[" * 5_000 + ")\n2. join()",
    "1" * 5_000 + ". get_email_address()\n2. join()",
    '1. get_email_address("$' + "9" * 5_000 + '")\n2. join()',
    "\n" * (MAX_PLAN_CHARS - 10) + "1. join()",
])
def test_bad_output_is_a_failure_never_an_exception(bad):
    assert plan_success(bad, TARGET) is False
    assert tool_set_match(bad, TARGET) is False


def test_code_in_arguments_is_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    text = f'1. get_email_address(open({str(marker)!r}, "w"))\n2. join()'
    assert tools(text) == ["get_email_address", "join"]
    assert not marker.exists()


def test_oversized_text_is_rejected():
    with pytest.raises(PlanError, match="longer than"):
        parse_plan(TARGET + " " * MAX_PLAN_CHARS)


def test_target_problem_accepts_a_good_target():
    assert target_problem(TARGET) is None
    assert target_problem(LOOKUP_AND_SMS.replace("\n3. join()", "")) is None


def test_target_problem_reports_an_unparseable_target():
    problem = target_problem('1. get_phone_number("Sid")\n2. send_sms(["$7"], "hi")\n3. join()')
    assert problem is not None and problem.startswith("does not parse: ") and "$7" in problem


def test_target_problem_reports_an_empty_plan():
    assert target_problem("No plan here.") == "parses to an empty plan"
    assert target_problem('1. search("x")\n2. join()') == "parses to an empty plan"  # cut at the first step


def test_tool_set_match_ignores_wiring_and_join():
    flat = ('1. get_email_address("A")\n2. get_zoom_meeting_link("t", "d", 60, [])\n'
            '3. create_calendar_event("t", "s", "e", "", [], "", None)')
    assert not plan_success(flat, TARGET)
    assert tool_set_match(flat, TARGET)
    assert not tool_set_match(flat.replace("get_zoom_meeting_link", "summarize_pdf"), TARGET)


# --- the strict parser: a separate figure, never the success rule --------------------------

def test_strict_identical_plan_succeeds_and_argument_values_do_not_count():
    other_values = TARGET.replace("Amir", "Sid").replace("60", "30").replace("Budget sync", "Retro")
    assert strict_plan_success(TARGET, TARGET)
    assert strict_plan_success(other_values, TARGET)


def test_strict_thought_lines_and_end_marker_are_optional():
    bare = "\n".join(line for line in TARGET.splitlines() if not line.startswith("Thought")).replace("<END_OF_PLAN>", "")
    assert strict_plan_success(bare, TARGET)


def test_strict_order_of_independent_steps_and_numbering_do_not_count():
    target = '1. get_email_address("A")\n2. get_phone_number("B")\n3. compose_new_email(["$1"], [], "s", "c", [])\n' \
             '4. send_sms(["$2"], "hi")\n5. join()'
    swapped = '1. get_phone_number("B")\n2. get_email_address("A")\n3. send_sms(["$1"], "hi")\n' \
              '4. compose_new_email(["$2"], [], "s", "c", [])\n5. join()'
    assert strict_plan_success(swapped, target)


def test_strict_references_count_alone_and_inside_lists():
    alone = '1. open_and_get_file_path("x")\n2. summarize_pdf("$1")\n3. join()'
    unlinked = '1. open_and_get_file_path("x")\n2. summarize_pdf("x.pdf")\n3. join()'
    in_list = '1. get_email_address("A")\n2. compose_new_email(["$1"], [], "s", "c", [])\n3. join()'
    not_in_list = '1. get_email_address("A")\n2. compose_new_email(["a@b.c"], [], "s", "c", [])\n3. join()'
    assert not strict_plan_success(unlinked, alone)
    assert not strict_plan_success(not_in_list, in_list)
    assert strict_parse_plan(in_list)[1].depends_on == {1}


def test_strict_same_node_signatures_but_different_wiring_fails():
    """In both plans each email depends on one address look-up. Only the wiring differs: in
    the target each look-up feeds its own email; in the prediction one look-up feeds both and
    the other feeds nothing. Graph isomorphism tells them apart."""
    target = ('1. get_email_address("A")\n2. get_email_address("B")\n3. compose_new_email(["$1"], [], "s", "c", [])\n'
              '4. compose_new_email(["$2"], [], "s", "c", [])\n5. join()')
    crossed = ('1. get_email_address("A")\n2. get_email_address("B")\n3. compose_new_email(["$1"], [], "s", "c", [])\n'
               '4. compose_new_email(["$1"], [], "s", "c", [])\n5. join()')
    assert not strict_plan_success(crossed, target)


def test_strict_wrong_tool_or_missing_step_fails():
    wrong_tool = TARGET.replace("get_zoom_meeting_link", "summarize_pdf")
    assert not strict_plan_success(wrong_tool, TARGET)
    extra_step = TARGET.replace("4. join()", '4. create_reminder("x", "2024-01-01 10:00:00", "", None, 0, False)\n5. join()')
    assert not strict_plan_success(extra_step, TARGET)
    flat = '1. get_email_address("A")\n2. get_zoom_meeting_link("t", "d", 60, [])\n' \
           '3. create_calendar_event("t", "s", "e", "", [], "", None)\n4. join()'
    assert not strict_plan_success(flat, TARGET)


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
def test_strict_invalid_output_is_a_failure_never_an_exception(bad):
    assert strict_plan_success(bad, TARGET) is False
    with pytest.raises(PlanError):
        strict_parse_plan(bad)


def test_strict_text_after_join_is_ignored():
    assert strict_plan_success(TARGET + "\nThe plan is complete. 5. send_sms([], 'x')", TARGET)
