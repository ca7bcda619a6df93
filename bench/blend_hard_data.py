"""The hard question-answering set of bench/blend.py --hard (`blend_data.py --hard` writes it).

Every passage of the pool is about one town and states the same kinds of facts as every other:
the same four fact templates (a name, a number, a word and a capitalised word), each filled in
for its own town with a value no other passage uses. A question names one town and one
template, so each of the other passages in the prompt holds a distractor of the same kind,
differing only in the town ("The keeper of the Dunmere bell tower is ..." against "... of the
Halvik bell tower is ..."). The answer passage sits at every position equally often (item i at
position i mod chunks), the asked passage and template cycle through the pool, and the other
passages are drawn at random.

A separate "history" set of prompts, drawn from the same pool with another seed, stands for the
past requests whose full prefills leave chunk-cache variants behind. Its passage orders are
never equal to an evaluation prompt's.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from blend_data import COLOURS, DOORS, FIRST, LAST, TEMPLATES, TOWNS, WORDS, Fact, passage, prefix

HARD_SEED = 2026  # the frozen set: bench/blend.py --hard uses it unless told otherwise
HARD_NUM = 96
HARD_POOL = 16
KINDS = ("name", "number", "word", "Word")  # one template of each kind in every passage


def hard_pool(count: Callable[[str], int], size: int, num_tokens: int, seed: int) \
        -> tuple[list, list[tuple[str, str, str]]]:
    """`size` passages about distinct towns, each with one fact of each template."""
    rng = random.Random(seed)
    if size > len(TOWNS):
        raise ValueError(f"a hard pool has at most {len(TOWNS)} passages (one per town)")
    templates = [rng.choice([t for t in TEMPLATES if t[2] == kind]) for kind in KINDS]
    towns = rng.sample(TOWNS, size)
    names = [f"{f} {last}" for f, last in zip(rng.sample(FIRST, size), rng.sample(LAST, size),
                                               strict=True)]
    words = rng.sample(WORDS + COLOURS, 2 * size)  # distinct values for both word kinds
    values = {"name": iter(names), "number": iter(rng.sample(range(120, 9800), size)),
              "word": iter(words[:size]), "Word": iter(w.capitalize() for w in words[size:])}
    door = rng.choice(DOORS)  # the same gate or door everywhere: only the town differs
    passages = []
    for town in towns:
        facts = tuple(Fact(key.format(town=town, colour=door),
                           question.format(town=town, colour=door), str(next(values[kind])))
                      for key, question, kind in templates)
        passages.append(passage(rng, town, facts, num_tokens, count))
    return passages, templates


def hard_sets(count: Callable[[str], int], *, num: int = HARD_NUM, history: int = HARD_NUM,
              seed: int = HARD_SEED, chunks: int = 6, chunk_tokens: int = 512,
              pool_size: int = HARD_POOL) -> tuple[list[dict], list[dict]]:
    """(evaluation items, history prompts); each a blend_data-style example."""
    if not 2 <= chunks <= pool_size:
        raise ValueError(f"chunks: {chunks} is not in [2, pool size {pool_size}]")
    passages, templates = hard_pool(count, pool_size, chunk_tokens, seed)
    rng = random.Random(seed + 1)
    items, orders = [], set()
    for i in range(num):
        answering = i % pool_size
        position = i % chunks
        if num % (pool_size * chunks) == 0:  # every (passage, position) pair equally often
            position = (i // pool_size + i) % chunks
        order = rng.sample([j for j in range(pool_size) if j != answering], chunks - 1)
        order.insert(position, answering)
        fact = passages[answering].facts[(i // pool_size) % len(templates)]
        orders.add(tuple(order))
        items.append(_example(rng, passages, order, fact, order.index(answering)))
    rng = random.Random(seed + 2)
    past: list[dict] = []
    while len(past) < history:
        order = rng.sample(range(pool_size), chunks)
        if tuple(order) in orders:  # history never replays an evaluation prompt's order
            continue
        answering = rng.randrange(chunks)
        fact = rng.choice(passages[order[answering]].facts)
        past.append(_example(rng, passages, order, fact, answering))
    return items, past


def _example(rng: random.Random, passages: list, order: list[int], fact: Fact,
             answer_chunk: int) -> dict:
    return {"prefix": prefix(rng), "chunks": [passages[j].text for j in order],
            "question": fact.question, "answer": fact.answer, "answer_prefix": fact.key,
            "answer_chunk": answer_chunk, "order": order}
