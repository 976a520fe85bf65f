"""Writes the demo preference set shipped with rm_scale (train.jsonl, eval.jsonl beside this file).

A clear, learnable preference: the chosen reply answers the question helpfully and politely; the rejected reply is a
rude or evasive brush-off. Eval topics are disjoint from train topics, so held-out accuracy measures generalisation,
not memorisation. Deterministic: `python -m rm_scale.data.demo_data.make` rewrites the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TRAIN_TOPICS = [
    ("boil an egg", "Place the egg in boiling water for about nine minutes, then cool it in cold water."),
    ("water a cactus", "Water it deeply about once every two to three weeks and let the soil dry out in between."),
    ("tie a tie", "Cross the wide end over, loop it up through the neck, and pull it down through the knot."),
    ("learn to swim", "Start in shallow water with a coach, practise floating, then add kicking and arm strokes."),
    ("save money each month", "Set a budget, move a fixed amount to savings on payday, and track small expenses."),
    ("fall asleep faster", "Keep a regular bedtime, avoid screens for an hour before bed, and keep the room cool."),
    ("clean a cast iron pan", "Rinse it with hot water, scrub gently, dry it fully, and rub in a thin layer of oil."),
    ("write a cover letter", "Open with the role you want, show two achievements that fit it, and close politely."),
    ("start running", "Begin with short run-walk intervals three times a week and increase the time slowly."),
    ("remove a coffee stain", "Blot it, rinse with cold water from the back, then treat it with a little detergent."),
    ("plant tomatoes", "Plant them in a sunny spot after the last frost, deep enough to cover part of the stem."),
    ("change a flat tyre", "Loosen the nuts, jack up the car, swap the wheel, and tighten the nuts in a star order."),
    ("make fresh pasta", "Mix flour and eggs into a dough, knead for ten minutes, rest it, then roll and cut it."),
    ("study for an exam", "Spread study over several days, test yourself often, and sleep well the night before."),
    ("learn a new language", "Practise a little every day, speak with native speakers, and learn common words first."),
    ("back up my photos", "Keep one copy on an external drive and another in a cloud service, and check them."),
    ("brew good tea", "Use fresh water just off the boil for black tea, cooler for green, and steep a few minutes."),
    ("fix a squeaky door", "Lift the hinge pin, wipe it, add a drop of oil, and put it back."),
    ("keep basil alive", "Give it sun, water when the top of the soil is dry, and pinch off the flower buds."),
    ("prepare for a job interview", "Research the company, practise answers aloud, and prepare a few questions."),
    ("teach a dog to sit", "Hold a treat above its nose, move it back until the dog sits, then reward at once."),
    ("reduce stress", "Take short walks, breathe slowly for a few minutes, and talk to someone you trust."),
    ("make a budget", "List your income and fixed costs, set limits for the rest, and review it every month."),
    ("bake bread", "Mix flour, water, yeast and salt, let it rise, shape it, and bake it in a hot oven."),
    ("improve my handwriting", "Write slowly, hold the pen loosely, and copy a model alphabet for a few minutes a day."),
    ("stay hydrated", "Carry a water bottle, drink with each meal, and have a glass after exercise."),
    ("organise my closet", "Empty it, keep what you wear, group items by type, and store seasonal clothes away."),
    ("choose a laptop", "Decide what you need it for, then compare battery life, weight, memory and price."),
    ("cook rice", "Rinse the rice, use about one and a half cups of water per cup, and simmer covered."),
    ("paint a room", "Clean and tape the walls, use a primer if needed, then roll on two thin coats."),
    ("start a vegetable garden", "Pick a sunny spot, improve the soil with compost, and start with easy crops."),
    ("warm up before exercise", "Do five minutes of light cardio followed by gentle dynamic stretches."),
    ("write a thank-you note", "Name the gift or favour, say how it helped you, and end with a warm wish."),
    ("keep my phone battery healthy", "Avoid extreme heat, keep the charge between about 20 and 80 percent."),
    ("memorise a speech", "Learn it in short sections, rehearse aloud, and practise in front of a friend."),
    ("descale a kettle", "Boil a mix of water and vinegar, let it sit for an hour, then rinse it well."),
    ("make a smoothie", "Blend a banana, a handful of berries, yoghurt and a splash of milk until smooth."),
    ("sharpen a knife", "Hold it at a steady angle on a whetstone and draw it across evenly on both sides."),
    ("plan a road trip", "Choose the route, book stops in advance, check the car, and pack snacks and water."),
    ("read more books", "Carry a book with you, read for twenty minutes before bed, and pick topics you enjoy."),
]
EVAL_TOPICS = [
    ("grow strawberries", "Plant them in full sun in well-drained soil and water them regularly at the base."),
    ("iron a shirt", "Start with the collar, then the cuffs and sleeves, and finish with the body."),
    ("make pancakes", "Whisk flour, milk, egg and a pinch of salt, then cook ladles of batter in a hot pan."),
    ("clean my keyboard", "Unplug it, turn it over to shake out crumbs, and wipe the keys with a damp cloth."),
    ("stretch after a run", "Hold calf, hamstring and quad stretches for about thirty seconds each."),
    ("pack for a flight", "Roll your clothes, keep liquids in a small clear bag, and put essentials in your carry-on."),
    ("wash a wool sweater", "Hand wash it in cool water with a gentle soap and dry it flat on a towel."),
    ("make cold brew coffee", "Steep coarse ground coffee in cold water for about twelve hours, then strain it."),
    ("care for a succulent", "Give it bright light and water only when the soil is completely dry."),
    ("prepare a presentation", "Know your main message, keep slides simple, and rehearse with a timer."),
    ("defrost a freezer", "Empty it, switch it off, place towels below, and let the ice melt before wiping it."),
    ("learn to juggle", "Start with one ball tossed hand to hand, then add a second, then a third."),
    ("make a paper airplane", "Fold a sheet in half, fold the top corners to the middle, then fold the wings down."),
    ("keep cut flowers fresh", "Trim the stems at an angle, change the water every two days, and keep them cool."),
    ("fix a running toilet", "Check the flapper at the bottom of the tank and replace it if it does not seal."),
    ("write a short poem", "Choose one image or feeling, write a few short lines, and read them aloud to revise."),
]
QUESTIONS = [
    "How do I {t}?",
    "Can you tell me how to {t}?",
    "What is the best way to {t}?",
    "I want to {t}. Any advice?",
    "Could you explain how to {t}, please?",
]
GOOD_OPENERS = ["Sure! ", "Happy to help. ", "Good question. ", "Of course. ", ""]
GOOD_CLOSERS = ["", " Good luck!", " I hope this helps.", " Let me know if you have more questions."]
BAD_REPLIES = [
    "Figure it out yourself.",
    "Why would I tell you that? Look it up.",
    "That is a stupid question.",
    "Not my problem.",
    "Ugh, just search it online and stop bothering me.",
    "I don't care, do whatever you want.",
    "Nobody has time for this.",
]


def make_pairs(topics: list[tuple[str, str]], *, n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic, answer = topics[i % len(topics)]
        question = rng.choice(QUESTIONS).format(t=topic)
        chosen = rng.choice(GOOD_OPENERS) + answer + rng.choice(GOOD_CLOSERS)
        rows.append({"prompt": f"User: {question}\nAssistant: ", "chosen": chosen, "rejected": rng.choice(BAD_REPLIES)})
    rng.shuffle(rows)
    return rows


def main() -> None:
    here = Path(__file__).parent
    for name, topics, n, seed in (("train", TRAIN_TOPICS, 480, 0), ("eval", EVAL_TOPICS, 128, 1)):
        with open(here / f"{name}.jsonl", "w") as f:
            for row in make_pairs(topics, n=n, seed=seed):
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
