"""Deterministic generator of TinyAgent-format data (train and test JSON files).

The hub dataset cannot be downloaded on an offline machine, so the laptop default and the
tests run on data this module writes. It follows the published format exactly: one JSON
object per file mapping a record key to {"input", "output": [plan point, join point]},
with `raw_input` holding the Python repr of the planner's messages.

Requests are written by a small grammar, not picked from fixed phrasings, because a task
whose requests name their app in two or three fixed ways is solved by keywords and cannot
show what the real one shows (the stock loss missing tools, `pos_weight` recovering them):
- each intent (message someone, set up a meeting, remind me, ...) has many verbs and request
  forms, indirect ones that never name the app ("let Sid know I'm running late"), and time
  expressions, politeness and filler around them;
- context decides the tools: a person given by name or relation needs a contact look-up, a
  literal address or number does not; "send her the summary" needs the file and its summary
  first; "don't email him, just text" needs the SMS only;
- app words also appear where their app is not needed (negations, file names, asides), so no
  single word marks a tool;
- "reach out to" and "get in touch with" leave the channel open: the plan uses one, drawn at
  random, as a person would.

Plans follow TinyAgent's: 1 to 8 calls, look-ups fanned into one call (`["$1", "$2"]`), results
inside text (a Zoom link or a summary in a message body), dependencies across intents, and
a `Thought:` line before `join()` where TinyAgent's in-context examples put it.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainers.data import normalize_query
from trainers.planner_prompts import JOIN_SYSTEM_PROMPT, TODAY, planner_system_prompt
from trainers.tools import JOIN_TOOL, TOOL_NAMES

# Bumped whenever the same seed would give other data: cached folders carry it in their name,
# so data from an older generator is never reused by mistake.
GENERATOR_VERSION = 2
# Written beside the two data files: marks a folder as generated (its tool-count target is then
# relative to the data, see tuning/config.py) and records how to write it again.
MARKER_FILE = "generator.json"
MAX_CALLS = 8
# "Today" for every request, stated in the planner prompt, so "tomorrow at 3pm" has one date.

FIRST_NAMES = [
    "Sid", "Amir", "Lutfi", "Nora", "Kenji", "Priya", "Marta", "Jonas", "Ines", "Tomasz", "Aisha", "Diego",
    "Hana", "Olek", "Rosa", "Yusuf", "Chloe", "Ravi", "Elena", "Mateo", "Kate", "Ben", "Grace", "Luca",
    "Mei", "Omar", "Sofia", "Theo", "Zara", "Felix", "Ana", "Malik", "Ingrid", "Pavel", "Leila", "Noah",
]
LAST_NAMES = ["Erdogan", "Park", "Lindqvist", "Okafor", "Moreau", "Tanaka", "Silva", "Novak", "Haddad", "Reyes"]
# People named by their relation to the user: still a contact, so still a look-up.
RELATIONS = [
    "my manager", "my landlord", "my sister", "my brother", "mom", "dad", "my roommate", "my accountant",
    "the team lead", "my advisor", "my dentist", "my partner", "the babysitter", "my coworker Jess",
]
DOMAINS = ["gmail.com", "berkeley.edu", "acme.io", "outlook.com", "squeeze.ai"]
# File names; several carry another app's word ("notes", "calendar", "zoom", "reminders") that
# the request does not ask for.
FILES = [
    "Q3 budget", "project proposal", "design review slides", "lease agreement", "travel itinerary",
    "research paper draft", "March invoice", "team roadmap", "onboarding guide", "meeting notes",
    "calendar export", "zoom recording transcript", "reminders checklist", "directions to the venue",
    "tax return", "grant application", "offer letter", "syllabus", "lab report", "insurance policy",
]
PLACES = [
    "the Ferry Building", "Golden Gate Park", "the office", "Union Square", "the airport", "Berkeley campus",
    "the train station", "Dolores Park", "the gym", "the library", "Soda Hall", "the farmers market",
    "Blue Bottle on Mint Plaza", "my parents' place", "the hospital", "SFO terminal 2", "the stadium",
]
TOPICS = [
    "budget sync", "design review", "hiring plan", "quarterly planning", "launch retro", "paper discussion",
    "one-on-one", "customer call", "roadmap review", "offsite planning", "standup", "demo prep",
    "grant meeting", "thesis check-in", "interview debrief",
]
TODOS = [
    "call the dentist", "pay the rent", "book flights", "submit the report", "water the plants",
    "renew my passport", "buy groceries", "send the invoice", "prepare the slides", "pick up the package",
    "take my meds", "cancel the gym membership", "back up my laptop", "return the library books",
]
NOTE_FOLDERS = ["Notes", "Work", "Personal", "Ideas", "Recipes", "Travel"]
NOTE_NAMES = ["groceries", "packing list", "ideas", "reading list", "project log", "gift ideas", "wifi passwords",
              "books to read", "weekly goals", "standup"]
NOTE_CONTENT = ["oat milk and eggs", "a charger for the trip", "try the new onboarding flow", "Piranesi",
                "a scarf for Ana", "finish the related-work section", "the router password is on the fridge",
                "ask about the parking permit", "ship the beta by Friday", "call the plumber"]
# Quick status lines: short, urgent, what people send by text; also used by email now and then
# so the words do not mark a channel.
STATUS = [
    "I'm running about 15 minutes late", "I'm on my way", "I just landed", "I'll be there in 10 minutes",
    "the meeting moved to 4pm", "dinner is still on for tonight", "I'm stuck in traffic",
    "I can't make it today", "I left my keys at home", "the package arrived",
]
TRANSPORT = {"d": ["drive", "driving", "by car"], "w": ["walk", "walking", "on foot"],
             "r": ["take transit", "taking the bus", "by train"]}

POLITE_OPENERS = ["", "", "", "", "Please ", "Could you ", "Can you ", "Hey, ", "Hi! ", "I need you to ",
                  "Quick favor: ", "When you get a chance, ", "Would you mind helping me: ", "ok so "]
# Openers that need a verb after them ("Can you open ..."), and the clause starts that are not
# one ("what's on my list?", "I need to ...", "no need for ...", an aside).
VERB_OPENERS = ("Please ", "Could you ", "Can you ", "I need you to ")
NOT_A_VERB = ("what", "where", "how", "i ", "i'", "no ", "don't", "save the date", "the ", "my ", "since", "before",
              "real quick", "tl;dr")
CLOSERS = ["", "", "", ".", ".", ".", ", please.", ", thanks!", " asap.", " thank you", "!", " when you can."]
JOINERS = [", and ", " and ", ". Also, ", ", then ", "; after that ", ". Oh and ", ", plus ", ". Then ",
           " and also ", ". And "]
# Asides that mention an app the request does not need.
ASIDES = [
    "I just got off a zoom call, so", "my calendar is a mess this week, so", "I already have the directions, so",
    "the reminder went off but", "I have my notes open, so", "since the email thread is getting long,",
    "I read the summary already, so", "my phone is almost dead, so", "before I forget,", "real quick,",
]


@dataclass
class Call:
    tool: str
    args: list[Any]
    # The intent (0-based position in the request) the call serves: how cross-intent
    # dependencies are counted. Not written to the record.
    intent: int = 0


@dataclass
class PlanBuilder:
    """Accumulates calls; `add` returns the `$N` reference to the new call's result."""

    calls: list[Call] = field(default_factory=list)
    intent: int = 0

    def add(self, tool: str, *args: Any) -> str:
        self.calls.append(Call(tool, list(args), self.intent))
        return f"${len(self.calls)}"


