"""Deterministic generator of TinyAgent-format data (train and test JSON files).

The hub dataset cannot be downloaded on an offline machine, so the laptop default and the
tests run on data this module writes. It follows the published format exactly: one JSON
object per file mapping a record key to {"input", "output": [plan point, join point]},
with `raw_input` holding the Python repr of the planner's messages.

Requests are built from intents ("email Sid the slides", "remind me to call Amir") that
each contribute 1-3 calls; one to three intents are chained into a request of 1-4 calls,
so a query needs 2-3.5 distinct tools on average, like the real data.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainers.data import normalize_query
from trainers.tools import END_OF_PLAN, JOIN_TOOL, TOOL_NAMES, TOOLS

PEOPLE = [
    "Sid", "Amir", "Lutfi", "Nora", "Kenji", "Priya", "Marta", "Jonas", "Ines", "Tomasz",
    "Aisha", "Diego", "Hana", "Olek", "Rosa", "Yusuf", "Chloe", "Ravi", "Elena", "Mateo",
]
FILES = [
    "Q3 budget", "project proposal", "design review slides", "lease agreement", "travel itinerary",
    "research paper draft", "invoice March", "team roadmap", "onboarding guide", "meeting minutes",
]
PLACES = [
    "the Ferry Building", "Golden Gate Park", "the office", "Union Square", "the airport",
    "Berkeley campus", "the train station", "Dolores Park", "the gym", "the library",
]
TOPICS = [
    "budget sync", "design review", "hiring plan", "quarterly planning", "launch retro",
    "paper discussion", "one-on-one", "customer call", "roadmap review", "offsite planning",
]
NOTE_FOLDERS = ["Notes", "Work", "Personal", "Ideas"]
REMINDER_THINGS = [
    "call the dentist", "pay the rent", "book flights", "submit the report", "water the plants",
    "renew the passport", "buy groceries", "send the invoice", "prepare the slides", "pick up the package",
]
TRANSPORT = {"d": "drive", "w": "walk", "r": "take transit"}


@dataclass
class Call:
    tool: str
    args: list[Any]
    thought: str | None = None


@dataclass
class PlanBuilder:
    """Accumulates calls; `add` returns the `$N` reference to the new call's result."""

    calls: list[Call] = field(default_factory=list)

    def add(self, tool: str, *args: Any, thought: str | None = None) -> str:
        self.calls.append(Call(tool, list(args), thought))
        return f"${len(self.calls)}"


def _date(rng: random.Random) -> tuple[str, str, str]:
    """A start time, an end time one hour later, and how a person would say it."""
    month, day, hour = rng.randint(1, 12), rng.randint(1, 28), rng.randint(8, 17)
    start = f"2024-{month:02d}-{day:02d} {hour:02d}:00:00"
    end = f"2024-{month:02d}-{day:02d} {hour + 1:02d}:00:00"
    spoken = f"on 2024-{month:02d}-{day:02d} at {hour if hour <= 12 else hour - 12}{'am' if hour < 12 else 'pm'}"
    return start, end, spoken


# Each intent adds its calls to the plan and returns the request clause that asks for them.
def _email_person(rng: random.Random, plan: PlanBuilder) -> str:
    person, topic = rng.choice(PEOPLE), rng.choice(TOPICS)
    address = plan.add("get_email_address", person)
    plan.add("compose_new_email", [address], [], topic.capitalize(), f"Write about the {topic}.", [],
             thought=f"I have {person}'s address, so I can write the email." if rng.random() < 0.3 else None)
    return rng.choice([
        f"email {person} about the {topic}",
        f"send {person} an email regarding the {topic}",
        f"write to {person} by email and ask about the {topic}",
    ])


def _email_attachment(rng: random.Random, plan: PlanBuilder) -> str:
    person, file_name = rng.choice(PEOPLE), rng.choice(FILES)
    path = plan.add("open_and_get_file_path", file_name)
    address = plan.add("get_email_address", person)
    plan.add("compose_new_email", [address], [], file_name.capitalize(), f"Sharing the {file_name}.", [path])
    return rng.choice([
        f"email the {file_name} to {person}",
        f"send {person} the {file_name} document by email",
        f"mail {person} the {file_name} file as an attachment",
    ])


def _sms_person(rng: random.Random, plan: PlanBuilder) -> str:
    person, place = rng.choice(PEOPLE), rng.choice(PLACES)
    number = plan.add("get_phone_number", person)
    plan.add("send_sms", [number], f"I'm on my way to {place}.")
    return rng.choice([
        f"text {person} that I'm on my way to {place}",
        f"send an SMS to {person} saying I'm heading to {place}",
        f"message {person} that I'm going to {place}",
    ])


