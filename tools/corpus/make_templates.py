"""Generate ``packages/train/train/assets/templates.txt``, the bundled ``--dataset templates``.

Run ``python tools/corpus/make_templates.py`` to rewrite it; the output is a pure function of
the seed below, so the shipped file can always be checked and regenerated.

It was Meshtron's first default corpus; the default is now real text (Shakespeare, see
``make_shakespeare.py``), and tests keep this one where a tiny, byte-predictable corpus that a
small model learns within a few steps is the point. It is a small world that is
*consistent*: every place always has the same colour and sound, every animal the same food
and home, numbers add up. A tiny model first learns spelling and common words (the loss
drops below the unigram byte entropy, about 2.9 nats), then the templates, then the facts.
"""

from __future__ import annotations

import random
from pathlib import Path

SEED = 1234
TARGET_BYTES = 320_000

NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Juno", "Kai", "Lena",
         "Milo", "Nora", "Otto", "Pia", "Remy", "Sara", "Theo", "Uma", "Vera", "Wes", "Yara", "Zed"]
# animal -> (food, home): fixed facts the model can learn
ANIMALS = {"fox": ("berries", "den"), "owl": ("mice", "nest"), "bear": ("honey", "cave"),
           "rabbit": ("carrots", "burrow"), "otter": ("fish", "lodge"), "crow": ("seeds", "tree"),
           "goat": ("grass", "barn"), "mole": ("worms", "tunnel"), "heron": ("frogs", "marsh")}
# place -> (colour, sound)
PLACES = {"river": ("green", "splashing"), "forest": ("dark", "rustling"), "hill": ("golden", "whistling"),
          "market": ("bright", "shouting"), "harbour": ("grey", "creaking"), "meadow": ("yellow", "humming"),
          "mill": ("white", "turning"), "lake": ("blue", "lapping"), "garden": ("red", "buzzing")}
OBJECTS = ["a red kite", "a lost key", "a silver coin", "an old map", "a wooden flute", "a blue lantern",
           "a small boat", "a basket of apples", "a paper bird", "a warm scarf"]
TIMES = ["morning", "afternoon", "evening", "night"]
WEATHER = {"morning": ["cool", "misty", "bright"], "afternoon": ["warm", "windy", "sunny"],
           "evening": ["calm", "cloudy", "golden"], "night": ["cold", "quiet", "starry"]}
FEELINGS = ["happy", "tired", "curious", "proud", "sleepy", "glad"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
           "nineteen", "twenty"]


def story(rng: random.Random) -> str:
    """A short story about two animals meeting at a place; all facts come from the tables above."""
    name, friend = rng.sample(NAMES, 2)
    animal, other = rng.sample(sorted(ANIMALS), 2)
    place = rng.choice(sorted(PLACES))
    colour, sound = PLACES[place]
    time = rng.choice(TIMES)
    thing = rng.choice(OBJECTS)
    feeling = rng.choice(FEELINGS)
    food, home = ANIMALS[animal]
    other_food, other_home = ANIMALS[other]
    return " ".join([
        f"One {time}, {name} the {animal} went to the {place}.",
        f"The {time} was {rng.choice(WEATHER[time])}, and the {place} was {colour} and {sound}.",
        f"{name} was looking for {thing}.",
        f"At the {place}, {name} met {friend} the {other}.",
        f'"Hello, {friend}," said {name}. "Have you seen {thing}?"',
        rng.choice([f'"No," said {friend}, "but I have some {other_food}."',
                    f'"Yes," said {friend}. "It is near the {place}."']),
        f"A {animal} eats {food} and a {other} eats {other_food}.",
        f"When the {time} was over, {name} went home to the {home} and {friend} went home to the {other_home}.",
        f"{name} was {feeling}.",
    ])


def sums(rng: random.Random) -> str:
    """A few additions in words: the model can learn them only by counting."""
    lines = []
    for _ in range(rng.randint(3, 6)):
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        lines.append(f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}.")
    return " ".join(lines)


def facts(rng: random.Random) -> str:
    """Plain statements of the world's fixed facts."""
    animal = rng.choice(sorted(ANIMALS))
    place = rng.choice(sorted(PLACES))
    food, home = ANIMALS[animal]
    colour, sound = PLACES[place]
    return (f"The {animal} lives in a {home} and eats {food}. "
            f"The {place} is {colour}, and you can hear it {sound}.")


def counting(rng: random.Random) -> str:
    """Count up from a random start: an easy, exactly predictable pattern."""
    start = rng.randint(0, 12)
    words = NUMBERS[start:start + rng.randint(4, 8)]
    return "Let us count: " + ", ".join(words) + "."


def generate(seed: int = SEED, target_bytes: int = TARGET_BYTES) -> str:
    """The whole corpus: paragraphs separated by blank lines, until ``target_bytes`` is reached."""
    rng = random.Random(seed)
    kinds = [story] * 5 + [sums, facts, counting]
    paragraphs, size = [], 0
    while size < target_bytes:
        paragraph = rng.choice(kinds)(rng)
        paragraphs.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(paragraphs) + "\n"


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[2] / "packages" / "train" / "train" / "assets" / "templates.txt"
    out.write_text(generate(), encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size} bytes)")