@dataclass
class Person:
    """Someone a request names: `spoken` is what the request says; `lookup` is the name a
    contact look-up takes (None for a literal address or number)."""

    spoken: str
    lookup: str | None
    literal_email: str | None = None
    literal_phone: str | None = None
    pronoun: str = "them"


@dataclass
class RequestState:
    """What earlier intents of one request left for later ones."""

    plan: PlanBuilder
    people: list[Person] = field(default_factory=list)
    # Results later intents may use: {"link": "$3", "summary": "$5", "file": "$4", ...}.
    artifacts: dict[str, str] = field(default_factory=dict)
    artifact_names: dict[str, str] = field(default_factory=dict)
    done: list[str] = field(default_factory=list)


# ----- small pieces of language ----------------------------------------------------------------
def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _person(rng: random.Random, channel: str | None = None) -> Person:
    """A contact: by first name, full name or relation (look-up), or for `channel` "email" or
    "sms" sometimes by a literal address or number (no look-up)."""
    roll = rng.random()
    if channel == "email" and roll < 0.15:
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        address = f"{first.lower()}.{last.lower()}@{rng.choice(DOMAINS)}"
        return Person(address, None, literal_email=address)
    if channel == "sms" and roll < 0.15:
        number = f"{rng.randint(201, 989)}-555-{rng.randint(0, 9999):04d}"
        return Person(rng.choice([number, f"+1 {number}", f"({number[:3]}) {number[4:]}"]), None,
                      literal_phone=number)
    if roll < 0.3:
        relation = rng.choice(RELATIONS)
        return Person(relation, relation.replace("my ", "").replace("the ", "").title(), pronoun="them")
    first = rng.choice(FIRST_NAMES)
    name = f"{first} {rng.choice(LAST_NAMES)}" if rng.random() < 0.2 else first
    return Person(name, name, pronoun=rng.choice(["him", "her", "them"]))


def _people(rng: random.Random, channel: str | None, at_most: int) -> list[Person]:
    """One to `at_most` distinct contacts; two or three fan into one call."""
    count = rng.choices([1, 2, 3], weights=[0.68, 0.24, 0.08])[0]
    people: list[Person] = []
    for _ in range(min(count, at_most) * 3):
        person = _person(rng, channel)
        if all(p.spoken != person.spoken for p in people):
            people.append(person)
        if len(people) >= min(count, at_most):
            break
    return people


def _names(people: list[Person]) -> str:
    spoken = [p.spoken for p in people]
    return spoken[0] if len(spoken) == 1 else ", ".join(spoken[:-1]) + " and " + spoken[-1]


def _object(people: list[Person]) -> str:
    """How a later clause refers back to these people."""
    return people[0].pronoun if len(people) == 1 else "them"


