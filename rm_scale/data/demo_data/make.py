"""Writes the demo preference set shipped with rm_scale (train.jsonl, eval.jsonl beside this file).

Preferences a small model has to *learn*, none visible from a surface cue of one response alone (both sides of a
pair have the same style and about the same length; where a side is shorter, as with "one word", the opposite
instruction makes the longer side the better one just as often). Four subsets:

- ``instructions``: the answer that follows an explicit instruction (capital vs lowercase letters, one word vs a
  full sentence, French vs English) against the same answer that follows the opposite one;
- ``consistency``: an answer that restates the user's fact against one that contradicts itself halfway;
- ``units``: a unit conversion with the right factor against one with a wrong factor;
- ``facts``: a true statement against the same statement naming another topic's answer (another capital,
  animal sound, colour or number of legs): what the pretrained model knows, read out.

Ties (ties_train.jsonl, ties_eval.jsonl, in UltraFeedback-binarized's columns with equal ``score_chosen`` and
``score_rejected``): two answers that are equally right, worded differently (a conversion in two phrasings; a
consistent answer in full or only its conclusion). A tie model (`ties: tie_model`) learns to give them equal rewards,
i.e. that the wording does not matter where the correctness is the same.

Eval topics are disjoint from train topics (other facts, templates and amounts), so held-out accuracy
measures generalisation, not memorisation. Deterministic: `python -m rm_scale.data.demo_data.make` rewrites the
same files (a test checks it).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
PER_SUBSET = {"train": 120, "eval": 32}
EVAL_FACTS = 10  # the last facts, templates and operands are held out
TIES_PER_SUBSET = {"train": 24, "eval": 12}
TIE_SCORE = 1.0  # both sides' score in the ties files (equal scores: a tie)

# (question, one-word answer, English sentence, French sentence)
FACTS = [
    ("What is the capital of France?", "Paris", "The capital of France is Paris.", "La capitale de la France est Paris."),
    ("What is the capital of Italy?", "Rome", "The capital of Italy is Rome.", "La capitale de l'Italie est Rome."),
    ("What is the capital of Spain?", "Madrid", "The capital of Spain is Madrid.", "La capitale de l'Espagne est Madrid."),
    ("What is the capital of Japan?", "Tokyo", "The capital of Japan is Tokyo.", "La capitale du Japon est Tokyo."),
    ("What is the capital of Germany?", "Berlin", "The capital of Germany is Berlin.",
     "La capitale de l'Allemagne est Berlin."),
    ("What colour is the sky on a clear day?", "Blue", "The sky is blue on a clear day.",
     "Le ciel est bleu par beau temps."),
    ("What colour is fresh grass?", "Green", "Fresh grass is green.", "L'herbe fraîche est verte."),
    ("What colour is snow?", "White", "Snow is white.", "La neige est blanche."),
    ("How many legs does a spider have?", "Eight", "A spider has eight legs.", "Une araignée a huit pattes."),
    ("How many days are in a week?", "Seven", "A week has seven days.", "Une semaine a sept jours."),
    ("Which animal says moo?", "Cow", "The cow says moo.", "La vache fait meuh."),
    ("What do bees make?", "Honey", "Bees make honey.", "Les abeilles font du miel."),
    ("Which planet do we live on?", "Earth", "We live on the planet Earth.", "Nous vivons sur la planète Terre."),
    ("What is frozen water called?", "Ice", "Frozen water is called ice.", "L'eau gelée s'appelle la glace."),
    ("What is the largest ocean?", "Pacific", "The largest ocean is the Pacific.",
     "Le plus grand océan est le Pacifique."),
    ("Which season comes after winter?", "Spring", "Spring comes after winter.", "Le printemps vient après l'hiver."),
    ("Which star is closest to the Earth?", "Sun", "The closest star to the Earth is the Sun.",
     "L'étoile la plus proche de la Terre est le Soleil."),
    ("How many months are in a year?", "Twelve", "A year has twelve months.", "Une année a douze mois."),
    ("What colour is a ripe banana?", "Yellow", "A ripe banana is yellow.", "Une banane mûre est jaune."),
    ("What is a baby cat called?", "Kitten", "A baby cat is called a kitten.", "Un bébé chat s'appelle un chaton."),
    ("What is a baby dog called?", "Puppy", "A baby dog is called a puppy.", "Un bébé chien s'appelle un chiot."),
    ("What is the opposite of hot?", "Cold", "The opposite of hot is cold.", "Le contraire de chaud est froid."),
    ("What is the opposite of day?", "Night", "The opposite of day is night.", "Le contraire du jour est la nuit."),
    ("Which animal is called the king of the jungle?", "Lion", "The lion is called the king of the jungle.",
     "Le lion est appelé le roi de la jungle."),
    ("What do fish breathe with?", "Gills", "Fish breathe with gills.", "Les poissons respirent avec des branchies."),
    ("How many wheels does a bicycle have?", "Two", "A bicycle has two wheels.", "Un vélo a deux roues."),
    # held out (EVAL_FACTS)
    ("What is the capital of England?", "London", "The capital of England is London.",
     "La capitale de l'Angleterre est Londres."),
    ("What is the capital of Portugal?", "Lisbon", "The capital of Portugal is Lisbon.",
     "La capitale du Portugal est Lisbonne."),
    ("What colour is coal?", "Black", "Coal is black.", "Le charbon est noir."),
    ("Which bird is a symbol of peace?", "Dove", "The dove is a symbol of peace.", "La colombe est un symbole de paix."),
    ("How many hours are in a day?", "Twenty-four", "A day has twenty-four hours.",
     "Une journée a vingt-quatre heures."),
    ("What is a baby sheep called?", "Lamb", "A baby sheep is called a lamb.", "Un bébé mouton s'appelle un agneau."),
    ("What is the opposite of up?", "Down", "The opposite of up is down.", "Le contraire de haut est bas."),
    ("What do we use to see?", "Eyes", "We see with our eyes.", "Nous voyons avec nos yeux."),
    ("Which fruit is wine made from?", "Grapes", "Wine is made from grapes.", "Le vin est fait avec du raisin."),
    ("Which season comes after summer?", "Autumn", "Autumn comes after summer.", "L'automne vient après l'été."),
]

# (instruction, how a sentence follows it) in opposite pairs: the chosen side follows the prompt's instruction, the
# rejected side follows its opposite; each instruction is asked as often as its opposite.
INSTRUCTION_PAIRS = [
    (("Answer in capital letters only.", lambda f: f[2].upper()),
     ("Answer in lowercase letters only.", lambda f: f[2].lower())),
    (("Answer with one word only.", lambda f: f[1] + "."),
     ("Answer in a full sentence.", lambda f: f[2])),
    (("Answer in French.", lambda f: f[3]),
     ("Answer in English.", lambda f: f[2])),
]

# (user's statement + question, an answer that restates {x} then concludes {y}, slot): the rejected side concludes
# something else, contradicting itself; half the time the answer is only its conclusion, which then contradicts the
# user's statement instead.
CONSISTENCY = [
    ("My package arrives on {x}. When should I expect it?", "It arrives on {x}, so expect it on {y}.", "days"),
    ("The meeting starts at {x} o'clock. When should I be there?", "It starts at {x} o'clock, so be there at {y}.",
     "hours"),
    ("My sister is called {x}. What is her name?", "Your sister is called {x}, so her name is {y}.", "names"),
    ("I painted my door {x}. What colour is it now?", "You painted it {x}, so the door is now {y}.", "colours"),
    ("I have {x} cats and no other pets. How many pets do I have?", "You have {x} cats, so you have {y} pets.",
     "numbers"),
    ("My flight leaves on {x}. Which day do I fly?", "Your flight leaves on {x}, so you fly on {y}.", "days"),
    ("My brother is called {x}. Who is my brother?", "Your brother is called {x}, so he is {y}.", "names"),
    ("The shop opens at {x} o'clock. When can I go in?", "It opens at {x} o'clock, so you can go in at {y}.",
     "hours"),
    ("My new car is {x}. What colour is my car?", "Your new car is {x}, so your car is {y}.", "colours"),
    ("There are {x} eggs in the box. How many eggs are there?", "The box holds {x} eggs, so there are {y} eggs.",
     "numbers"),
    # held out (the last HELD_OUT_TEMPLATES)
    ("My dentist visit is on {x}. What day is the visit?", "The visit is on {x}, so go on {y}.", "days"),
    ("My friend is called {x}. What is my friend's name?", "Your friend is called {x}, so the name is {y}.", "names"),
    ("The bus comes at {x} o'clock. When should I wait for it?", "It comes at {x} o'clock, so wait at {y}.", "hours"),
    ("I bought a {x} hat. What colour is the hat?", "You bought a {x} hat, so the hat is {y}.", "colours"),
]
SLOTS = {
    "days": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "hours": ["seven", "eight", "nine", "ten", "eleven", "twelve", "two", "three", "four", "five"],
    "names": ["Anna", "Maria", "Sofia", "Emma", "Lucy", "Clara", "Peter", "John", "David", "Tom", "Sam", "Paul"],
    "colours": ["red", "blue", "green", "yellow", "white", "black", "grey", "orange"],
    "numbers": ["two", "three", "four", "five", "six", "seven", "eight", "nine"],
}
HELD_OUT_TEMPLATES = 4

# (from, to, factor): the rejected side multiplies by another unit's factor.
UNITS = [
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
    ("metres", "centimetres", 100), ("kilometres", "metres", 1000), ("kilograms", "grams", 1000),
    ("years", "months", 12), ("litres", "millilitres", 1000), ("centimetres", "millimetres", 10),
]
FACTORS = sorted({f for _, _, f in UNITS})
UNIT_QUESTIONS = ["How many {to} are in {n} {frm}?", "Convert {n} {frm} to {to}.", "What is {n} {frm} in {to}?"]
UNIT_ANSWERS = ["{n} {frm} is {v} {to}.", "That is {v} {to}.", "{n} {frm} equals {v} {to}."]

# (question, answer, [(topic, truth), ...]): the rejected side names another topic's truth. The last
# HELD_OUT_FACTS topics of each table are held out (among them every held-out fact of the instructions subset).
FACT_TABLES = [
    ("What is the capital of {k}?", "The capital of {k} is {v}.",
     [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Germany", "Berlin"),
      ("Russia", "Moscow"), ("China", "Beijing"), ("Greece", "Athens"), ("Egypt", "Cairo"), ("Ireland", "Dublin"),
      ("Austria", "Vienna"), ("Norway", "Oslo"), ("Canada", "Ottawa"), ("England", "London"),
      ("Portugal", "Lisbon"), ("Poland", "Warsaw")]),
    ("What sound does a {k} make?", "A {k} {v}.",
     [("dog", "barks"), ("cat", "meows"), ("cow", "moos"), ("duck", "quacks"), ("lion", "roars"),
      ("horse", "neighs"), ("pig", "oinks"), ("owl", "hoots"), ("snake", "hisses"), ("bee", "buzzes"),
      ("wolf", "howls"), ("sheep", "bleats")]),
    ("What colour is {k}?", "{K} is {v}.",
     [("a ripe banana", "yellow"), ("fresh grass", "green"), ("snow", "white"), ("blood", "red"),
      ("a carrot", "orange"), ("chocolate", "brown"), ("a clear sky", "blue"), ("a tomato", "red"),
      ("a lemon", "yellow"), ("coal", "black"), ("milk", "white"), ("a lime", "green")]),
    ("How many legs does a {k} have?", "A {k} has {v} legs.",
     [("spider", "eight"), ("dog", "four"), ("bird", "two"), ("ant", "six"), ("horse", "four"),
      ("chicken", "two"), ("beetle", "six"), ("cat", "four"), ("duck", "two"), ("bee", "six"),
      ("cow", "four"), ("fly", "six")]),
]
HELD_OUT_FACTS = 4


def _prompt(question: str) -> str:
    return f"User: {question}\nAssistant: "


def _instructions(rng: random.Random, held_out: bool) -> Iterator[dict[str, str]]:
    facts = FACTS[-EVAL_FACTS:] if held_out else FACTS[:-EVAL_FACTS]
    while True:
        fact = rng.choice(facts)
        pair = list(rng.choice(INSTRUCTION_PAIRS))
        rng.shuffle(pair)  # which of the two is asked: each as often as its opposite
        (asked, follows), (_, opposite) = pair
        question = f"{asked} {fact[0]}" if rng.random() < 0.5 else f"{fact[0]} {asked}"
        yield {"prompt": _prompt(question), "chosen": follows(fact), "rejected": opposite(fact)}


def _consistency_templates(held_out: bool) -> list[tuple[str, str, str]]:
    return CONSISTENCY[-HELD_OUT_TEMPLATES:] if held_out else CONSISTENCY[:-HELD_OUT_TEMPLATES]


def _conclusion(answer: str) -> str:
    """Only an answer's conclusion: "It arrives on {x}, so expect it on {y}." -> "So expect it on {y}."."""
    return "S" + answer[answer.index(", so ") + 3 :]


