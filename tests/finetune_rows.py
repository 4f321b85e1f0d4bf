"""Finetuning rows in prepare-data's instruction format, for the finetune tests and the bench.

`example_rows()` is the single source of such rows. Until prepare-data runs on the bundled example assistant in the
tests, it renders a compact (v2) command-generator prompt for a travel assistant (flows book_hotel, rent_car,
book_flight, check_booking) over a few dozen conversation states, each paired with its DSL completion: one v2 command
per line, no trailing newline, no end token (rasa-formats.md §7).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

FLOWS = [
    {
        "name": "book_hotel",
        "description": "book a hotel room",
        "slots": [
            {"name": "hotel_city", "description": "the city of the hotel"},
            {"name": "hotel_checkin_date", "description": "the day of arrival"},
            {"name": "hotel_nights", "description": "how many nights to stay"},
            {"name": "hotel_guests", "description": "the number of guests"},
        ],
    },
    {
        "name": "rent_car",
        "description": "rent a car for a trip",
        "slots": [
            {"name": "car_pickup_city", "description": "where the car is picked up"},
            {"name": "car_pickup_date", "description": "the day of pick-up"},
            {"name": "car_type", "description": "the car class", "allowed_values": "['compact', 'van', 'suv']"},
        ],
    },
    {
        "name": "book_flight",
        "description": "book a flight between two cities",
        "slots": [
            {"name": "flight_origin", "description": "the departure city"},
            {"name": "flight_destination", "description": "the arrival city"},
            {"name": "flight_date", "description": "the day of departure"},
        ],
    },
    {
        "name": "check_booking",
        "description": "look up an existing booking",
        "slots": [{"name": "booking_reference", "description": "the six-letter booking code"}],
    },
]

ACTIONS = """* `start flow flow_name`: start a flow, e.g. `start flow book_hotel`.
* `set slot slot_name slot_value`: set a slot, e.g. `set slot hotel_city Lisbon`; also corrects earlier values.
* `cancel flow`: cancel the current flow.
* `disambiguate flows flow_name1 flow_name2`: ask which flow the user means when the message is ambiguous.
* `provide info`: answer a question about the services.
* `offtopic reply`: answer small talk unrelated to any flow.
* `hand over`: hand the conversation to a human agent."""


@dataclass(frozen=True)
class Turn:
    history: tuple[str, ...]  # earlier transcript lines, "USER: ..." / "AI: ..."
    active_flow: str | None
    requested_slot: str | None
    filled: tuple[tuple[str, str], ...]  # slots of the active flow that already have values
    user_message: str
    completion: str


TURNS = [
    Turn((), None, None, (), "I need a hotel in Lisbon", "start flow book_hotel\nset slot hotel_city Lisbon"),
    Turn((), None, None, (), "book me a room in Paris for 3 nights",
         "start flow book_hotel\nset slot hotel_city Paris\nset slot hotel_nights 3"),
    Turn((), None, None, (), "can I rent a car?", "start flow rent_car"),
    Turn((), None, None, (), "I want an suv in Berlin", "start flow rent_car\nset slot car_pickup_city Berlin\nset slot car_type suv"),
    Turn((), None, None, (), "fly me from Madrid to Rome", "start flow book_flight\nset slot flight_origin Madrid\nset slot flight_destination Rome"),
    Turn((), None, None, (), "where is my booking KXQ7PL?", "start flow check_booking\nset slot booking_reference KXQ7PL"),
    Turn((), None, None, (), "booking", "disambiguate flows book_flight book_hotel check_booking"),
    Turn((), None, None, (), "how's the weather up there?", "offtopic reply"),
    Turn((), None, None, (), "do you charge a fee for cancellations?", "provide info"),
    Turn((), None, None, (), "let me talk to a person", "hand over"),
    Turn((), None, None, (), "I need a flight to Tokyo", "start flow book_flight\nset slot flight_destination Tokyo"),
    Turn((), None, None, (), "hotel and a car in Rome please",
         "start flow book_hotel\nstart flow rent_car\nset slot hotel_city Rome\nset slot car_pickup_city Rome"),
    Turn(("USER: I need a hotel", "AI: Which city?"), "book_hotel", "hotel_city", (), "Berlin", "set slot hotel_city Berlin"),
    Turn(("USER: I need a hotel", "AI: Which city?"), "book_hotel", "hotel_city", (), "actually Madrid, for 2 guests",
         "set slot hotel_city Madrid\nset slot hotel_guests 2"),
    Turn(("USER: a hotel in Paris", "AI: When do you arrive?"), "book_hotel", "hotel_checkin_date",
         (("hotel_city", "Paris"),), "on the 4th of May", "set slot hotel_checkin_date 4th of May"),
    Turn(("USER: a hotel in Paris", "AI: When do you arrive?", "USER: May 4", "AI: How many nights?"), "book_hotel",
         "hotel_nights", (("hotel_city", "Paris"), ("hotel_checkin_date", "May 4")), "five", "set slot hotel_nights 5"),
    Turn(("USER: a hotel in Paris", "AI: How many guests?"), "book_hotel", "hotel_guests",
         (("hotel_city", "Paris"),), "just me", "set slot hotel_guests 1"),
    Turn(("USER: a hotel in Paris", "AI: How many guests?"), "book_hotel", "hotel_guests",
         (("hotel_city", "Paris"),), "forget it", "cancel flow"),
    Turn(("USER: a hotel in Lisbon", "AI: When do you arrive?"), "book_hotel", "hotel_checkin_date",
         (("hotel_city", "Lisbon"),), "sorry, I meant Porto", "set slot hotel_city Porto"),
    Turn(("USER: rent a car", "AI: Where will you pick it up?"), "rent_car", "car_pickup_city", (), "Lisbon airport",
         "set slot car_pickup_city Lisbon airport"),
    Turn(("USER: rent a car", "AI: Where will you pick it up?"), "rent_car", "car_pickup_city", (), "in Rome tomorrow",
         "set slot car_pickup_city Rome\nset slot car_pickup_date tomorrow"),
    Turn(("USER: a car in Berlin", "AI: Which car class?"), "rent_car", "car_type", (("car_pickup_city", "Berlin"),),
         "a van", "set slot car_type van"),
    Turn(("USER: a car in Berlin", "AI: Which car class?"), "rent_car", "car_type", (("car_pickup_city", "Berlin"),),
         "the smallest one", "set slot car_type compact"),
    Turn(("USER: a car in Berlin", "AI: Which car class?"), "rent_car", "car_type", (("car_pickup_city", "Berlin"),),
         "is insurance included?", "provide info"),
    Turn(("USER: a car in Madrid", "AI: When do you pick it up?"), "rent_car", "car_pickup_date",
         (("car_pickup_city", "Madrid"),), "stop, I don't need it", "cancel flow"),
    Turn(("USER: a flight", "AI: Where from?"), "book_flight", "flight_origin", (), "from Berlin",
         "set slot flight_origin Berlin"),
    Turn(("USER: a flight", "AI: Where from?", "USER: Paris", "AI: Where to?"), "book_flight", "flight_destination",
         (("flight_origin", "Paris"),), "to Lisbon on Friday",
         "set slot flight_destination Lisbon\nset slot flight_date Friday"),
    Turn(("USER: a flight to Rome", "AI: When do you fly?"), "book_flight", "flight_date",
         (("flight_destination", "Rome"),), "next Monday, and I need a hotel there too",
         "set slot flight_date next Monday\nstart flow book_hotel\nset slot hotel_city Rome"),
    Turn(("USER: a flight to Rome", "AI: When do you fly?"), "book_flight", "flight_date",
         (("flight_destination", "Rome"),), "this is taking forever, get me a human", "hand over"),
    Turn(("USER: check my booking", "AI: What is your booking code?"), "check_booking", "booking_reference", (),
         "it's ZT4M2Q", "set slot booking_reference ZT4M2Q"),
    Turn(("USER: check my booking", "AI: What is your booking code?"), "check_booking", "booking_reference", (),
         "haha you sound like a robot", "offtopic reply"),
    Turn(("USER: check my booking", "AI: What is your booking code?"), "check_booking", "booking_reference", (),
         "never mind", "cancel flow"),
]


def _flows_json() -> str:
    # One line of JSON, as v2 prompts list flows; allowed_values stays a Python list repr like Rasa renders it.
    return json.dumps({"flows": FLOWS}, separators=(",", ":"))


def _current_state(turn: Turn) -> str:
    if turn.active_flow is None:
        return "You are not inside any flow right now."
    flow = next(flow for flow in FLOWS if flow["name"] == turn.active_flow)
    values = dict(turn.filled)
    slots = [{"name": slot["name"], "value": values.get(slot["name"], "undefined")} for slot in flow["slots"]]
    state = {"active_flow": turn.active_flow, "current_step": {"requested_slot": turn.requested_slot}, "slots": slots}
    return "Structured state:\n```json\n" + json.dumps(state, separators=(",", ":")) + "\n```"


def render_prompt(turn: Turn) -> str:
    """A compact command-generator prompt in the v2 style: task, flows, actions, state, transcript, last message."""
    transcript = "\n".join((*turn.history, f"USER: {turn.user_message}"))
    return (
        "## Task\nRead the conversation and list the actions that start flows, fill slots, or answer small talk "
        "and questions.\n\n---\n\n## Available flows and slots\n```json\n"
        f"{_flows_json()}\n```\n\n---\n\n## Available actions\n{ACTIONS}\n\n---\n\n## Current state\n"
        f"{_current_state(turn)}\n\n---\n\n## Conversation\n{transcript}\n\n---\n\n## Your task\n"
        f'Write one action per line for the last user message: """{turn.user_message}""".\n\nYour action list:'
    )


def example_rows() -> list[dict]:
    """A few dozen instruction rows `{"prompt", "completion"}` (v2 syntax), in a fixed order."""
    return [{"prompt": render_prompt(turn), "completion": turn.completion} for turn in TURNS]