def _hour_text(hour: int, minute: int, rng: random.Random) -> str:
    if hour == 12 and minute == 0 and rng.random() < 0.5:
        return "noon"
    suffix = "am" if hour < 12 else "pm"
    shown = hour if hour <= 12 else hour - 12
    if rng.random() < 0.2:
        return f"{hour:02d}:{minute:02d}"
    return f"{shown}:{minute:02d}{suffix}" if minute else f"{shown}{suffix}"


def _when(rng: random.Random) -> tuple[dt.datetime, str]:
    """A moment after TODAY and one of the many ways people say it."""
    hour, minute = rng.randint(8, 18), rng.choice([0, 0, 0, 15, 30, 45])
    form = rng.randrange(9)
    if form == 0:
        day = TODAY + dt.timedelta(days=1)
        return day.replace(hour=hour, minute=minute), f"tomorrow at {_hour_text(hour, minute, rng)}"
    if form == 1:
        offset = rng.randint(2, 7)
        day = TODAY + dt.timedelta(days=offset)
        return day.replace(hour=hour, minute=minute), f"on {day:%A} at {_hour_text(hour, minute, rng)}"
    if form == 2:
        offset = rng.randint(7, 13)
        day = TODAY + dt.timedelta(days=offset)
        return day.replace(hour=hour, minute=minute), f"next {day:%A} at {_hour_text(hour, minute, rng)}"
    if form == 3:
        day = TODAY + dt.timedelta(days=rng.randint(3, 60))
        return (day.replace(hour=hour, minute=minute),
                f"on {day:%B} {day.day} at {_hour_text(hour, minute, rng)}")
    if form == 4:
        return TODAY.replace(hour=15, minute=0), rng.choice(["this afternoon", "later this afternoon"])
    if form == 5:
        return TODAY.replace(hour=20, minute=0), rng.choice(["tonight", "this evening"])
    if form == 6:
        day = TODAY + dt.timedelta(days=1)
        return day.replace(hour=9, minute=0), rng.choice(["tomorrow morning", "first thing tomorrow"])
    if form == 7:
        hours = rng.randint(1, 3)
        return TODAY + dt.timedelta(hours=hours), f"in {['an hour', 'two hours', 'three hours'][hours - 1]}"
    day = TODAY + dt.timedelta(days=rng.randint(2, 6))
    return day.replace(hour=12, minute=0), f"at noon on {day:%A}"


def _iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _duration(rng: random.Random) -> tuple[int, str]:
    minutes = rng.choice([60, 60, 60, 30, 45, 90, 120])
    if minutes == 60 or rng.random() < 0.4:
        return minutes, "" if minutes == 60 else f" for {minutes} minutes"
    return minutes, {30: " for half an hour", 45: " for 45 minutes", 90: " for an hour and a half",
                     120: " for two hours"}[minutes]


def _lookups(state: RequestState, people: list[Person], channel: str) -> list[str]:
    """The recipients' addresses or numbers: a look-up for each named person (TinyAgent's rule:
    look up a contact unless given the address), the literal otherwise."""
    tool = "get_email_address" if channel == "email" else "get_phone_number"
    recipients = []
    for person in people:
        literal = person.literal_email if channel == "email" else person.literal_phone
        if literal is not None:
            recipients.append(literal)
        elif person.lookup is not None:
            recipients.append(state.plan.add(tool, person.lookup))
        else:  # a literal of the other kind: look the person up by what the request said
            recipients.append(state.plan.add(tool, person.spoken))
    return recipients


def _file(state: RequestState, rng: random.Random) -> tuple[str, str]:
    """The file of this request (opened once and shared by the intents that use it)."""
    if "file" in state.artifacts:
        return state.artifacts["file"], state.artifact_names["file"]
    name = rng.choice(FILES)
    state.artifacts["file"] = state.plan.add("open_and_get_file_path", name)
    state.artifact_names["file"] = name
    return state.artifacts["file"], name


def _summary(state: RequestState, rng: random.Random) -> tuple[str, str]:
    if "summary" in state.artifacts:
        return state.artifacts["summary"], state.artifact_names["summary"]
    path, name = _file(state, rng)
    state.artifacts["summary"] = state.plan.add("summarize_pdf", path)
    state.artifact_names["summary"] = name
    return state.artifacts["summary"], name