def _consistency(rng: random.Random, held_out: bool) -> Iterator[dict[str, str]]:
    templates = _consistency_templates(held_out)
    while True:
        question, answer, slot = rng.choice(templates)
        x, other = rng.sample(SLOTS[slot], 2)
        if rng.random() < 0.5:  # only the conclusion: "So expect it on Friday."
            answer = _conclusion(answer)
        yield {"prompt": _prompt(question.format(x=x)), "chosen": answer.format(x=x, y=x),
               "rejected": answer.format(x=x, y=other)}


def _unit_amounts(held_out: bool) -> list[int]:
    return [7, 8, 9] if held_out else [2, 3, 4, 5, 6]  # held-out amounts


def _units(rng: random.Random, held_out: bool) -> Iterator[dict[str, str]]:
    values = _unit_amounts(held_out)
    while True:
        frm, to, factor = rng.choice(UNITS)
        n = rng.choice(values)
        wrong = rng.choice([f for f in FACTORS if f != factor])
        question, answer = rng.choice(UNIT_QUESTIONS), rng.choice(UNIT_ANSWERS)
        yield {"prompt": _prompt(question.format(n=n, frm=frm, to=to)),
               "chosen": answer.format(n=n, frm=frm, to=to, v=n * factor),
               "rejected": answer.format(n=n, frm=frm, to=to, v=n * wrong)}


