"""Sentences for calibrating and measuring token mixers on MiniLM: hand-written ones plus
seeded combinations of hand-written fragments across topics and sentence shapes
(statements, questions, instructions, short and long). `split()` returns two disjoint sets."""

from __future__ import annotations

import random

HANDWRITTEN = [
    "The quick brown fox jumps over the lazy dog.",
    "Sentence embeddings capture meaning.",
    "Please remind me to call the dentist on Thursday morning.",
    "The train was delayed by forty minutes because of a signal failure near the bridge.",
    "Why does bread go stale faster in the refrigerator than on the counter?",
    "She finally finished the marathon, exhausted but smiling.",
    "Our quarterly revenue grew by twelve percent, mostly from new subscriptions.",
    "Turn left at the second traffic light and the library is on your right.",
    "The museum's new exhibit explores how ancient sailors navigated by the stars.",
    "I can't believe it's already December.",
    "A gentle rain fell on the tin roof all night long.",
    "The compiler rejected the program because of a missing semicolon.",
    "Do you know whether the pharmacy is open on Sundays?",
    "He apologized for forgetting their anniversary and booked a table at her favourite restaurant.",
    "Solar panels produce less electricity on cloudy days.",
    "The committee postponed the vote until more evidence was available.",
    "My cat refuses to eat anything except salmon.",
    "Learning a second language changes how you think about your first one.",
    "The hikers reached the summit just before the storm rolled in.",
    "Unplug the router, wait ten seconds, and plug it back in.",
    "The orchestra tuned their instruments while the audience found their seats.",
    "Interest rates rose again, making mortgages more expensive.",
    "Is it safe to swim in the lake after heavy rain?",
    "The old lighthouse keeper wrote letters he never sent.",
    "Children learn best when they feel safe and curious.",
    "The software update fixed the battery drain but introduced a new bug.",
    "We watched the fireworks from the roof of our apartment building.",
    "Freshly ground coffee smells better than anything else in the morning.",
    "The detective noticed that the clock had been stopped at exactly midnight.",
    "Vaccines train the immune system to recognize specific pathogens.",
]

FAMILIES = [
    ("The {adj} weather in {city} made everyone {react}.",
     {"adj": ["unusually warm", "freezing", "humid", "stormy", "pleasant", "foggy"],
      "city": ["Lisbon", "Oslo", "Nairobi", "Toronto", "Kyoto", "Buenos Aires", "Cairo"],
      "react": ["stay indoors", "head to the beach", "carry umbrellas", "wear heavy coats", "cancel their plans"]}),
    ("{company} announced a {product} that {feature}.",
     {"company": ["A small startup", "The largest carmaker", "A hospital network", "The city council", "An open-source project"],
      "product": ["new phone", "delivery robot", "translation service", "electric bus", "budgeting app", "search engine"],
      "feature": ["runs for a week on one charge", "works without an internet connection", "costs half as much as its rivals",
                  "protects user privacy by default", "was designed with teachers"]}),
    ("How do I {task} without {obstacle}?",
     {"task": ["fix a leaking tap", "learn to play the guitar", "train for a half marathon", "back up my photos",
               "write a cover letter", "repot a large plant", "negotiate a higher salary"],
      "obstacle": ["spending much money", "calling a professional", "losing motivation", "making a mess", "sounding arrogant"]}),
    ("Add {amount} of {ingredient}, then {step} for {time}.",
     {"amount": ["a pinch", "two cups", "a tablespoon", "half a teaspoon", "a handful"],
      "ingredient": ["salt", "flour", "chopped basil", "grated cheese", "brown sugar", "toasted almonds"],
      "step": ["stir gently", "let it simmer", "bake it", "whisk everything", "leave it to rest"],
      "time": ["five minutes", "an hour", "twenty minutes", "overnight", "about thirty seconds"]}),
    ("The {team} {result} the {event} after {turn}.",
     {"team": ["home side", "underdogs", "national team", "visiting club", "youth squad"],
      "result": ["won", "lost", "drew", "nearly threw away"],
      "event": ["final", "derby", "season opener", "championship game", "penalty shootout"],
      "turn": ["a late goal", "a controversial red card", "extra time", "a stunning comeback", "their captain was injured"]}),
    ("Researchers found that {subject} can {effect} when {condition}.",
     {"subject": ["certain bacteria", "honeybees", "small neural networks", "ocean currents", "regular exercise", "sleep"],
      "effect": ["break down plastic", "recognize human faces", "predict the weather", "improve memory", "slow ageing"],
      "condition": ["temperatures rise", "they are trained on little data", "light levels drop", "people are stressed",
                    "salt levels change"]}),
    ("My {relative} {did} a {thing} last {when}, and {after}.",
     {"relative": ["grandmother", "neighbour", "younger brother", "best friend", "aunt", "colleague"],
      "did": ["bought", "built", "sold", "painted", "lost", "found"],
      "thing": ["vintage bicycle", "wooden boat", "tiny house", "portrait", "wallet", "guitar"],
      "when": ["spring", "weekend", "summer", "month", "year"],
      "after": ["nobody has stopped talking about it", "it was a disaster", "we still laugh about it",
                "the whole street came to see it", "it changed everything"]}),
    ("Could you {request} before {deadline}?",
     {"request": ["review my pull request", "send me the invoice", "water the plants", "book the meeting room",
                  "check the tyre pressure", "proofread this essay"],
      "deadline": ["Friday", "the end of the day", "our flight leaves", "the guests arrive", "noon tomorrow"]}),
]


def sentences(count_per_family: int = 30, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(HANDWRITTEN)
    seen = set(out)
    for template, slots in FAMILIES:
        made = 0
        while made < count_per_family:
            text = template.format(**{k: rng.choice(v) for k, v in slots.items()})
            text = text[0].upper() + text[1:]
            if text not in seen:
                seen.add(text)
                out.append(text)
                made += 1
    rng.shuffle(out)
    return out


def split(seed: int = 0, calibration: int | None = None) -> tuple[list[str], list[str]]:
    """(calibration, held-out): disjoint, about half each of 270 sentences. With `calibration`,
    that many calibration sentences: the first half, then sentences the same families make with
    other seeds, none of them in the held-out half (which stays the same 135)."""
    items = sentences(seed=seed)
    half = len(items) // 2
    calib, held = items[:half], items[half:]
    taken = set(items)
    more_seed = seed
    while calibration is not None and len(calib) < calibration:
        more_seed += 1
        fresh = [s for s in sentences(seed=more_seed) if s not in taken]
        if not fresh:
            raise ValueError(f"the sentence families make fewer than {calibration} distinct calibration sentences")
        taken.update(fresh)
        calib += fresh[: calibration - len(calib)]
    return calib[:calibration] if calibration is not None else calib, held