# ----- intents: each adds its calls and returns the clause that asks for them ------------------
def _message(rng: random.Random, state: RequestState) -> str:
    """An email or an SMS to one to three people, maybe carrying an earlier result."""
    # How the request names the channel: <0.1 a negation of the other one, <0.45 by name,
    # <0.75 indirectly (the content decides), else left open (the plan picks one at random).
    explicit = rng.random()
    # A Zoom link or a summary made earlier in the request goes into the message body.
    carried = None
    if state.artifacts.get("link") and rng.random() < 0.6:
        carried = "link"
    elif state.artifacts.get("summary") and rng.random() < 0.6:
        carried = "summary"
    status = carried is None and rng.random() < 0.5
    if 0.45 <= explicit < 0.75:
        # Indirect requests follow how people message: quick status lines and links by text,
        # topics and summaries by email.
        channel = "sms" if status or carried == "link" else "email"
    else:
        channel = "sms" if rng.random() < 0.55 else "email"
    reuse = state.people and rng.random() < 0.35
    people = [state.people[-1]] if reuse else _people(rng, channel, 3)
    who = _object(people) if reuse else _names(people)
    if not reuse:
        state.people.extend(people)
    attach = None
    if channel == "email" and carried is None and not status and rng.random() < 0.3:
        attach = _file(state, rng)
    elif channel == "email" and carried is None and not status and rng.random() < 0.12:
        carried = "new summary"  # of a file this clause names
        _summary(state, rng)
    recipients = _lookups(state, people, channel)
    content, about = _content(rng, state, carried, status)
    if channel == "sms":
        state.plan.add("send_sms", recipients, content)
        state.done.append("sent the message")
    else:
        cc: list[str] = []
        if not reuse and rng.random() < 0.12:
            cc_people = [_person(rng)]
            state.people.extend(cc_people)
            cc = _lookups(state, cc_people, "email")
            about += f" and cc {cc_people[0].spoken}"
        subject = _cap(about.split(" and cc ")[0].removeprefix("about ").removeprefix("that "))[:60]
        state.plan.add("compose_new_email", recipients, cc, subject, content, [attach[0]] if attach else [])
        state.done.append("sent the email")
    return _message_clause(rng, channel, who, about, attach=attach, carried=carried, explicit=explicit)


def _content(rng: random.Random, state: RequestState, carried: str | None, status: bool) -> tuple[str, str]:
    """The message body (with a `$N` inside when it carries a result) and the clause's topic."""
    if carried == "link":
        ref, topic = state.artifacts["link"], state.artifact_names["link"]
        return (rng.choice([f"Here is the zoom link for the {topic}: {ref}", f"Join the {topic} here: {ref}",
                            f"Link for our {topic}: {ref}"]),
                rng.choice(["the link", "the zoom link", "the meeting link", "the link to join"]))
    if carried in ("summary", "new summary"):
        ref, name = state.artifacts["summary"], state.artifact_names["summary"]
        # A summary made earlier may be "the summary"; one made for this message names its file.
        named = [f"the summary of the {name}", f"a summary of the {name}", f"the gist of the {name}",
                 f"a short summary of the {name}"]
        return (rng.choice([f"Summary of the {name}: {ref}", f"Here's the gist of the {name}: {ref}", ref]),
                rng.choice(named + (["the summary", "it"] if carried == "summary" else [])))
    if status:
        line = rng.choice(STATUS)
        return _cap(line) + ".", f"that {line}"
    topic = rng.choice(TOPICS)
    return f"Following up about the {topic}.", f"about the {topic}"


def _message_clause(rng: random.Random, channel: str, who: str, about: str, *, attach, carried,
                    explicit: float) -> str:
    if attach is not None:
        name = attach[1]
        return rng.choice([
            f"email the {name} to {who}", f"send {who} the {name}", f"share the {name} with {who}",
            f"mail {who} the {name} as an attachment", f"get the {name} over to {who}",
            f"attach the {name} and send it to {who}", f"forward the {name} file to {who} in a new email",
        ])
    if carried is not None:
        verbs = {"sms": [f"text {who} {about}", f"send {who} {about} by text", f"shoot {who} {about}",
                         f"message {who} {about}", f"send {about} to {who}", f"text {about} to {who}"],
                 "email": [f"email {who} {about}", f"send {about} to {who}", f"mail {about} to {who}",
                           f"drop {who} an email with {about}", f"send {who} {about} by email",
                           f"send {about} to {who}"]}
        return rng.choice(verbs[channel])
    other = "email" if channel == "sms" else "text"
    pronoun = who if " " not in who else "them"
    if explicit < 0.1:  # a negation names the other channel
        same = "text" if channel == "sms" else "email"
        return rng.choice([f"don't {other} {who}, just {same} {pronoun} {about}",
                           f"no {other} for {who}, {same} {pronoun} {about} instead",
                           f"{same} {who} {about}, not by {'email' if other == 'email' else 'text'}"])
    if explicit < 0.45:
        if channel == "sms":
            return rng.choice([f"text {who} {about}", f"send {who} a text {about}", f"sms {who} {about}",
                               f"send a message to {who}'s phone {about}", f"shoot {who} a text {about}",
                               f"message {who} {about}", f"ping {who} on their phone {about}"])
        return rng.choice([f"email {who} {about}", f"send {who} an email {about}", f"write {who} an email {about}",
                           f"drop {who} a quick email {about}", f"mail {who} {about}",
                           f"send a note to {who}'s inbox {about}"])
    if explicit < 0.75:
        # Indirect: the channel follows from the content (status lines go by text, topics by
        # email) or from a literal number or address.
        return rng.choice([f"let {who} know {about}", f"tell {who} {about}", f"give {who} a heads up {about}",
                           f"make sure {who} knows {about}", f"ping {who} {about}", f"update {who} {about}",
                           f"I want {who} to know {about}", f"inform {who} {about}"])
    # The channel is left open: the plan picked one at random above, as people's plans do.
    return rng.choice([f"reach out to {who} {about}", f"get in touch with {who} {about}",
                       f"contact {who} {about}", f"get word to {who} {about}"])


