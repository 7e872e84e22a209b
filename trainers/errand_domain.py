"""Requests and plans of another domain (errands: payments, travel, dining, home, documents),
which the laptop planner base reads before it ever meets TinyAgent's 16 tools.

TinyLlama had read code, function calls among it, before LoRA taught it TinyAgent's tools. The
laptop base gets the same kind of head start from this grammar: its plans use the LLMCompiler
syntax TinyAgent's plans use (numbered calls, `"$N"` references alone, in lists and inside
text, a `Thought:` line, `join()` and the end marker) and the same shapes (look-ups fanned into
one call, a result carried into a later call's text, dependencies across intents), but over
19 tools of their own. None of them is one of TinyAgent's 16, so no TinyAgent plan can be in
what the base reads (tests/test_planner_base.py checks that with the scorer's own parser).

The request language shares only what any English request shares: names of people, time
expressions, politeness and joiners.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field
from typing import Callable

from trainers.planner_prompts import TODAY
from trainers.synthetic import (
    CLOSERS, FIRST_NAMES, JOINERS, LAST_NAMES, POLITE_OPENERS, VERB_OPENERS, PlanBuilder, render_plan,
)
from trainers.tools import TOOL_NAMES

ERRAND_TOOLS: dict[str, str] = {
    "find_account": "(name: str) -> str",
    "send_payment": "(accounts: list[str], amount: float, memo: str) -> str",
    "request_payment": "(accounts: list[str], amount: float, memo: str) -> str",
    "create_payment_link": "(amount: float, memo: str) -> str",
    "search_flights": "(origin: str, destination: str, departure: str) -> str",
    "book_flight": "(flight: str, seats: int) -> str",
    "book_hotel": "(city: str, check_in: str, check_out: str, guests: int) -> str",
    "get_weather": "(city: str, date: str) -> str",
    "find_restaurant": "(cuisine: str, city: str) -> str",
    "reserve_table": "(restaurant: str, time: str, party_size: int) -> str",
    "order_groceries": "(items: list[str], delivery_time: str) -> str",
    "set_thermostat": "(room: str, temperature: int) -> str",
    "play_music": "(query: str, room: str) -> str",
    "set_alarm": "(time: str, label: str) -> str",
    "get_document": "(name: str) -> str",
    "translate_text": "(text: str, language: str) -> str",
    "share_document": "(document: str, accounts: list[str]) -> str",
    "post_to_channel": "(channel: str, message: str) -> str",
    "track_package": "(tracking_number: str) -> str",
}
assert not set(ERRAND_TOOLS) & set(TOOL_NAMES), "the errand tools must be other tools than TinyAgent's"

MAX_CALLS = 8
CITIES = ["Denver", "Lisbon", "Chicago", "Osaka", "Austin", "Oslo", "Toronto", "Seattle", "Madrid", "Nairobi",
          "Boston", "Prague", "Dublin", "Lima", "Portland"]
CUISINES = ["thai", "italian", "ramen", "mexican", "vegan", "sushi", "indian", "greek", "korean barbecue",
            "dim sum"]
ROOMS = ["living room", "bedroom", "kitchen", "office", "kids' room", "basement"]
SONGS = ["some jazz", "the morning playlist", "lo-fi beats", "Abbey Road", "classical piano", "the road trip mix",
         "something upbeat", "Fleetwood Mac", "rain sounds"]
GROCERIES = ["eggs", "bananas", "coffee beans", "rice", "spinach", "olive oil", "bread", "yogurt", "lemons",
             "pasta", "tofu", "apples"]
DOCUMENTS = ["rental contract", "visa letter", "wedding speech", "packing checklist", "trip budget",
             "school permission form", "recipe card", "warranty terms", "club newsletter"]
LANGUAGES = ["Spanish", "French", "Japanese", "German", "Portuguese", "Korean", "Italian"]
CHANNELS = ["#family", "#roommates", "#book-club", "#trip-planning", "#team-lunch", "#neighbors"]
PURPOSES = ["dinner", "concert tickets", "the cabin", "groceries", "the birthday gift", "rent", "the taxi",
            "lunch", "the utilities bill", "movie night"]
ALARM_LABELS = ["gym", "flight", "wake up", "meds", "standup", "pickup"]


@dataclass
class ErrandState:
    plan: PlanBuilder = field(default_factory=PlanBuilder)
    # Results a later intent may carry: {"link": "$2", "flight": "$4", "translation": "$6", ...}.
    results: dict[str, str] = field(default_factory=dict)
    people: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _moment(rng: random.Random) -> tuple[dt.datetime, str]:
    """A time after TODAY and how a request says it."""
    hour, minute = rng.randint(7, 21), rng.choice([0, 0, 30])
    shown = f"{hour % 12 or 12}{':30' if minute else ''}{'am' if hour < 12 else 'pm'}"
    form = rng.randrange(4)
    if form == 0:
        day = TODAY + dt.timedelta(days=1)
        return day.replace(hour=hour, minute=minute), f"tomorrow at {shown}"
    if form == 1:
        day = TODAY + dt.timedelta(days=rng.randint(2, 6))
        return day.replace(hour=hour, minute=minute), f"on {day:%A} at {shown}"
    if form == 2:
        day = TODAY + dt.timedelta(days=rng.randint(8, 40))
        return day.replace(hour=hour, minute=minute), f"on {day:%B} {day.day} at {shown}"
    return TODAY.replace(hour=hour if hour > 9 else 19, minute=minute), f"today at {shown if hour > 9 else '7pm'}"


def _iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _people(rng: random.Random, state: ErrandState) -> list[str]:
    count = rng.choices([1, 2, 3], weights=[0.6, 0.3, 0.1])[0]
    names: list[str] = []
    while len(names) < count:
        name = rng.choice(FIRST_NAMES) if rng.random() < 0.8 else f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        if name not in names:
            names.append(name)
    state.people.extend(names)
    return names


def _spoken(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _accounts(state: ErrandState, names: list[str]) -> list[str]:
    return [state.plan.add("find_account", name) for name in names]


# ----- intents: each adds its calls and returns the clause that asks for them ------------------
def _payment(rng: random.Random, state: ErrandState) -> str:
    names = _people(rng, state)
    who = _spoken(names)
    amount = rng.choice([12, 15, 20, 25, 30, 40, 45, 60, 80, 120])
    purpose = rng.choice(PURPOSES)
    accounts = _accounts(state, names)
    if rng.random() < 0.55:
        state.plan.add("send_payment", accounts, float(amount), _cap(purpose))
        state.done.append("sent the payment")
        return rng.choice([f"pay {who} {amount} dollars for {purpose}", f"send {who} {amount} bucks for {purpose}",
                           f"transfer {amount} dollars to {who} for {purpose}", f"I owe {who} {amount} for {purpose}, "
                           f"send it", f"settle up with {who}: {amount} dollars for {purpose}"])
    state.plan.add("request_payment", accounts, float(amount), _cap(purpose))
    state.done.append("requested the money")
    return rng.choice([f"ask {who} to pay me {amount} dollars for {purpose}", f"request {amount} from {who} for {purpose}",
                       f"charge {who} {amount} dollars for {purpose}", f"{who} owes me {amount} for {purpose}, "
                       f"request it", f"collect {amount} dollars from {who} for {purpose}"])


def _payment_link(rng: random.Random, state: ErrandState) -> str:
    amount, purpose = rng.choice([10, 25, 35, 50]), rng.choice(PURPOSES)
    link = state.plan.add("create_payment_link", float(amount), _cap(purpose))
    state.results["link"] = link
    state.done.append("made the payment link")
    if rng.random() < 0.6:
        channel = rng.choice(CHANNELS)
        state.plan.add("post_to_channel", channel, f"Chip in for {purpose} here: {link}")
        state.done.append("posted it")
        return rng.choice([f"make a {amount} dollar payment link for {purpose} and post it in {channel}",
                           f"create a link so people can chip in {amount} for {purpose}, share it on {channel}",
                           f"set up a pay link for {purpose} ({amount} dollars) and drop it in {channel}"])
    return rng.choice([f"make a payment link for {amount} dollars for {purpose}",
                       f"create a {amount} dollar pay link for {purpose}"])


def _travel(rng: random.Random, state: ErrandState) -> str:
    origin, city = rng.sample(CITIES, 2)
    moment, spoken = _moment(rng)
    roll = rng.random()
    if roll < 0.4:
        flights = state.plan.add("search_flights", origin, city, _iso(moment))
        if rng.random() < 0.6:
            seats = rng.choice([1, 1, 2, 3, 4])
            state.results["flight"] = state.plan.add("book_flight", flights, seats)
            state.done.append("booked the flight")
            return rng.choice([f"find a flight from {origin} to {city} {spoken} and book {seats} seat"
                               f"{'s' if seats > 1 else ''}", f"book {seats} ticket{'s' if seats > 1 else ''} "
                               f"on a flight to {city} from {origin} {spoken}", f"get me on a plane from {origin} to "
                               f"{city} {spoken}, {seats} seat{'s' if seats > 1 else ''}"])
        state.done.append("found the flights")
        return rng.choice([f"look up flights from {origin} to {city} {spoken}", f"what flights go to {city} from "
                           f"{origin} {spoken}", f"search for a flight {origin} to {city} {spoken}"])
    if roll < 0.7:
        nights, guests = rng.randint(1, 5), rng.choice([1, 2, 2, 3, 4])
        check_out = moment + dt.timedelta(days=nights)
        state.results["hotel"] = state.plan.add("book_hotel", city, _iso(moment), _iso(check_out), guests)
        state.done.append("booked the hotel")
        return rng.choice([f"book a hotel in {city} {spoken} for {nights} night{'s' if nights > 1 else ''}, "
                           f"{guests} guest{'s' if guests > 1 else ''}", f"I need a room in {city} for {guests} from "
                           f"{spoken}, {nights} night{'s' if nights > 1 else ''}", f"reserve a place to stay in {city} "
                           f"{spoken} for {nights} night{'s' if nights > 1 else ''}"])
    state.results["weather"] = state.plan.add("get_weather", city, _iso(moment))
    state.done.append("checked the weather")
    return rng.choice([f"what's the weather in {city} {spoken}", f"will it rain in {city} {spoken}",
                       f"check the forecast for {city} {spoken}", f"how cold is it going to be in {city} {spoken}"])


def _dinner(rng: random.Random, state: ErrandState) -> str:
    cuisine, city = rng.choice(CUISINES), rng.choice(CITIES)
    place = state.plan.add("find_restaurant", cuisine, city)
    if rng.random() < 0.3:
        state.done.append("found a restaurant")
        return rng.choice([f"find a good {cuisine} place in {city}", f"where can I get {cuisine} in {city}"])
    moment, spoken = _moment(rng)
    size = rng.choice([2, 2, 3, 4, 6])
    state.results["table"] = state.plan.add("reserve_table", place, _iso(moment), size)
    state.done.append("reserved the table")
    return rng.choice([f"book a table for {size} at a {cuisine} restaurant in {city} {spoken}",
                       f"find {cuisine} in {city} and reserve for {size} {spoken}",
                       f"get us a {cuisine} dinner reservation in {city} {spoken}, party of {size}",
                       f"we want {cuisine} {spoken} in {city}, {size} people, book it"])


def _home(rng: random.Random, state: ErrandState) -> str:
    room = rng.choice(ROOMS)
    roll = rng.random()
    if roll < 0.35:
        degrees = rng.randint(16, 25)
        state.plan.add("set_thermostat", room, degrees)
        state.done.append("set the thermostat")
        return rng.choice([f"set the {room} to {degrees} degrees", f"warm the {room} up to {degrees}",
                           f"make it {degrees} degrees in the {room}", f"change the {room} thermostat to {degrees}"])
    if roll < 0.7:
        song = rng.choice(SONGS)
        state.plan.add("play_music", song, room)
        state.done.append("started the music")
        return rng.choice([f"play {song} in the {room}", f"put on {song} in the {room}",
                           f"I want {song} playing in the {room}", f"start {song} on the {room} speaker"])
    moment, spoken = _moment(rng)
    label = rng.choice(ALARM_LABELS)
    state.plan.add("set_alarm", _iso(moment), _cap(label))
    state.done.append("set the alarm")
    return rng.choice([f"set an alarm {spoken} for {label}", f"wake me {spoken}, label it {label}",
                       f"alarm {spoken} called {label}", f"I need an alarm for {label} {spoken}"])


def _groceries(rng: random.Random, state: ErrandState) -> str:
    items = rng.sample(GROCERIES, rng.randint(1, 4))
    moment, spoken = _moment(rng)
    state.plan.add("order_groceries", items, _iso(moment))
    state.done.append("ordered the groceries")
    listed = _spoken(items)
    return rng.choice([f"order {listed} for delivery {spoken}", f"get {listed} delivered {spoken}",
                       f"we're out of {listed}, have them brought {spoken}", f"buy {listed}, deliver {spoken}"])


def _document(rng: random.Random, state: ErrandState) -> str:
    name = rng.choice(DOCUMENTS)
    document = state.plan.add("get_document", name)
    roll = rng.random()
    if roll < 0.45:
        language = rng.choice(LANGUAGES)
        translation = state.plan.add("translate_text", document, language)
        state.results["translation"] = translation
        state.done.append("translated the document")
        if rng.random() < 0.4:
            names = _people(rng, state)
            state.plan.add("share_document", translation, _accounts(state, names))
            state.done.append("shared it")
            return rng.choice([f"translate the {name} into {language} and share it with {_spoken(names)}",
                               f"get the {name} in {language} to {_spoken(names)}"])
        return rng.choice([f"translate the {name} into {language}", f"put the {name} in {language}",
                           f"I need the {name} in {language}"])
    if roll < 0.8:
        names = _people(rng, state)
        state.plan.add("share_document", document, _accounts(state, names))
        state.done.append("shared the document")
        return rng.choice([f"share the {name} with {_spoken(names)}", f"give {_spoken(names)} access to the {name}",
                           f"send the {name} over to {_spoken(names)}"])
    state.done.append("opened the document")
    return rng.choice([f"pull up the {name}", f"find my {name}", f"open the {name} document"])


def _package(rng: random.Random, state: ErrandState) -> str:
    number = f"{rng.choice(['1Z', 'TBA', 'JD'])}{rng.randint(10_000_000, 99_999_999)}"
    status = state.plan.add("track_package", number)
    state.done.append("tracked the package")
    if rng.random() < 0.35:
        channel = rng.choice(CHANNELS)
        state.plan.add("post_to_channel", channel, f"Package update: {status}")
        return rng.choice([f"track package {number} and post the update in {channel}",
                           f"where is {number}? tell {channel}"])
    return rng.choice([f"where is my package {number}", f"track {number}", f"has {number} shipped yet"])


def _post(rng: random.Random, state: ErrandState) -> str:
    """A message to a group channel, carrying an earlier result when there is one."""
    channel = rng.choice(CHANNELS)
    carried = [key for key in ("flight", "hotel", "table", "weather", "translation") if key in state.results]
    if carried and rng.random() < 0.7:
        key = rng.choice(carried)
        state.plan.add("post_to_channel", channel, f"Here are the {key} details: {state.results[key]}")
        state.done.append("posted the details")
        return rng.choice([f"post the {key} details in {channel}", f"let {channel} know about the {key}",
                           f"share the {key} info on {channel}"])
    note = rng.choice(["dinner is at 8", "I'm bringing snacks", "the cabin is booked", "meeting moved to Sunday"])
    state.plan.add("post_to_channel", channel, _cap(note))
    state.done.append("posted the message")
    return rng.choice([f"tell {channel} that {note}", f"post in {channel} that {note}", f"let {channel} know {note}"])


INTENTS: tuple[tuple[Callable[[random.Random, ErrandState], str], float], ...] = (
    (_payment, 2.0), (_payment_link, 0.6), (_travel, 1.6), (_dinner, 1.0), (_home, 1.2), (_groceries, 0.8),
    (_document, 1.2), (_package, 0.6), (_post, 0.8),
)


@dataclass(frozen=True)
class ErrandRequest:
    question: str
    plan: str  # LLMCompiler plan text ending in join(), without the end marker


def draw_errand(rng: random.Random) -> ErrandRequest:
    """One request of one to four intents, at most MAX_CALLS calls, and its plan."""
    wanted = rng.choices([1, 2, 3, 4], weights=[0.35, 0.4, 0.18, 0.07])[0]
    state, clauses = ErrandState(), []
    functions, weights = [f for f, _ in INTENTS], [w for _, w in INTENTS]
    for _attempt in range(wanted * 4):
        if len(clauses) >= wanted:
            break
        trial = ErrandState(PlanBuilder(list(state.plan.calls)), dict(state.results), list(state.people),
                            list(state.done))
        clause = rng.choices(functions, weights)[0](rng, trial)
        if len(trial.plan.calls) <= MAX_CALLS:
            state = trial
            clauses.append(clause)
    opener = rng.choice(POLITE_OPENERS)
    first = clauses[0]
    if opener in VERB_OPENERS and first.lower().startswith(("what", "where", "how", "i ", "we", "will", "has")):
        opener = ""
    question = opener + (_cap(first) if opener in ("", "Hi! ") else first)
    for clause in clauses[1:]:
        question += rng.choice(JOINERS) + clause
    question += rng.choice(CLOSERS)
    steps = list(dict.fromkeys(state.done))
    said = steps[0] if len(steps) == 1 else ", ".join(steps[:-1]) + " and " + steps[-1]
    thought = f"I have {said}." if rng.random() < 0.75 else None
    return ErrandRequest(question, render_plan(state.plan.calls, thought))


def errand_requests(count: int, seed: int) -> list[ErrandRequest]:
    """`count` requests with distinct questions; the same (count, seed) gives the same list."""
    rng = random.Random(f"{seed}-errands")
    seen: set[str] = set()
    requests: list[ErrandRequest] = []
    while len(requests) < count:
        request = draw_errand(rng)
        if request.question not in seen:
            seen.add(request.question)
            requests.append(request)
    return requests


def errand_tool_list() -> str:
    """The errand tools as a prompt lists them: unnumbered, so the list itself never parses as a plan."""
    return "\n".join(f"- {name}{signature}" for name, signature in ERRAND_TOOLS.items())