def _zoom_meeting(rng: random.Random, plan: PlanBuilder) -> str:
    person, topic = rng.choice(PEOPLE), rng.choice(TOPICS)
    start, end, spoken = _date(rng)
    address = plan.add("get_email_address", person)
    link = plan.add("get_zoom_meeting_link", topic.capitalize(), start, 60, [address])
    plan.add("create_calendar_event", topic.capitalize(), start, end, "", [address], link, None,
             thought="The Zoom link goes into the event notes." if rng.random() < 0.4 else None)
    return rng.choice([
        f"set up a zoom meeting with {person} for the {topic} {spoken} and put it on my calendar",
        f"schedule a {topic} on zoom with {person} {spoken} and add it to the calendar",
    ])


def _calendar_event(rng: random.Random, plan: PlanBuilder) -> str:
    topic, place = rng.choice(TOPICS), rng.choice(PLACES)
    start, end, spoken = _date(rng)
    if rng.random() < 0.5:
        person = rng.choice(PEOPLE)
        address = plan.add("get_email_address", person)
        plan.add("create_calendar_event", topic.capitalize(), start, end, place, [address], "", None)
        return rng.choice([
            f"invite {person} to a {topic} at {place} {spoken}",
            f"put a {topic} with {person} at {place} {spoken} on the calendar",
        ])
    plan.add("create_calendar_event", topic.capitalize(), start, end, place, [], "", None)
    return rng.choice([
        f"block my calendar for the {topic} at {place} {spoken}",
        f"add a {topic} event at {place} {spoken} to my calendar",
    ])


def _reminder(rng: random.Random, plan: PlanBuilder) -> str:
    thing = rng.choice(REMINDER_THINGS)
    start, _, spoken = _date(rng)
    plan.add("create_reminder", thing.capitalize(), start, "", None, 0, False)
    return rng.choice([f"remind me to {thing} {spoken}", f"set a reminder to {thing} {spoken}",
                       f"don't let me forget to {thing} {spoken}"])


def _summarize(rng: random.Random, plan: PlanBuilder) -> str:
    file_name = rng.choice(FILES)
    path = plan.add("open_and_get_file_path", file_name)
    summary = plan.add("summarize_pdf", path)
    if rng.random() < 0.5:
        folder = rng.choice(NOTE_FOLDERS)
        plan.add("create_note", f"{file_name.capitalize()} summary", summary, folder)
        return rng.choice([
            f"summarize the {file_name} pdf and save the summary as a note in {folder}",
            f"make a note in {folder} with a summary of the {file_name}",
        ])
    return rng.choice([f"summarize the {file_name} pdf", f"give me a summary of the {file_name} document",
                       f"what does the {file_name} pdf say? summarize it"])


def _reply(rng: random.Random, plan: PlanBuilder) -> str:
    if rng.random() < 0.4:
        file_name = rng.choice(FILES)
        path = plan.add("open_and_get_file_path", file_name)
        plan.add("reply_to_email", [], f"Here is the {file_name}.", [path])
        return rng.choice([f"reply to this email with the {file_name} attached",
                           f"answer the email and attach the {file_name}"])
    topic = rng.choice(TOPICS)
    plan.add("reply_to_email", [], f"Thanks, the {topic} works for me.", [])
    return rng.choice([f"reply to the email saying the {topic} works for me",
                       f"respond to this email and confirm the {topic}"])


def _forward(rng: random.Random, plan: PlanBuilder) -> str:
    person = rng.choice(PEOPLE)
    address = plan.add("get_email_address", person)
    plan.add("forward_email", [address], [], "FYI.", [])
    return rng.choice([f"forward this email to {person}", f"pass this email on to {person}",
                       f"send this mail along to {person}"])


def _open_location(rng: random.Random, plan: PlanBuilder) -> str:
    place = rng.choice(PLACES)
    plan.add("maps_open_location", place)
    return rng.choice([f"show {place} on the map", f"where is {place}? open it in maps",
                       f"find {place} in maps"])


def _directions(rng: random.Random, plan: PlanBuilder) -> str:
    start, end = rng.sample(PLACES, 2)
    mode = rng.choice(list(TRANSPORT))
    plan.add("maps_show_directions", start, end, mode)
    return rng.choice([f"how do I {TRANSPORT[mode]} from {start} to {end}",
                       f"get me directions from {start} to {end} to {TRANSPORT[mode]}",
                       f"show the route to {end} from {start} if I {TRANSPORT[mode]}"])


def _create_note(rng: random.Random, plan: PlanBuilder) -> str:
    thing, folder = rng.choice(REMINDER_THINGS), rng.choice(NOTE_FOLDERS)
    plan.add("create_note", "To do", f"Need to {thing}.", folder)
    return rng.choice([f"jot down a note in {folder} that I need to {thing}",
                       f"create a note saying I need to {thing}"])