def _meeting(rng: random.Random, state: RequestState) -> str:
    """A calendar event, a Zoom meeting, or both, with zero to three invitees."""
    moment, spoken = _when(rng)
    minutes, duration_text = _duration(rng)
    end = moment + dt.timedelta(minutes=minutes)
    topic = rng.choice(TOPICS)
    form = rng.random()
    people = _people(rng, "email", 3) if form < 0.8 else []
    state.people.extend(people)
    who = _names(people) if people else ""
    invitees = _lookups(state, people, "email")
    if form < 0.45:  # a video meeting: a Zoom link, put into the calendar event or sent on
        link = state.plan.add("get_zoom_meeting_link", _cap(topic), _iso(moment), minutes, invitees)
        state.artifacts["link"], state.artifact_names["link"] = link, topic
        if rng.random() < 0.65:
            state.plan.add("create_calendar_event", _cap(topic), _iso(moment), _iso(end), "", invitees, link, None)
            state.done.append("created the meeting and put it in the calendar")
            return rng.choice([
                f"set up a zoom meeting with {who} for the {topic} {spoken}{duration_text} and put it on my calendar",
                f"schedule a video call with {who} {spoken}{duration_text} about the {topic} and add it to my calendar",
                f"book a {topic} with {who} {spoken} on zoom and send a calendar invite",
                f"I need a virtual {topic} with {who} {spoken}{duration_text}, put it on the calendar with the link",
                f"create a zoom for the {topic} {spoken} with {who} and block the time in my calendar",
                f"organize an online {topic} with {who} {spoken}{duration_text}, invite included",
            ])
        if people and rng.random() < 0.5:
            # TinyAgent's own pattern: the link goes out in a message body.
            state.plan.add("compose_new_email", invitees, [], _cap(topic), f"Join the {topic} here: {link}", [])
            state.done.append("sent the meeting link")
            return rng.choice([
                f"set up a zoom with {who} {spoken} for the {topic} and email {_object(people)} the link",
                f"create a video call for the {topic} {spoken} and send {who} the link by email",
                f"get a zoom link for the {topic} with {who} {spoken}{duration_text} and mail it to {_object(people)}",
                f"make a meeting link for {spoken} and share it with {who} over email",
            ])
        state.done.append("created the meeting link")
        return rng.choice([
            f"make a zoom link for a {topic} with {who} {spoken}",
            f"get me a video call link for the {topic} {spoken} with {who}",
            f"create a zoom meeting for the {topic} with {who} {spoken}{duration_text}",
            f"spin up a zoom for {who} {spoken}, topic {topic}",
        ])
    place = rng.choice(PLACES) if rng.random() < 0.6 else ""
    state.plan.add("create_calendar_event", _cap(topic), _iso(moment), _iso(end), place, invitees, "", None)
    state.done.append("created the calendar event")
    at = f" at {place}" if place else ""
    if people:
        return rng.choice([
            f"invite {who} to a {topic}{at} {spoken}",
            f"put a {topic} with {who}{at} on my calendar {spoken}{duration_text}",
            f"set up a meeting with {who}{at} {spoken}{duration_text}",
            f"send {who} a calendar invite for the {topic} {spoken}{at}",
            f"I'm meeting {who}{at} {spoken}, add it to my calendar with {_object(people)} invited",
            f"no zoom needed, book an in-person {topic} with {who}{at} {spoken}",
            f"schedule the {topic} {spoken} with {who}{at}",
        ])
    return rng.choice([
        f"block my calendar {spoken}{duration_text} for the {topic}{at}",
        f"add a {topic} event{at} {spoken} to my calendar",
        f"I have a {topic}{at} {spoken}, put it in my calendar",
        f"hold {spoken}{duration_text} for the {topic}",
        f"don't set a reminder, put the {topic}{at} {spoken} on my calendar",
        f"save the date: {topic}{at} {spoken}",
        f"schedule time for the {topic} {spoken}{at}",
    ])


def _reminder(rng: random.Random, state: RequestState) -> str:
    todo = rng.choice(TODOS)
    moment, spoken = _when(rng)
    state.plan.add("create_reminder", _cap(todo), _iso(moment), "", None, 0, False)
    state.done.append("created the reminder")
    return rng.choice([
        f"remind me to {todo} {spoken}", f"set a reminder to {todo} {spoken}",
        f"don't let me forget to {todo} {spoken}", f"I need to remember to {todo} {spoken}",
        f"nudge me {spoken} to {todo}", f"ping me {spoken} so I {todo}",
        f"make sure I {todo} {spoken}", f"no need for a calendar event, just remind me to {todo} {spoken}",
        f"I have to {todo} {spoken}, so give me a reminder", f"add '{todo}' to my to-dos, due {spoken}",
    ])