def _facts(rng: random.Random, held_out: bool) -> Iterator[dict[str, str]]:
    while True:
        question, answer, table = rng.choice(FACT_TABLES)
        topics = table[-HELD_OUT_FACTS:] if held_out else table[:-HELD_OUT_FACTS]
        k, v = rng.choice(topics)
        wrong = rng.choice(sorted({t for _, t in table} - {v}))
        fill = {"k": k, "K": k[0].upper() + k[1:]}
        yield {"prompt": _prompt(question.format(**fill)), "chosen": answer.format(**fill, v=v),
               "rejected": answer.format(**fill, v=wrong)}


def _unit_ties(rng: random.Random, held_out: bool) -> Iterator[dict[str, str]]:
    values = _unit_amounts(held_out)
    while True:
        frm, to, factor = rng.choice(UNITS)
        n = rng.choice(values)
        first, second = rng.sample(UNIT_ANSWERS, 2)
        fill = {"n": n, "frm": frm, "to": to, "v": n * factor}
        yield {"prompt": _prompt(rng.choice(UNIT_QUESTIONS).format(**fill)), "chosen": first.format(**fill),
               "rejected": second.format(**fill)}


def _consistency_ties(rng: random.Random, held_out: bool) -> Iterator[dict[str, str]]:
    templates = _consistency_templates(held_out)
    while True:
        question, answer, slot = rng.choice(templates)
        x = rng.choice(SLOTS[slot])
        sides = [answer.format(x=x, y=x), _conclusion(answer).format(x=x, y=x)]
        rng.shuffle(sides)  # the longer side first as often as second
        yield {"prompt": _prompt(question.format(x=x)), "chosen": sides[0], "rejected": sides[1]}


