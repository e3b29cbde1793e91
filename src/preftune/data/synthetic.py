"""Synthetic, program-checkable preference tasks (the data behind ``preftune demo``).

Every task is a short instruction whose answer a program can verify. ``chosen`` is the bare,
correct answer and passes the check; ``rejected`` fails it the way SmolLM2-135M-Instruct
actually fails: it wraps the answer in a sentence ("The capital of Egypt is ...", "7 + 9 = ...")
and the answer inside is wrong, so DPO pushes away from the chatter habit without teaching the
model to dislike correct facts. The checker is stored as a JSON spec so it survives a round
trip through JSONL (``write_jsonl`` / ``load_checker``, in ``checks.py``).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Callable

from .checks import (Checker, Task, answer_text, check_response, check_spec, load_checker,
                     to_record, write_jsonl)

__all__ = [
    "Task", "Checker", "FAMILIES", "DEFAULT_FAMILIES", "generate_tasks", "generate_split",
    "answer_text", "check_response", "check_spec", "load_checker", "to_record", "write_jsonl",
]

# ----------------------------------------------------------------------------- vocabularies

_OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"),
    ("happy", "sad"), ("open", "closed"), ("light", "dark"), ("old", "new"), ("tall", "short"),
    ("wet", "dry"), ("hard", "soft"), ("full", "empty"), ("rich", "poor"), ("early", "late"),
    ("strong", "weak"), ("yes", "no"), ("in", "out"), ("left", "right"), ("win", "lose"),
    ("push", "pull"), ("buy", "sell"), ("thick", "thin"), ("loud", "quiet"), ("clean", "dirty"),
    ("high", "low"), ("near", "far"), ("true", "false"), ("first", "last"), ("good", "bad"),
    ("heavy", "light"), ("inside", "outside"), ("start", "finish"), ("always", "never"),
    ("before", "after"), ("give", "take"), ("love", "hate"), ("black", "white"), ("above", "below"),
    ("friend", "enemy"), ("question", "answer"), ("begin", "end"), ("arrive", "leave"),
    ("cheap", "expensive"), ("safe", "dangerous"), ("sweet", "sour"), ("young", "old"),
    ("north", "south"), ("east", "west"), ("summer", "winter"), ("asleep", "awake"),
]

# Capitals the base model names correctly inside its "The capital of X is Y." habit.
_CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("England", "London"), ("Russia", "Moscow"), ("China", "Beijing"),
    ("Egypt", "Cairo"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"),
    ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Canada", "Ottawa"),
    ("Poland", "Warsaw"), ("Thailand", "Bangkok"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Cuba", "Havana"), ("Belgium", "Brussels"), ("Denmark", "Copenhagen"), ("Finland", "Helsinki"),
    ("Hungary", "Budapest"), ("Argentina", "Buenos Aires"), ("Chile", "Santiago"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Syria", "Damascus"), ("Lebanon", "Beirut"), ("Scotland", "Edinburgh"),
    ("Czechia", "Prague"), ("Romania", "Bucharest"), ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul"),
    ("the Netherlands", "Amsterdam"), ("Iceland", "Reykjavik"), ("Nigeria", "Abuja"),
    ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"), ("Bangladesh", "Dhaka"),
    ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"), ("Malaysia", "Kuala Lumpur"),
    ("Australia", "Canberra"), ("New Zealand", "Wellington"), ("Brazil", "Brasilia"),
]

_CATEGORIES = {
    "fruit": ["apple", "banana", "orange", "grape", "pear", "mango", "peach", "cherry", "lemon", "plum"],
    "animal": ["dog", "cat", "horse", "lion", "tiger", "rabbit", "cow", "sheep", "bear", "monkey"],
    "color": ["red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white"],
    "vehicle": ["car", "bus", "train", "bicycle", "truck", "boat", "plane", "taxi"],
    "body part": ["hand", "foot", "nose", "ear", "eye", "arm", "leg", "knee", "finger"],
    "drink": ["water", "milk", "juice", "coffee", "tea", "soda"],
    "tool": ["hammer", "saw", "wrench", "screwdriver", "drill", "shovel"],
}
_OBJECTS = ["chair", "table", "window", "book", "river", "cloud", "pencil", "shoe", "door", "lamp",
            "stone", "mountain", "pillow", "candle", "clock", "mirror", "bottle", "carpet"]

_WORDS = ["apple", "house", "river", "garden", "music", "pencil", "window", "tiger", "ocean", "planet",
          "candle", "forest", "yellow", "summer", "rabbit", "bottle", "castle", "dragon", "silver",
          "winter", "flower", "guitar", "island", "coffee", "mirror", "rocket", "banana", "cookie",
          "orange", "pillow", "monkey", "bridge", "school", "doctor", "farmer", "camera", "basket",
          "jacket", "kitten", "ladder", "market", "needle", "parrot", "pepper", "puzzle", "saddle",
          "tomato", "turtle", "violin", "wallet", "anchor", "button", "carrot", "hammer", "lemon"]

_TOPICS = [  # (topic, keyword, a short sentence using the keyword, one without it)
    ("the moon", "silver", "The moon glows silver at night.", "The moon is bright at night."),
    ("the sea", "waves", "The sea has big waves.", "The sea is deep and blue."),
    ("dogs", "loyal", "Dogs are loyal friends.", "Dogs are great pets."),
    ("winter", "snow", "Winter brings cold snow.", "Winter is a cold season."),
    ("coffee", "morning", "I drink coffee every morning.", "Coffee is a popular drink."),
    ("cats", "purr", "Cats purr when they are happy.", "Cats are soft and playful."),
    ("the sun", "warm", "The sun feels warm today.", "The sun is a bright star."),
    ("books", "read", "I love to read books.", "Books are full of stories."),
    ("rain", "umbrella", "Take an umbrella in the rain.", "Rain falls from the clouds."),
    ("trees", "green", "Trees have green leaves.", "Trees grow tall in the forest."),
    ("music", "dance", "Music makes me dance.", "Music is a universal language."),
    ("birds", "fly", "Birds fly in the sky.", "Birds are beautiful animals."),
    ("bread", "bake", "We bake bread at home.", "Bread is a staple food."),
    ("the garden", "flowers", "The garden is full of flowers.", "The garden is a nice place."),
    ("school", "teacher", "The teacher helps us at school.", "School is a place to learn."),
    ("summer", "beach", "We go to the beach in summer.", "Summer is the hottest season."),
    ("the night", "stars", "The night is full of stars.", "The night is calm and quiet."),
    ("the kitchen", "cook", "I cook in the kitchen.", "The kitchen is a busy room."),
    ("the forest", "quiet", "The forest is quiet.", "The forest has many trees."),
    ("the park", "walk", "I walk in the park.", "The park is a nice place."),
]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ----------------------------------------------------------------------------- families
# Each family draws from an rng: (item key, prompt text, chosen, rejected, check spec, a bare
# wrong answer: as short as chosen and failing the check, a hard negative).


def _fam_arithmetic(rng: random.Random):
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    text = rng.choice([
        "What is {a} + {b}? Answer with just the number.",
        "What is {a} plus {b}? Reply with only the number.",
        "Compute {a} + {b}. Give only the number, nothing else.",
    ]).format(a=a, b=b)
    wrong = a + b + rng.choice([-2, -1, 1, 2, 10])
    rejected = rng.choice([f"{a} + {b} = {wrong}", f"The answer is {wrong}."])
    return f"{a}+{b}", text, str(a + b), rejected, {"type": "exact", "answer": str(a + b)}, \
        str(wrong)


def _fam_next(rng: random.Random):
    n = rng.randint(1, 60)
    text = rng.choice([
        "What is the next number after {n}? Answer with just the number.",
        "What is the next number after {n}? Reply with only the number.",
    ]).format(n=n)
    wrong = n + rng.choice([0, 2, 10])
    return str(n), text, str(n + 1), f"The next number after {n} is {wrong}.", \
        {"type": "exact", "answer": str(n + 1)}, str(wrong)


def _fam_capital(rng: random.Random):
    country, city = rng.choice(_CAPITALS)
    text = rng.choice([
        "What is the capital of {c}? Answer with only the city name.",
        "Name the capital of {c}. Reply with only the city name.",
    ]).format(c=country)
    wrong = rng.choice([c for _, c in _CAPITALS if c != city])
    return country, text, city, f"The capital of {country} is {wrong}.", \
        {"type": "exact", "answer": city}, wrong


def _fam_opposite(rng: random.Random):
    word, opp = rng.choice(_OPPOSITES)
    text = rng.choice([
        'What is the opposite of "{w}"? Answer with one word.',
        'Give the opposite of the word "{w}". Reply with a single word only.',
    ]).format(w=word)
    wrong = rng.choice([x for pair in _OPPOSITES for x in pair if x not in (word, opp)])
    rejected = rng.choice([f'The opposite of "{word}" is "{wrong}".', f"The opposite of {word} is {wrong}."])
    return word, text, opp, rejected, {"type": "exact", "answer": opp}, wrong


def _fam_yesno(rng: random.Random):
    cat = rng.choice(sorted(_CATEGORIES))
    member = rng.random() < 0.5
    item = rng.choice(_CATEGORIES[cat] if member else _OBJECTS)
    ans = "yes" if member else "no"
    a, ac = _article(item), _article(cat)
    text = rng.choice([
        "Is {a} {i} {ac} {c}? Answer yes or no.",
        "Is {a} {i} {ac} {c}? Reply with only yes or no.",
    ]).format(a=a, i=item, ac=ac, c=cat)
    # the wrong verdict, explained, as the base model tends to do
    rejected = f"No, {a} {item} is not {ac} {cat}." if member else f"Yes, {a} {item} is {ac} {cat}."
    return f"{item}:{cat}", text, ans, rejected, {"type": "exact", "answer": ans}, \
        "no" if member else "yes"


def _fam_echo(rng: random.Random):
    word = rng.choice(_WORDS)
    text = rng.choice([
        'Reply with only the word "{w}".',
        'Say "{w}" and nothing else.',
        "Repeat this word exactly: {w}",
    ]).format(w=word)
    rejected = rng.choice([text, "I'm sorry, but I can't help with that.", f'The word "{word}" is a noun.'])
    other = _WORDS[(_WORDS.index(word) + 1) % len(_WORDS)]  # no extra draw: data stays the same
    return word, text, word, rejected, {"type": "exact", "answer": word}, other


def _fam_caps(rng: random.Random):
    word = rng.choice(_WORDS)
    text = rng.choice([
        'Write the word "{w}" in capital letters.',
        'Write the word "{w}" in uppercase. Reply with only that word.',
        'Spell "{w}" in ALL CAPS.',
    ]).format(w=word)
    rejected = rng.choice([word.capitalize(), f'The word "{word}" in capital letters is "{word.capitalize()}".'])
    return word, text, word.upper(), rejected, {"type": "all_caps", "word": word}, \
        word.capitalize()


def _fam_keyword(rng: random.Random):
    topic, kw, good, bad = rng.choice(_TOPICS)
    text = rng.choice([
        'Write one short sentence about {t} that uses the word "{k}".',
        'Write a sentence about {t}. It must include the word "{k}".',
    ]).format(t=topic, k=kw)
    return f"{topic}:{kw}", text, good, bad, {"type": "keyword", "word": kw}, bad


def _fam_json(rng: random.Random):
    n = rng.randint(1, 60)
    text = rng.choice([
        'What is the next number after {n}? Reply only with JSON like {{"answer": <number>}}.',
        'What is the next number after {n}? Answer with JSON of the form {{"answer": <number>}} and nothing else.',
    ]).format(n=n)
    rejected = f'```json\n{{\n  "answer": {n + 1},\n  "explanation": "The next number after {n} is {n + 1}."\n}}\n```'
    return str(n), text, json.dumps({"answer": n + 1}), rejected, \
        {"type": "json_answer", "answer": n + 1}, json.dumps({"answer": n})


# The functions every tool_call task offers; a task is answered by calling the right one
_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_population", "description": "How many people live in a country",
        "parameters": {"type": "object", "properties": {"country": {"type": "string"}},
                       "required": ["country"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount between currencies",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "from_currency": {"type": "string"},
            "to_currency": {"type": "string"}},
            "required": ["amount", "from_currency", "to_currency"]}}},
]
_CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD"]
_PLACE_QUESTIONS = {  # kind: (function, its argument, questions, the prose answer instead)
    "weather": ("get_weather", "city", ["What's the weather like in {c} right now?",
                                        "Is it raining in {c} today?"],
                "The weather in {c} is sunny and warm today."),
    "population": ("get_population", "country", ["How many people live in {c}?",
                                                  "What is the population of {c}?"],
                   "About 50 million people live in {c}."),
}


def _fam_tool_call(rng: random.Random):
    """Answer by calling the right function with the right arguments (``_TOOLS``); rejected is
    the prose the base model writes instead (no call), the hard negative a call to the wrong
    function or with a wrong argument. Needs a chat template that writes tools and calls
    (examples/chat_templates/chatml_tools.jinja)."""
    kind = rng.choice(["weather", "population", "currency"])
    if kind in _PLACE_QUESTIONS:  # about a capital city or its country
        country, city = rng.choice(_CAPITALS)
        places = {"city": city, "country": country}
        function, argument, questions, prose = _PLACE_QUESTIONS[kind]
        key = places[argument]
        text, prose = rng.choice(questions).format(c=key), prose.format(c=key)
        call = {"name": function, "arguments": {argument: key}}
        other, other_argument, _, _ = next(  # the other question's function: the wrong call
            spec for name, spec in _PLACE_QUESTIONS.items() if name != kind)
        wrong = {"name": other, "arguments": {other_argument: places[other_argument]}}
    else:
        amount = rng.randint(5, 500)
        source, target = rng.sample(_CURRENCIES, 2)
        text = rng.choice(["Convert {a} {s} to {t}.",
                           "How much is {a} {s} in {t}?"]).format(a=amount, s=source, t=target)
        call = {"name": "convert_currency",
                "arguments": {"amount": amount, "from_currency": source, "to_currency": target}}
        prose, key = f"{amount} {source} is about {amount * 2} {target}.", \
            f"{amount}{source}{target}"
        wrong = {"name": "convert_currency",
                 "arguments": {"amount": amount, "from_currency": target, "to_currency": source}}
    return f"{kind}:{key}", text, call, prose, {"type": "tool_call", **call}, wrong


FAMILIES: dict[str, Callable] = {
    "arithmetic": _fam_arithmetic,
    "next": _fam_next,
    "capital": _fam_capital,
    "opposite": _fam_opposite,
    "yesno": _fam_yesno,
    "echo": _fam_echo,
    "caps": _fam_caps,
    "keyword": _fam_keyword,
    "json": _fam_json,
    "tool_call": _fam_tool_call,
}
DEFAULT_FAMILIES = ["capital", "yesno", "echo", "next", "arithmetic", "opposite"]
FAMILY_TOOLS = {"tool_call": _TOOLS}  # the functions a family's prompts offer


def _make(family: str, rng: random.Random) -> Task:
    key, text, chosen, rejected, spec, bare_wrong = FAMILIES[family](rng)
    return Task(prompt=[{"role": "user", "content": text}], chosen=chosen, rejected=rejected,
                family=family, check=Checker(spec), key=f"{family}:{key}",
                bare_wrong=bare_wrong, tools=FAMILY_TOOLS.get(family, []))


def _families(families) -> list[str]:
    fams = list(families or DEFAULT_FAMILIES)
    for name in fams:
        if name not in FAMILIES:
            raise ValueError(f"unknown task family {name!r}; known: {sorted(FAMILIES)}")
    return fams


def _draw(n: int, seed: int, fams: list[str], accept: Callable[[Task], bool], what: str) -> list[Task]:
    """``n`` accepted tasks from a deterministic stream that cycles through ``fams``."""
    rng, out = random.Random(seed), []
    budget = 200 * (n + 10)
    i = 0
    while len(out) < n:
        if i >= budget:
            raise ValueError(f"cannot draw {n} distinct {what} from families {fams}")
        task = _make(fams[i % len(fams)], rng)
        i += 1
        if accept(task):
            out.append(task)
    return out


def generate_tasks(n: int, seed: int = 0, families: list[str] | None = None) -> list[Task]:
    """``n`` tasks with distinct prompts, families interleaved, deterministic for ``seed``."""
    seen: set[str] = set()

    def fresh(task: Task) -> bool:
        if task.prompt_text in seen:
            return False
        seen.add(task.prompt_text)
        return True

    return _draw(n, seed, _families(families), fresh, "prompts")


def generate_split(n_train: int, n_eval: int, seed: int = 0, families: list[str] | None = None,
                   hard_negatives: float = 0.0):
    """Disjoint ``(train, eval)`` task lists.

    Eval tasks each use a distinct item, and no eval item (country, word pair, sum...) appears
    in train under any wording, so the eval measures generalization, not recall.
    ``hard_negatives`` is the share of tasks whose rejected answer is a bare wrong answer (as
    short as chosen: "Alexandria" for the capital of Egypt) instead of the chatty wrong reply, so
    that length alone no longer tells chosen from rejected (reward models need this). The tasks
    themselves do not change.
    """
    if not 0.0 <= hard_negatives <= 1.0:
        raise ValueError(f"hard_negatives is a share between 0 and 1, got {hard_negatives}")
    fams = _families(families)
    keys: set[str] = set()

    def new_key(task: Task) -> bool:
        if task.key in keys:
            return False
        keys.add(task.key)
        return True

    evals = _draw(n_eval, seed * 2 + 1, fams, new_key, "eval items")
    eval_keys, seen = set(keys), set()

    def train_ok(task: Task) -> bool:
        if task.key in eval_keys or task.prompt_text in seen:
            return False
        seen.add(task.prompt_text)
        return True

    train = _draw(n_train, seed * 2, fams, train_ok, "train prompts")
    if hard_negatives:
        pick = random.Random(f"hard-negatives-{seed}")  # its own stream: the tasks stay the same
        train, evals = ([replace(task, rejected=task.bare_wrong, negative="bare")
                         if pick.random() < hard_negatives else replace(task, negative="chatty")
                         for task in split] for split in (train, evals))
    return train, evals