def _summarize(rng: random.Random, state: RequestState) -> str:
    """A file's summary: kept for a later intent, written to a note, or just shown."""
    ref, name = _summary(state, rng)
    state.done.append("summarized the file")
    roll = rng.random()
    if roll < 0.35:
        folder = rng.choice(NOTE_FOLDERS)
        if rng.random() < 0.5:
            state.plan.add("create_note", f"{_cap(name)} summary", ref, folder)
            return rng.choice([f"summarize the {name} and save it as a note in {folder}",
                               f"put the gist of the {name} in a new note",
                               f"write a summary of the {name} into my {folder} folder"])
        note = rng.choice(NOTE_NAMES)
        state.plan.add("append_note_content", _cap(note), ref, folder)
        return rng.choice([f"add a summary of the {name} to my {note} note",
                           f"tack the gist of the {name} onto the {note} note"])
    return rng.choice([
        f"summarize the {name}", f"what's in the {name}? give me the short version", f"tl;dr the {name}",
        f"give me the gist of the {name} pdf", f"skim the {name} for me", f"what does the {name} say",
        f"boil the {name} down to a few lines",
    ])


def _open_file(rng: random.Random, state: RequestState) -> str:
    _, name = _file(state, rng)
    state.done.append("opened the file")
    return rng.choice([f"open the {name}", f"pull up the {name} file", f"find the {name} on my laptop",
                       f"don't summarize it, just open the {name}", f"where did I save the {name}? open it"])


def _reply(rng: random.Random, state: RequestState) -> str:
    roll = rng.random()
    cc: list[str] = []
    cc_text = ""
    if rng.random() < 0.2:
        person = _person(rng, "email")
        state.people.append(person)
        cc = _lookups(state, [person], "email")
        cc_text = rng.choice([f" and cc {person.spoken}", f", copying {person.spoken}"])
    state.done.append("replied to the email")
    if roll < 0.3:
        path, name = _file(state, rng)
        state.plan.add("reply_to_email", cc, f"Attached is the {name}.", [path])
        return rng.choice([f"reply to this email with the {name} attached{cc_text}",
                           f"answer the email and attach the {name}{cc_text}",
                           f"write back with the {name}{cc_text}"])
    if roll < 0.4 and state.artifacts.get("link"):
        state.plan.add("reply_to_email", cc, f"Here is the link: {state.artifacts['link']}", [])
        return rng.choice([f"reply with the link{cc_text}", f"answer that email with the zoom link{cc_text}"])
    topic = rng.choice(TOPICS)
    state.plan.add("reply_to_email", cc, f"Sounds good, the {topic} works for me.", [])
    return rng.choice([
        f"reply saying the {topic} works for me{cc_text}", f"respond to this email and confirm the {topic}{cc_text}",
        f"write back that I'm in for the {topic}{cc_text}", f"get back to them about the {topic}{cc_text}",
        f"don't forward it, just reply that the {topic} is fine{cc_text}",
        f"answer the thread and say yes to the {topic}{cc_text}",
    ])


def _forward(rng: random.Random, state: RequestState) -> str:
    reuse = state.people and rng.random() < 0.3
    people = [state.people[-1]] if reuse else _people(rng, "email", 2)
    who = _object(people) if reuse else _names(people)
    if not reuse:
        state.people.extend(people)
    recipients = _lookups(state, people, "email")
    attachments = []
    if "file" in state.artifacts and rng.random() < 0.5:
        attachments = [state.artifacts["file"]]
    state.plan.add("forward_email", recipients, [], "FYI, see below.", attachments)
    state.done.append("forwarded the email")
    return rng.choice([
        f"forward this email to {who}", f"pass this along to {who}", f"loop {who} in on that thread",
        f"send this thread on to {who}", f"make sure {who} sees this email", f"fwd this to {who}",
        f"don't reply, forward it to {who}", f"share this email with {who}",
    ])


def _maps(rng: random.Random, state: RequestState) -> str:
    if rng.random() < 0.35:
        place = rng.choice(PLACES)
        state.plan.add("maps_open_location", place)
        state.done.append("opened the location")
        return rng.choice([f"show {place} on the map", f"where exactly is {place}?", f"find {place} in maps",
                           f"I don't need directions, just show me where {place} is", f"pin {place} for me",
                           f"what does the area around {place} look like"])
    start, end = rng.sample(PLACES, 2)
    mode = rng.choice(list(TRANSPORT))
    how = rng.choice(TRANSPORT[mode])
    here = rng.random() < 0.4
    state.plan.add("maps_show_directions", "" if here else start, end, mode)
    state.done.append("shown the directions")
    origin = "from here" if here else f"from {start}"
    if mode == "d":
        forms = [f"how do I get to {end} {origin}", f"directions to {end} {origin}",
                 f"what's the fastest way to {end} {origin} by car", f"navigate me to {end} {origin}",
                 f"I'm driving to {end} {origin}, show me the route"]
    elif mode == "w":
        forms = [f"how do I walk to {end} {origin}", f"walking directions to {end} {origin}",
                 f"I want to get to {end} {origin} on foot", f"route me to {end} {origin}, I'm walking"]
    else:
        forms = [f"how do I get to {end} {origin} {how}", f"transit directions to {end} {origin}",
                 f"what bus goes to {end} {origin}", f"show me how to reach {end} {origin} {how}"]
    return rng.choice(forms)


