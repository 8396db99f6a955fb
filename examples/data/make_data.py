"""Generate the small corpora shipped with the examples, deterministically.

    python examples/data/make_data.py            # rewrites examples/data/{quickstart,pipeline}/*.jsonl

A template grammar (seeded `random.Random`, so the output is byte-identical on every run and platform)
produces short English stories and facts with a lot of regular structure: a tiny GPT can learn the
templates, the agreement between names and pronouns and the arithmetic facts, so its loss falls clearly
within a few hundred steps on a CPU. The same vocabulary feeds a small SFT set (chat messages and
prompt/response pairs) and a preference set (a correct `chosen` and a subtly wrong `rejected` answer).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

PEOPLE = [("Anna", "she", "her"), ("Ben", "he", "his"), ("Clara", "she", "her"), ("David", "he", "his"),
          ("Emma", "she", "her"), ("Felix", "he", "his"), ("Grace", "she", "her"), ("Henry", "he", "his"),
          ("Iris", "she", "her"), ("Jack", "he", "his"), ("Lena", "she", "her"), ("Max", "he", "his"),
          ("Nora", "she", "her"), ("Oscar", "he", "his"), ("Paula", "she", "her"), ("Sam", "he", "his")]
ANIMALS = ["cat", "dog", "rabbit", "horse", "bird", "fox", "owl", "frog", "duck", "goat"]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "brown", "orange"]
PLACES = ["the park", "the forest", "the beach", "the garden", "the market", "the river", "the hill",
          "the library", "the farm", "the village"]
OBJECTS = ["ball", "kite", "book", "hat", "box", "cup", "key", "map", "lamp", "drum"]
FOODS = ["apples", "bread", "cheese", "carrots", "soup", "cake", "rice", "pears"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FEELINGS = ["happy", "tired", "hungry", "surprised", "calm", "proud"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Peru", "Lima"),
            ("Kenya", "Nairobi"), ("Norway", "Oslo")]


def story(rng: random.Random) -> str:
    name, he, his = rng.choice(PEOPLE)
    friend, _, _ = rng.choice([p for p in PEOPLE if p[0] != name])
    animal, color, place = rng.choice(ANIMALS), rng.choice(COLORS), rng.choice(PLACES)
    obj, food, day = rng.choice(OBJECTS), rng.choice(FOODS), rng.choice(DAYS)
    weather, feeling = rng.choice(WEATHER), rng.choice(FEELINGS)
    n = rng.randint(2, 9)
    sentences = [
        f"On {day}, {name} went to {place}.",
        f"The weather was {weather}.",
        f"{He(he)} saw a {color} {animal} near {place}.",
        f"The {animal} had a {obj}.",
        f"{name} asked {friend} to come and see the {animal}.",
        f"{friend} brought {NUMBER_WORDS[n]} {food}.",
        f"They gave the {animal} {NUMBER_WORDS[n - 1]} of the {food} and kept one.",
        f"At the end of the day {name} was {feeling}, and {he} went home with {his} {obj}.",
    ]
    keep = sorted(rng.sample(range(1, len(sentences) - 1), rng.randint(3, len(sentences) - 2)))
    return " ".join([sentences[0]] + [sentences[i] for i in keep] + [sentences[-1]])


def He(pronoun: str) -> str:
    return pronoun[0].upper() + pronoun[1:]


def fact(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(0, 6), rng.randint(0, 6)
        return f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}. {a} + {b} = {a + b}."
    if kind == 1:
        country, capital = rng.choice(CAPITALS)
        return f"The capital of {country} is {capital}. {capital} is a city in {country}."
    if kind == 2:
        i = rng.randrange(len(DAYS))
        return f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}. The day before {DAYS[i]} is {DAYS[i - 1]}."
    animal, color = rng.choice(ANIMALS), rng.choice(COLORS)
    count = rng.randint(2, 12)
    return f"There are {NUMBER_WORDS[count]} {color} {animal}s in the picture. I count {count} {animal}s."


def document(rng: random.Random) -> str:
    parts = [story(rng) if rng.random() < 0.6 else fact(rng) for _ in range(rng.randint(1, 3))]
    return "\n".join(parts)


def sft_example(rng: random.Random, chat: bool) -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(0, 6), rng.randint(0, 6)
        prompt, answer = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    elif kind == 1:
        country, capital = rng.choice(CAPITALS)
        prompt, answer = f"What is the capital of {country}?", f"The capital of {country} is {capital}."
    else:
        i = rng.randrange(len(DAYS))
        prompt, answer = f"Which day comes after {DAYS[i]}?", f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}."
    if chat:
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
    return {"prompt": prompt, "response": answer}


def preference_example(rng: random.Random) -> dict:
    kind = rng.randrange(2)
    if kind == 0:
        a, b = rng.randint(0, 6), rng.randint(0, 6)
        wrong = max(a + b + rng.choice([-2, -1, 1, 2]), 0)
        wrong = wrong if wrong != a + b else a + b + 1
        return {"prompt": f"What is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.",
                "rejected": f"{a} plus {b} is {wrong}."}
    (country, capital), (_, other) = rng.sample(CAPITALS, 2)
    return {"prompt": f"What is the capital of {country}?", "chosen": f"The capital of {country} is {capital}.",
            "rejected": f"The capital of {country} is {other}."}


def degenerate_preferences(rng: random.Random) -> list[dict]:
    """Correct answers (chosen) against the degenerate replies small LMs produce (rejected): echoing the
    question's entity, repeating the question, stopping before the answer. Every triple once, shuffled.

    Why not wrong facts (prefs.jsonl): there every wrong answer is another prompt's right answer, so with a
    held-out split a model that learns which *answers* are preferred, rather than which answer fits *this*
    prompt, is pushed towards each held-out pair's rejected answer (its held-out chosen lost a "chosen"
    count, its rejected a "rejected" one): the tiny example model scored 0.34-0.43 on held-out pairs."""
    pairs = []

    def add(prompt, chosen, rejected):
        pairs.extend({"prompt": prompt, "chosen": chosen, "rejected": r} for r in rejected)

    for a in range(7):
        for b in range(7):
            add(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.",
                [f"{a} plus {b} is {a} plus {b}.", f"{a} plus {b} is plus.", f"{a} plus {b} is what?"])
    for country, capital in CAPITALS:
        add(f"What is the capital of {country}?", f"The capital of {country} is {capital}.",
            [f"The capital of {country} is {country}.", f"The capital of {country} is the capital of {country}.",
             f"The capital of {country} is what?"])
    for i, day in enumerate(DAYS):
        add(f"Which day comes after {day}?", f"The day after {day} is {DAYS[(i + 1) % 7]}.",
            [f"The day after {day} is {day}.", f"The day after {day} is the day after {day}.",
             f"The day after {day} is what?"])
    rng.shuffle(pairs)
    return pairs


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=20240601)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    write_jsonl(args.out / "quickstart" / "corpus.jsonl", [{"text": document(rng)} for _ in range(args.documents)])
    sft = [sft_example(rng, chat=True) for _ in range(600)]
    write_jsonl(args.out / "pipeline" / "sft.jsonl", sft)
    write_jsonl(args.out / "pipeline" / "prefs.jsonl", [preference_example(rng) for _ in range(400)])
    # its own generator, so adding it left the files above byte-identical
    heldout = degenerate_preferences(random.Random(args.seed + 1))
    write_jsonl(args.out / "pipeline" / "prefs_heldout.jsonl", heldout)
    write_jsonl(args.out / "pipeline" / "unpaired.jsonl", unpaired(heldout))
    write_jsonl(args.out / "pipeline" / "sums.jsonl", [{"prompt": f"What is {a} plus {b}?", "response": str(a + b)}
                                                       for a in range(10) for b in range(10) if a + b < 10])


def unpaired(pairs: list[dict]) -> list[dict]:
    """KTO's unpaired format from preference pairs: alternately the chosen (label true) or the rejected
    (label false) completion of each pair, so no prompt appears with both (examples/alignment_kinds.nemo)."""
    return [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 == 0 else r["rejected"], "label": i % 2 == 0}
            for i, r in enumerate(pairs)]


if __name__ == "__main__":
    main()