def _open_note(rng: random.Random, plan: PlanBuilder) -> str:
    topic, folder = rng.choice(TOPICS), rng.choice(NOTE_FOLDERS)
    plan.add("open_note", f"{topic.capitalize()} notes", folder)
    return rng.choice([f"open my {topic} notes", f"what did I write in the {topic} note?",
                       f"pull up the note about the {topic} from {folder}"])


def _append_note(rng: random.Random, plan: PlanBuilder) -> str:
    topic, thing = rng.choice(TOPICS), rng.choice(REMINDER_THINGS)
    plan.add("append_note_content", f"{topic.capitalize()} notes", f"Also {thing}.", "Notes")
    return rng.choice([f"add to my {topic} note that we also need to {thing}",
                       f"append '{thing}' to the {topic} notes"])


def _zoom_sms(rng: random.Random, plan: PlanBuilder) -> str:
    person, topic = rng.choice(PEOPLE), rng.choice(TOPICS)
    start, _, spoken = _date(rng)
    number = plan.add("get_phone_number", person)
    link = plan.add("get_zoom_meeting_link", topic.capitalize(), start, 30, [])
    plan.add("send_sms", [number], link)
    return rng.choice([f"make a zoom link for the {topic} {spoken} and text it to {person}",
                       f"send {person} a zoom link by SMS for the {topic} {spoken}"])


INTENTS: tuple[Callable[[random.Random, PlanBuilder], str], ...] = (
    _email_person, _email_attachment, _sms_person, _zoom_meeting, _calendar_event, _reminder,
    _summarize, _reply, _forward, _open_location, _directions, _create_note, _open_note,
    _append_note, _zoom_sms,
)