def _notes(rng: random.Random, state: RequestState) -> str:
    roll = rng.random()
    folder = rng.choice(NOTE_FOLDERS)
    note = rng.choice(NOTE_NAMES)
    content = rng.choice(NOTE_CONTENT)
    if roll < 0.35:
        state.plan.add("create_note", _cap(note), content, folder)
        state.done.append("created the note")
        return rng.choice([f"jot down {content}", f"make a new note in {folder}: {content}",
                           f"write down that I need {content}", f"start a {note} note with {content}",
                           f"save '{content}' somewhere so I remember it"])
    if roll < 0.7:
        state.plan.add("append_note_content", _cap(note), content, folder)
        state.done.append("updated the note")
        return rng.choice([f"add {content} to my {note} note", f"append {content} to the {note} list",
                           f"put {content} on my {note}", f"don't make a new note, add {content} to {note}",
                           f"update my {note} with {content}"])
    state.plan.add("open_note", _cap(note), folder)
    state.done.append("opened the note")
    return rng.choice([f"open my {note} note", f"what's on my {note}?", f"read me my {note}",
                       f"pull up the {note} note from {folder}", f"show me what I wrote in {note}"])


# (intent, weight): weights set the tool shares and the mean tools per query (bench/synthetic_difficulty.py).
INTENTS: tuple[tuple[Callable[[random.Random, RequestState], str], float], ...] = (
    (_message, 3.0), (_meeting, 2.0), (_reminder, 1.2), (_summarize, 1.0), (_open_file, 0.35),
    (_reply, 0.8), (_forward, 0.8), (_maps, 1.2), (_notes, 1.2),
)


def _literal(value: Any) -> str:
    """A Python literal for a plan argument; strings in double quotes as TinyAgent writes them."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    return repr(value)  # None, bool, int


def render_plan(calls: list[Call], thought: str | None = None) -> str:
    """LLMCompiler plan text, ending in join() but without the <END_OF_PLAN> marker. `thought`,
    when given, is the `Thought:` line TinyAgent's examples put right before join()."""
    lines = [f"{number}. {call.tool}({', '.join(_literal(arg) for arg in call.args)})"
             for number, call in enumerate(calls, start=1)]
    if thought:
        lines.append(f"Thought: {thought}")
    lines.append(f"{len(calls) + 1}. {JOIN_TOOL}()")
    return "\n".join(lines)


def _closing_thought(done: list[str]) -> str:
    steps = list(dict.fromkeys(done))
    said = steps[0] if len(steps) == 1 else ", ".join(steps[:-1]) + " and " + steps[-1]
    return f"I have {said}."


@dataclass
class Request:
    query: str
    calls: list[Call]
    thought: str | None
    intents: int


def draw_request(rng: random.Random) -> Request:
    """One request: 1 to 4 intents whose plans total at most MAX_CALLS calls."""
    wanted = rng.choices([1, 2, 3, 4], weights=[0.36, 0.4, 0.18, 0.06])[0]
    state = RequestState(PlanBuilder())
    clauses: list[str] = []
    functions = [f for f, _ in INTENTS]
    weights = [w for _, w in INTENTS]
    for _attempt in range(wanted * 4):
        if len(clauses) >= wanted:
            break
        trial = RequestState(PlanBuilder(list(state.plan.calls), intent=len(clauses)), list(state.people),
                             dict(state.artifacts), dict(state.artifact_names), list(state.done))
        clause = rng.choices(functions, weights)[0](rng, trial)
        if len(trial.plan.calls) <= MAX_CALLS:
            state = trial
            clauses.append(clause)
    if rng.random() < 0.12:
        clauses[0] = f"{rng.choice(ASIDES)} {clauses[0]}"
    opener = rng.choice(POLITE_OPENERS)
    if opener in VERB_OPENERS and clauses[0].lower().startswith(NOT_A_VERB):
        opener = ""
    query = opener + (_cap(clauses[0]) if opener in ("", "Hi! ") else clauses[0])
    for clause in clauses[1:]:
        joiner = rng.choice(JOINERS)
        query += joiner + clause
    query += rng.choice(CLOSERS)
    if rng.random() < 0.15:
        query = query.lower()
    thought = _closing_thought(state.done) if rng.random() < 0.75 else None
    return Request(query, state.plan.calls, thought, len(clauses))


