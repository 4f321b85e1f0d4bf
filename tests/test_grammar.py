"""The command grammar of the example assistant: the regex and the byte automaton accept the same answers, every
answer they accept is a parseable, valid set of commands, every correct answer of the example's tests is accepted,
and the logits processor keeps a random tiny model (which otherwise emits garbage) inside the language."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rt_artifacts import offline
from tiny_model import build_tiny_model

from recipe.annotate import annotate_from_assertions
from recipe.backends import _torch_threads
from recipe.command_validation import validate_commands
from recipe.commands import Syntax, format_commands, parse_model_output
from recipe.conversation import replay_test_case
from recipe.decoding import CommandLogitsProcessor, token_bytes, token_constraint
from recipe.errors import ConfigError
from recipe.grammar import DEAD, MAX_TEXT_VALUE, build_grammar, grammar_from_regex, startable_flow_ids
from recipe.project import load_project
from recipe.prompt import PROMPTS_DIR, PromptRenderer, load_template, prompt_variables
from recipe.testcases import all_test_cases, load_tests

REPO = Path(__file__).resolve().parent.parent
SYNTAXES = (Syntax.V1, Syntax.V2, Syntax.V3)


@pytest.fixture(scope="module")
def project():
    return load_project(REPO)


@pytest.fixture(scope="module")
def grammars(project):
    return {syntax: build_grammar(project, syntax) for syntax in SYNTAXES}


@pytest.fixture(scope="module")
def gold_answers(project) -> list[tuple]:
    """Every annotated turn's commands in the example's tests (written, or derived from assertions)."""
    answers = []
    for test_case in all_test_cases(load_tests([str(REPO / "e2e_tests")], project)):
        for turn in annotate_from_assertions(project, test_case).turns:
            if turn.commands:
                answers.append(tuple(turn.commands))
    return answers


def test_language_follows_the_project(project, grammars):
    grammar = grammars[Syntax.V2]
    link_only = {flow.id for flow in project.user_flows if flow.guard == "False"}
    assert link_only == {"offer_travel_insurance", "collect_driver_details"}  # reached only by link or call
    assert (
        list(grammar.flows)
        == startable_flow_ids(project)
        == [f.id for f in project.user_flows if f.id not in link_only]
    )
    assert "book_hotel" in grammar.flows and "greet" in grammar.flows
    assert not any(flow.startswith("pattern_") for flow in grammar.flows)
    assert "user_logged_in" not in grammar.slots and "car_available" not in grammar.slots  # controlled slots
    assert "hotel_city" in grammar.slots and "room_type" in grammar.slots
    accepted = [
        "start flow book_hotel",
        "set slot room_type suite",
        "set slot num_nights 3",
        "set slot confirm_hotel_booking True",
        "set slot hotel_city New York",
        "cancel flow",
        "disambiguate flows book_hotel book_rental_car",
        "start flow greet\nset slot hotel_city Porto",
    ]
    rejected = [
        "start flow offer_travel_insurance",
        "start flow pattern_chitchat",
        "set slot room_type huge",
        "set slot num_nights three",
        "set slot user_logged_in True",
        "Start flow book_hotel",
        "start flow book_hotel ",
        "start flow book_hotel\n",
        "",
        "set slot hotel_city ",
        "set slot hotel_city " + "x" * MAX_TEXT_VALUE + "y",
        "disambiguate flows book_hotel",
        "set slot hotel_city a\nb",
        "set slot hotel_city a\u2028b",
        "set slot hotel_city a\x85b",
        "StartFlow(book_hotel)",
        "search and reply",
    ]
    matcher = grammar.matcher()
    for text in accepted:
        assert re.fullmatch(grammar.regex, text) and matcher.fullmatch(text), text
    for text in rejected:
        assert not re.fullmatch(grammar.regex, text) and not matcher.fullmatch(text), text
    assert re.fullmatch(grammars[Syntax.V3].regex, "search and reply")
    assert re.fullmatch(grammars[Syntax.V1].regex, "SetSlot(hotel_city, Lisbon)\nStartFlow(book_hotel)")


def test_every_correct_answer_of_the_example_tests_is_in_the_language(project, grammars, gold_answers):
    assert len(gold_answers) > 100
    for syntax, grammar in grammars.items():
        matcher = grammar.matcher()
        for commands in gold_answers:
            text = format_commands(commands, syntax)
            assert matcher.fullmatch(text) and re.fullmatch(grammar.regex, text), (syntax, text)


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_every_answer_in_the_language_parses_into_valid_commands(project, grammars, syntax):
    grammar = grammars[syntax]
    matcher = grammar.matcher()

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.from_regex(grammar.regex, fullmatch=True))
    def check(text: str) -> None:
        assert matcher.fullmatch(text)
        parsed = parse_model_output(text, syntax)
        assert parsed.fully_parsed, text
        assert len(parsed.commands) == text.count("\n") + 1
        kept, dropped = validate_commands(parsed.commands, project)
        assert not dropped, (text, dropped)

    check()


def test_regex_and_byte_automaton_agree_on_near_misses(grammars):
    grammar = grammars[Syntax.V2]
    matcher = grammar.matcher()
    pattern = re.compile(grammar.regex)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.from_regex(grammar.regex, fullmatch=True),
        st.integers(0, 200),
        st.sampled_from(["", " ", "\n", "x", "_", "ü", ")", "\x85", "\u2028", "\x7f"]),
        st.booleans(),
    )
    def check(text: str, position: int, insert: str, delete: bool) -> None:
        cut = position % (len(text) + 1)
        mutated = text[:cut] + insert + text[cut + (1 if delete else 0) :]
        assert bool(pattern.fullmatch(mutated)) == matcher.fullmatch(mutated), repr(mutated)
        # Every prefix of an accepted answer is a live prefix; the automaton never dies on it.
        assert matcher.is_prefix(text[:cut])

    check()


def test_grammar_for_some_flows_is_found_again_from_its_regex(project):
    for syntax in SYNTAXES:
        for flows in (None, ("book_hotel",), (), ("greet", "book_hotel", "book_rental_car")):
            grammar = build_grammar(project, syntax, flows=flows)
            assert grammar_from_regex(project, syntax, grammar.regex).regex == grammar.regex
    only_hotel = build_grammar(project, Syntax.V2, flows=["book_hotel"])
    assert re.fullmatch(only_hotel.regex, "start flow book_hotel")
    assert not re.fullmatch(only_hotel.regex, "start flow greet")
    assert not re.fullmatch(only_hotel.regex, "disambiguate flows book_hotel greet")  # one flow: nothing to clarify
    assert grammar_from_regex(project, Syntax.V2, "yes|no") is None
    assert grammar_from_regex(project, Syntax.V2, only_hotel.regex.replace("book_hotel", "book_yacht")) is None


def test_command_kinds_can_be_limited(project):
    grammar = build_grammar(project, Syntax.V2, kinds=["start flow", "cancel flow"])
    assert re.fullmatch(grammar.regex, "start flow book_hotel\ncancel flow")
    assert not re.fullmatch(grammar.regex, "set slot hotel_city Lisbon")
    assert grammar.structured_outputs() == {"regex": grammar.regex}


def test_short_dialect_is_not_a_decoding_target(project):
    with pytest.raises(ConfigError, match="input alias"):
        build_grammar(project, Syntax.SHORT)


# ---------------------------------------------------------------------------------------------- tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def prompts(project) -> list[str]:
    """Prompts of the first turns of a few example test cases, rendered as at runtime."""
    renderer = PromptRenderer(load_template(PROMPTS_DIR / "command_prompt_v2.jinja2"))
    result = []
    for test_case in all_test_cases(load_tests([str(REPO / "e2e_tests" / "hotels")], project))[:2]:
        for turn in replay_test_case(project, test_case, annotate_from_assertions(project, test_case).commands_for)[:3]:
            result.append(renderer.render(prompt_variables(project, turn.state, turn.text, None)))
    return result


def test_token_bytes_reassemble_the_text(tiny):
    _, tokenizer = tiny
    vocabulary = token_bytes(tokenizer)
    assert all(vocabulary[i] is None for i in tokenizer.all_special_ids)
    for text in ["set slot hotel_city São Paulo", "start flow book_hotel\ncancel flow", "  x\ty€"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert b"".join(vocabulary[i] for i in ids) == text.encode("utf-8")


def test_end_of_sequence_only_after_a_complete_answer(grammars, tiny):
    _, tokenizer = tiny
    constraint = token_constraint(grammars[Syntax.V2], tokenizer, [tokenizer.eos_token_id])
    matcher = constraint.matcher
    middle = matcher.feed(matcher.start, b"start flow book_")
    complete = matcher.feed(matcher.start, b"start flow book_hotel")
    assert middle != DEAD and complete != DEAD
    assert tokenizer.eos_token_id not in constraint.allowed(middle, 50)
    assert tokenizer.eos_token_id in constraint.allowed(complete, 50)
    newline = tokenizer.convert_tokens_to_ids("Ċ")  # byte-level BPE spells "\n" as Ċ
    assert newline in constraint.allowed(complete, 50)
    # Every allowed token keeps the answer completable within the budget.
    for token_id in constraint.allowed(middle, 50):
        following = constraint.advance(middle, token_id)
        assert following != DEAD and matcher.bytes_to_accept(following) + 1 <= 49


def _generate(model, tokenizer, prompt: str, max_new_tokens: int, processor=None) -> str:
    import torch
    from transformers import LogitsProcessorList

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad(), _torch_threads(1):  # one thread: the test machine is shared
        output = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            logits_processor=LogitsProcessorList([processor(ids["input_ids"].shape[1])] if processor else []),
        )
    return tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def _perturbed(model, seed: int):
    """The tiny model with every weight jittered: another random model, so the check is not about one seed."""
    import copy

    import torch

    other = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for parameter in other.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return other


def test_random_model_emits_only_valid_commands_when_constrained(project, grammars, tiny, prompts):
    model, tokenizer = tiny
    grammar = grammars[Syntax.V2]
    constraint = token_constraint(grammar, tokenizer, [tokenizer.eos_token_id])
    unconstrained_valid = 0
    for seed, variant in enumerate([model, _perturbed(model, 1), _perturbed(model, 2)]):
        for prompt in prompts[:3]:
            free = _generate(variant, tokenizer, prompt, 32)
            parsed = parse_model_output(free, Syntax.V2)
            unconstrained_valid += parsed.fully_parsed and bool(parsed.commands)
            answer = _generate(
                variant, tokenizer, prompt, 32, lambda length: CommandLogitsProcessor(constraint, length, 32)
            )
            assert grammar.matcher().fullmatch(answer), (seed, answer)
            parsed = parse_model_output(answer, Syntax.V2)
            assert parsed.fully_parsed and parsed.commands
            assert validate_commands(parsed.commands, project)[1] == []
    assert unconstrained_valid == 0  # the same models unconstrained: garbage


def test_a_tight_token_budget_still_ends_with_a_complete_answer(grammars, tiny, prompts):
    model, tokenizer = tiny
    grammar = grammars[Syntax.V2]
    constraint = token_constraint(grammar, tokenizer, [tokenizer.eos_token_id])
    shortest = int(grammar.matcher().bytes_to_accept(grammar.matcher().start))
    assert shortest == len("cancel flow")  # the shortest command of Rasa Pro 3.21 (`hand over` is gone since 3.16)
    answer = _generate(
        model,
        tokenizer,
        prompts[0],
        shortest + 1,
        lambda length: CommandLogitsProcessor(constraint, length, shortest + 1),
    )
    assert grammar.matcher().fullmatch(answer), answer