def _literal(value: Any) -> str:
    """A Python literal for a plan argument; strings in double quotes as TinyAgent writes them."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    return repr(value)  # None, bool, int


def render_plan(calls: list[Call]) -> str:
    """LLMCompiler plan text, ending in join() but without the <END_OF_PLAN> marker."""
    lines = []
    for number, call in enumerate(calls, start=1):
        if call.thought:
            lines.append(f"Thought: {call.thought}")
        lines.append(f"{number}. {call.tool}({', '.join(_literal(arg) for arg in call.args)})")
    lines.append(f"{len(calls) + 1}. {JOIN_TOOL}()")
    return "\n".join(lines)


def planner_system_prompt(examples: list[tuple[str, str]]) -> str:
    """An LLMCompiler-style planner prompt: tool list, guidelines, in-context examples."""
    tool_lines = [f"{i}. {tool.name}{tool.signature}\n - {tool.description}" for i, tool in enumerate(TOOLS, start=1)]
    tool_lines.append(f"{len(TOOLS) + 1}. join():\n - Collects and combines results from prior actions.")
    example_text = "\n###\n".join(f"Question: {q}\n{p}{END_OF_PLAN}" for q, p in examples)
    return (
        "Given a user query, create a plan to solve it with the utmost parallelizability. "
        f"Each plan should comprise an action from the following {len(TOOLS) + 1} types:\n"
        + "\n".join(tool_lines)
        + "\n\nGuidelines:\n"
        " - Each action described above contains input/output types and description.\n"
        " - Each action in the plan should strictly be one of the above types.\n"
        " - Each action MUST have a unique ID, which is strictly increasing.\n"
        " - Inputs for actions can either be constants or outputs from preceding actions, "
        "written as $id.\n"
        " - Always call join as the last action in the plan. Say '<END_OF_PLAN>' after you call join.\n"
        " - Never introduce new actions other than the ones provided.\n\n"
        "Here are some examples:\n" + example_text
    )


JOIN_SYSTEM_PROMPT = (
    "Solve a question answering task. Read the plan's observations and decide whether the "
    "question is answered. Reply with a Thought and then Action: Finish(<answer>) or Replan(<reason>)."
)


def _record(rng: random.Random, intents_per_request: list[int], in_context: list[tuple[str, str]]) -> dict[str, Any]:
    # Chain intents until the plan reaches its drawn number of calls (1-4); an intent that
    # would overshoot is skipped, so small intents fill the remaining room.
    target_calls = rng.choice(intents_per_request)
    plan = PlanBuilder()
    clauses: list[str] = []
    used_intents: set[int] = set()
    for _attempt in range(12):
        if len(plan.calls) >= target_calls:
            break
        trial = PlanBuilder(calls=list(plan.calls))
        intent_index = rng.randrange(len(INTENTS))
        clause = INTENTS[intent_index](rng, trial)
        # People rarely ask for the same kind of thing twice in one request.
        if len(trial.calls) <= target_calls and intent_index not in used_intents:
            plan, clauses = trial, clauses + [clause]
            used_intents.add(intent_index)
    if not clauses:  # every draw overshot a 1-call plan: fall back to a one-call intent
        clauses.append(_reminder(rng, plan))
    query = clauses[0][0].upper() + clauses[0][1:]
    for clause in clauses[1:]:
        query += rng.choice([", and ", " and then ", ". Also, ", ", then "]) + clause
    query += rng.choice([".", "", ", please.", "."])
    plan_text = render_plan(plan.calls)
    messages = [
        {"role": "system", "content": planner_system_prompt(in_context)},
        {"role": "user", "content": f"Question: {query}"},
    ]
    parsed = [{"tool_name": c.tool, "tool_args": c.args} for c in plan.calls] + [{"tool_name": JOIN_TOOL, "tool_args": []}]
    observations = "\n".join(f"Observation {i}: done" for i in range(1, len(plan.calls) + 1))
    join_point = {
        "type": "join",
        "raw_input": repr([
            {"role": "system", "content": JOIN_SYSTEM_PROMPT},
            {"role": "user", "content": f"Question: {query}\n\n{plan_text}\n{observations}"},
        ]),
        "raw_output": "Thought: Every step succeeded.\nAction: Finish(Task completed!)",
        "parsed_output": {"thought": "Every step succeeded.", "action": "Finish", "message": "Task completed!"},
        "id": str(uuid.UUID(int=rng.getrandbits(128))),
        "index": 1,
    }
    plan_point = {
        "type": "plan",
        "raw_input": repr(messages),
        "raw_output": plan_text,
        "parsed_output": parsed,
        "id": str(uuid.UUID(int=rng.getrandbits(128))),
        "index": 0,
    }
    return {"input": query, "output": [plan_point, join_point]}


def generate_split(num_records: int, seed: int, split: str,
                   exclude_queries: frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """Records of one split; the same (num_records, seed, split, exclusions) always gives the
    same data. A drawn request whose normalised query is in `exclude_queries` is drawn again,
    so the training file never holds a test query."""
    rng = random.Random(f"{seed}-{split}")
    example_rng = random.Random(f"{seed}-examples")
    in_context = []
    for _ in range(2):
        builder = PlanBuilder()
        clause = rng.choice(INTENTS)(example_rng, builder)
        in_context.append((clause[0].upper() + clause[1:], render_plan(builder.calls)))
    # Weights of 1..4 calls per plan, chosen so the mean distinct-tool count lands near 2.5.
    calls_choices = [1] * 2 + [2] * 3 + [3] * 3 + [4] * 2
    records = {}
    for i in range(num_records):
        record = _record(rng, calls_choices, in_context)
        for _redraw in range(10_000):
            if normalize_query(record["input"]) not in exclude_queries:
                break
            record = _record(rng, calls_choices, in_context)
        else:  # a bug in the grammar, not bad input: it cannot write enough distinct requests
            raise RuntimeError(f"{split} record {i}: 10,000 draws all repeated an excluded query")
        records[f"{split}-{i:06d}"] = record
    return records


def label_statistics(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean distinct tools per query and the share of records using each tool."""
    tool_sets = [
        {c["tool_name"] for c in r["output"][0]["parsed_output"] if c["tool_name"] != JOIN_TOOL}
        for r in records.values()
    ]
    counts = Counter(t for s in tool_sets for t in s)
    total = max(len(tool_sets), 1)
    return {
        "records": len(tool_sets),
        "mean_tools_per_query": sum(len(s) for s in tool_sets) / total,
        "tool_share": {name: counts[name] / total for name in TOOL_NAMES},
    }


def write_dataset(out_dir: Path, num_train: int = 2000, num_test: int = 500, seed: int = 0) -> dict[str, Any]:
    """Write training_data.json and testing_data.json into out_dir, atomically; return train stats."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    # Test first: its queries are then kept out of train (validation is carved from train).
    test_records = generate_split(num_test, seed, "test")
    test_queries = frozenset(normalize_query(r["input"]) for r in test_records.values())
    for split, file_name in (("train", "training_data.json"), ("test", "testing_data.json")):
        records = test_records if split == "test" else generate_split(num_train, seed, "train", test_queries)
        stats[split] = label_statistics(records)
        tmp = out_dir / f".{file_name}.tmp"
        tmp.write_text(json.dumps(records))
        tmp.replace(out_dir / file_name)
    return stats


def format_statistics(stats: dict[str, Any]) -> str:
    lines = []
    for split, split_stats in stats.items():
        share = split_stats["tool_share"]
        lines.append(f"  {split}: {split_stats['records']} records, "
                     f"{split_stats['mean_tools_per_query']:.2f} distinct tools per query, "
                     f"tool share {min(share.values()):.1%}..{max(share.values()):.1%}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - convenience entry point
    import argparse

    parser = argparse.ArgumentParser(description="Write synthetic TinyAgent-format data.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(format_statistics(write_dataset(args.out_dir, args.train, args.test, args.seed)))