def _record(rng: random.Random, in_context: list[tuple[str, str]]) -> dict[str, Any]:
    request = draw_request(rng)
    plan_text = render_plan(request.calls, request.thought)
    messages = [
        {"role": "system", "content": planner_system_prompt(in_context)},
        {"role": "user", "content": f"Question: {request.query}"},
    ]
    parsed = ([{"tool_name": c.tool, "tool_args": c.args} for c in request.calls]
              + [{"tool_name": JOIN_TOOL, "tool_args": []}])
    observations = "\n".join(f"Observation {i}: done" for i in range(1, len(request.calls) + 1))
    join_point = {
        "type": "join",
        "raw_input": repr([
            {"role": "system", "content": JOIN_SYSTEM_PROMPT},
            {"role": "user", "content": f"Question: {request.query}\n\n{plan_text}\n{observations}"},
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
    return {"input": request.query, "output": [plan_point, join_point]}


def in_context_examples(seed: int) -> list[tuple[str, str]]:
    """The planner prompt's examples, the same for every record of a seed's data."""
    rng = random.Random(f"{seed}-examples")
    examples = []
    while len(examples) < 4:
        request = draw_request(rng)
        if 2 <= len(request.calls) <= 5 and request.intents <= 2:
            examples.append((request.query, render_plan(request.calls, request.thought)))
    return examples


def generate_split(num_records: int, seed: int, split: str,
                   exclude_queries: frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """Records of one split; the same (num_records, seed, split, exclusions) always gives the
    same data. A drawn request whose normalised query is in `exclude_queries` (or already in
    this split) is drawn again, so the training file never holds a test query."""
    rng = random.Random(f"{seed}-{split}")
    in_context = in_context_examples(seed)
    excluded = set(exclude_queries) | {normalize_query(q) for q, _ in in_context}
    records = {}
    for i in range(num_records):
        for _redraw in range(10_000):
            record = _record(rng, in_context)
            if normalize_query(record["input"]) not in excluded:
                break
        else:  # a bug in the grammar, not bad input: it cannot write enough distinct requests
            raise RuntimeError(f"{split} record {i}: 10,000 draws all repeated an excluded query")
        excluded.add(normalize_query(record["input"]))
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


_WORD = re.compile(r"[a-z0-9']+")
_REFERENCE = re.compile(r"\$\d+")


def single_word_probe(train: list, test: list, min_support: int = 1) -> dict[str, Any]:
    """How far single words go: for each tool, the words that occur only in training queries
    needing it (in at least `min_support` of them); a test query is given every tool one of its
    words marks. `train` and `test` are trainers.data.Example lists. Returns the probe's
    all-tools recall and mean tools retrieved on test, and the marking words per tool."""
    needs: dict[str, list[set[str]]] = {}
    for example in train:
        for word in set(_WORD.findall(example.query.lower())):
            needs.setdefault(word, []).append(set(example.tools))
    marks = {tool: sorted(word for word, tool_sets in needs.items()
                          if len(tool_sets) >= min_support and all(tool in s for s in tool_sets))
             for tool in TOOL_NAMES}
    marked_by = {tool: set(words) for tool, words in marks.items()}
    hits = retrieved = 0
    for example in test:
        words = set(_WORD.findall(example.query.lower()))
        predicted = {tool for tool in TOOL_NAMES if words & marked_by[tool]}
        hits += set(example.tools) <= predicted
        retrieved += len(predicted)
    total = max(len(test), 1)
    return {"tool_recall": hits / total, "tool_count": retrieved / total, "marking_words": marks}


def plan_shape_statistics(records: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per plan: calls (join excluded), `$N` references, fan-ins (a list argument holding two or
    more results) and references inside text; and the share of plans with a Thought line."""
    plans = [r["output"][0] for r in records.values()]
    calls = references = fan_ins = in_text = thoughts = 0
    longest = 0
    for point in plans:
        steps = [c for c in point["parsed_output"] if c["tool_name"] != JOIN_TOOL]
        calls += len(steps)
        longest = max(longest, len(steps))
        thoughts += "\nThought: " in "\n" + point["raw_output"]
        for call in steps:
            for arg in call["tool_args"]:
                items = arg if isinstance(arg, list) else [arg]
                found = [s for s in items if isinstance(s, str) and _REFERENCE.search(s)]
                references += len(found)
                fan_ins += isinstance(arg, list) and len(found) >= 2
                in_text += sum(not _REFERENCE.fullmatch(s) for s in found)
    total = max(len(plans), 1)
    return {"calls_per_plan": calls / total, "max_calls": longest, "references_per_plan": references / total,
            "fan_ins_per_plan": fan_ins / total, "text_references_per_plan": in_text / total,
            "plans_with_thought": thoughts / total}


def write_dataset(out_dir: Path, num_train: int = 2000, num_test: int = 500, seed: int = 0) -> dict[str, Any]:
    """Write training_data.json, testing_data.json and the generator marker into out_dir,
    each atomically; return each split's label statistics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    # Test first: its queries are then kept out of train (validation is carved from train).
    test_records = generate_split(num_test, seed, "test")
    test_queries = frozenset(normalize_query(r["input"]) for r in test_records.values())
    for split, file_name in (("train", "training_data.json"), ("test", "testing_data.json")):
        records = test_records if split == "test" else generate_split(num_train, seed, "train", test_queries)
        stats[split] = label_statistics(records)
        _write_atomically(out_dir / file_name, json.dumps(records))
    # The marker goes last: a folder with it holds both files whole.
    _write_atomically(out_dir / MARKER_FILE, json.dumps(
        {"generator_version": GENERATOR_VERSION, "seed": seed, "train": num_train, "test": num_test}))
    return stats


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def is_generated(data_dir: Path) -> bool:
    """Whether a data folder was written by this generator (of any version)."""
    return (Path(data_dir) / MARKER_FILE).is_file()


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