MAKERS: dict[str, Callable[[random.Random, bool], Iterator[dict[str, str]]]] = {
    "instructions": _instructions, "consistency": _consistency, "units": _units, "facts": _facts,
}
SUBSETS = tuple(MAKERS)  # in the order the rows are made


def make_pairs(split: str, *, seed: int) -> list[dict[str, str]]:
    """``PER_SUBSET[split]`` distinct pairs of each subset, shuffled; eval topics disjoint from train topics."""
    return _distinct_rows(MAKERS, PER_SUBSET[split], held_out=split == "eval", seed=seed)


def _distinct_rows(makers: Mapping[str, Callable[[random.Random, bool], Iterator[dict[str, str]]]], count: int, *,
                   held_out: bool, seed: int, extra: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """``count`` distinct rows of each maker's subset (with ``extra`` columns), shuffled."""
    rng = random.Random(seed)
    rows = []
    for subset, maker in makers.items():
        made, seen = maker(rng, held_out), set()
        while len(seen) < count:
            pair = next(made)
            key = (pair["prompt"], pair["chosen"], pair["rejected"])
            if key not in seen:
                seen.add(key)
                rows.append({**pair, **(extra or {}), "subset": subset})
    rng.shuffle(rows)
    return rows


TIE_MAKERS = {"units": _unit_ties, "consistency": _consistency_ties}
TIE_SUBSETS = tuple(TIE_MAKERS)


def make_ties(split: str, *, seed: int) -> list[dict[str, Any]]:
    """``TIES_PER_SUBSET[split]`` distinct ties of each of TIE_SUBSETS, shuffled; eval topics held out as above."""
    return _distinct_rows(TIE_MAKERS, TIES_PER_SUBSET[split], held_out=split == "eval", seed=seed,
                          extra={"score_chosen": TIE_SCORE, "score_rejected": TIE_SCORE})


def outputs() -> dict[str, list[dict[str, Any]]]:
    """Each shipped file's rows."""
    return {"train.jsonl": make_pairs("train", seed=0), "eval.jsonl": make_pairs("eval", seed=1),
            "ties_train.jsonl": make_ties("train", seed=2), "ties_eval.jsonl": make_ties("eval", seed=3)}


def main() -> None:
    for name, rows in outputs().items():
        with open(HERE / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
