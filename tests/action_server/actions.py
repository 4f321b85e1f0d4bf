"""The custom actions of tests/data/actions_assistant, written the way real projects write them (rasa-sdk).

This module runs inside rasa-sdk's own virtual environment (`python -m rasa_sdk --actions actions`), never in
recipe's: it imports nothing of recipe. Every run appends one JSON line to `$RECIPE_TEST_ACTIONS_LOG` (what the
action saw), so tests can count real executions and check how rasa-sdk parsed the tracker we sent. Flaky actions
keep their state in `$RECIPE_TEST_ACTIONS_STATE`, a folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rasa_sdk import Action, Tracker
from rasa_sdk.events import FollowupAction, SlotSet
from rasa_sdk.executor import CollectingDispatcher

HOTELS = {
    "New York": [("Pod 51", 120), ("The Plaza", 420), ("The Standard", 260)],
    "Paris": [("Hotel Lutetia", 380), ("Hotel du Nord", 140)],
    "Lisbon": [],
}
ALIASES = {"nyc": "New York", "ny": "New York", "new york city": "New York", "paris": "Paris", "lisbon": "Lisbon"}
BALANCE = 250


def _record(name: str, tracker: Tracker, **extra: Any) -> None:
    entry = {
        "action": name,
        "sender": tracker.sender_id,
        "latest_message": tracker.latest_message.get("text"),
        "slots": {key: value for key, value in tracker.slots.items() if value is not None},
        "event_types": [event.get("event") for event in tracker.events],
        "stack": [frame.get("flow_id") for frame in tracker.stack],
        "to_validate": sorted(tracker.slots_to_validate()),  # what this turn set: validation actions read it
        **extra,
    }
    path = os.environ.get("RECIPE_TEST_ACTIONS_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps(entry) + "\n")


class ValidateCity(Action):
    """Normalises the city the user named ("nyc" -> "New York"); an unknown city sets `city_ok` false."""

    def name(self) -> str:
        return "action_validate_city"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: dict[str, Any]) -> list[dict]:
        _record(self.name(), tracker)
        city = str(tracker.get_slot("city") or "").strip()
        canonical = ALIASES.get(city.casefold()) or next((c for c in HOTELS if c.casefold() == city.casefold()), None)
        if canonical is None:
            return [SlotSet("city_ok", False)]
        return [SlotSet("city", canonical), SlotSet("city_ok", True)]


class SearchHotels(Action):
    """Puts the search results in slots; "cheap" in the user's latest message picks the cheapest hotel."""

    def name(self) -> str:
        return "action_search_hotels"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: dict[str, Any]) -> list[dict]:
        _record(self.name(), tracker)
        hotels = HOTELS.get(str(tracker.get_slot("city")), [])
        dispatcher.utter_message(response="utter_search_done", count=len(hotels))
        if not hotels:
            return [SlotSet("hotels_found", 0), SlotSet("hotel_name", None)]
        cheap = "cheap" in (tracker.latest_message.get("text") or "").lower()
        best = min(hotels, key=lambda h: h[1]) if cheap else max(hotels, key=lambda h: h[1])
        return [SlotSet("hotels_found", len(hotels)), SlotSet("hotel_name", best[0])]


class CheckFunds(Action):
    """Its result drives the flow's `next:` branch (`if: slots.funds_ok`)."""

    def name(self) -> str:
        return "action_check_funds"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: dict[str, Any]) -> list[dict]:
        _record(self.name(), tracker)
        amount = float(tracker.get_slot("amount") or 0)
        return [SlotSet("funds_ok", 0 < amount <= BALANCE)]


class GreetUser(Action):
    """Utters a domain response by name (another one when the user has spoken before), then says to listen."""

    def name(self) -> str:
        return "action_greet_user"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: dict[str, Any]) -> list[dict]:
        _record(self.name(), tracker)
        user_messages = [event for event in tracker.events if event.get("event") == "user"]
        dispatcher.utter_message(response="utter_greet" if len(user_messages) <= 1 else "utter_greet_again")
        return [FollowupAction("action_listen")]


class TellBalance(Action):
    """Returns a text message. Fails (HTTP 500) the first time it runs for a conversation: a transient error that
    the caller must retry."""

    def name(self) -> str:
        return "action_tell_balance"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: dict[str, Any]) -> list[dict]:
        state = Path(os.environ.get("RECIPE_TEST_ACTIONS_STATE", "."))
        marker = state / ("balance-" + "".join(c if c.isalnum() else "_" for c in tracker.sender_id))
        if not marker.exists():
            marker.write_text("failed once\n", encoding="utf-8")
            _record(self.name(), tracker, failed=True)
            raise RuntimeError("the core banking system did not answer")
        _record(self.name(), tracker)
        dispatcher.utter_message(text=f"Your balance is {BALANCE} euros.")
        return []
