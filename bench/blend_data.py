"""The synthetic question-answering set of bench/blend.py: retrieved passages about invented
towns, each carrying two facts, and a question about one fact of one passage.

Deterministic from `--seed`. A pool of `--pool` passages of about `--chunk-tokens` tokens each
(measured with the model's tokenizer) is written once: templated filler prose about an invented
town (its trades, streets, weather and festivals, from word lists), with two facts placed at
random sentences among it. A fact is "<key> <value>.", e.g.

- "The pass phrase for the amber gate of Kestwick is velvet."   (a word)
- "The number of barrels of salt in the cellar of the Dunmere tannery is 4817."   (a number)
- "The keeper of the Halvik bell tower is Ilsa Marrow."   (a name)

Each of the 24 fact templates is used once in a pool, and every value once: an example's
question has one matching key in its prompt, and without the passage that holds it no
candidate answer. An example draws `--chunks` passages from the pool in a random order (so
passages recur across examples, as retrieved ones do), asks about a fact of one of them, and
gives the fact's key as `answer_prefix`, so the answer is the value alone. Its prefix is one of
a few instructions with a worked example of the answer format (a fact no passage holds).

    python bench/blend_data.py --out FILE.jsonl [--num 8] [--seed 0] [--chunks 6]
        [--chunk-tokens 512] [--pool 12]
    python bench/blend_data.py --hard --out FILE.jsonl [--history-out FILE.jsonl]

`--hard` writes the hard set instead (bench/blend_hard_data.py: distractors of the same kind,
the answer position balanced; 96 items and 96 history prompts from its frozen seed 2026 unless
`--num` / `--seed` say otherwise).

Each line: {"prefix", "chunks", "question", "answer", "answer_prefix", "answer_chunk"} (the
index in "chunks" of the passage that answers).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tandem.engine.loader import load_tokenizer

TOWNS = ["Kestwick", "Dunmere", "Halvik", "Orrinvale", "Tabberly", "Corrowen", "Penhallow",
         "Vesterby", "Quillan", "Brackwater", "Lownfield", "Sorrelby", "Marrowdown", "Fenlock",
         "Ashcombe", "Wyndle", "Tollcaster", "Embery", "Grisholt", "Caddon"]
TRADES = ["cooper", "weaver", "chandler", "tanner", "potter", "miller", "roper", "glazier",
          "smith", "baker", "dyer", "saddler", "joiner", "fletcher", "net mender", "brewer"]
GOODS = ["wool", "tallow", "rope", "flax", "salt fish", "barley", "slate", "cider", "honey",
         "lamp oil", "peat", "linen", "timber", "clay pots", "dried apples", "iron nails"]
STREETS = ["Lantern Row", "the Long Quay", "Fuller's Lane", "the Mill Steps", "Chapel Hill",
           "the Upper Market", "Ferry Street", "the Old Causeway", "Tanner's Yard",
           "the Willow Walk", "Bell Street", "the Low Green"]
WEATHER = ["a thin rain", "a dry east wind", "low fog", "a heavy frost", "warm drizzle",
           "a hard northerly gale", "bright, cold sunshine", "sleet from the hills"]
SEASONS = ["spring", "summer", "autumn", "winter"]
FEASTS = ["the lamp feast", "the shearing fair", "the first-catch supper", "the apple wake",
          "the bridge day", "the winter reckoning", "the hiring fair", "the reed burning"]
FOODS = ["leeks", "mutton", "smoked eel", "turnips", "mushrooms", "beans", "onions"]
ANIMALS = ["goats", "geese", "mules", "ponies", "sheep", "hens", "oxen", "ducks"]
LANDMARKS = ["the old granary", "the stone bridge", "the chapel", "the tide mill",
             "the rope walk", "the customs house", "the pump house", "the watch house"]
ADJECTIVES = ["narrow", "crooked", "busy", "quiet", "steep", "muddy", "cobbled", "windswept"]
# Fact values: each used once in a pool.
WORDS = ["velvet", "thimble", "juniper", "harrow", "marigold", "lantern", "cinder", "quartz",
         "bramble", "walnut", "tinder", "sparrow", "meadow", "pebble", "saddle", "willow",
         "cobweb", "ember", "fiddle", "garnet", "hazel", "kettle", "ledger", "mitten"]
COLOURS = ["amber", "copper", "ivory", "crimson", "saffron", "cobalt", "ochre", "jade"]
DOORS = ["green", "red", "blue", "black", "white", "grey"]  # keys: gate and door colours
FIRST = ["Ilsa", "Tomas", "Maren", "Oswin", "Bette", "Corin", "Hesper", "Jory", "Linnet",
         "Piers", "Rowan", "Sabine", "Tamsin", "Wendel", "Agathe", "Edric", "Fenna", "Gideon"]
LAST = ["Marrow", "Colebrook", "Ashdown", "Pellow", "Quarrie", "Tregar", "Wimble", "Hollis",
        "Brannock", "Foss", "Kettering", "Lusk", "Odell", "Rudge", "Stannard", "Vaughn",
        "Yarrow", "Dunstan"]
# Fact templates: (key, question, kind of value); {town} is the passage's town.
TEMPLATES = [
    ("The pass phrase for the {colour} gate of {town} is",
     "What is the pass phrase for the {colour} gate of {town}?", "word"),
    ("The keeper of the {town} bell tower is", "Who is the keeper of the {town} bell tower?",
     "name"),
    ("The number of barrels of salt in the cellar of the {town} tannery is",
     "How many barrels of salt are in the cellar of the {town} tannery?", "number"),
    ("The name of the ferryman's dog in {town} is",
     "What is the name of the ferryman's dog in {town}?", "Word"),
    ("The secret ingredient of the {town} harvest pie is",
     "What is the secret ingredient of the {town} harvest pie?", "word"),
    ("The toll in copper pennies for crossing the {town} causeway is",
     "What is the toll in copper pennies for crossing the {town} causeway?", "number"),
    ("The oldest bell in the chapel of {town} is called",
     "What is the oldest bell in the chapel of {town} called?", "Word"),
    ("The head of the weavers' guild of {town} is",
     "Who is the head of the weavers' guild of {town}?", "name"),
    ("The depth in feet of the well on the {town} green is",
     "What is the depth in feet of the well on the {town} green?", "number"),
    ("The password spoken at the {colour} door of the {town} customs house is",
     "What is the password spoken at the {colour} door of the {town} customs house?", "word"),
    ("The founder of the {town} rope walk was", "Who was the founder of the {town} rope walk?",
     "name"),
    ("The ship that brought the first bell to {town} was named the",
     "What was the name of the ship that brought the first bell to {town}?", "Word"),
    ("The number of steps up to the chapel door of {town} is",
     "How many steps lead up to the chapel door of {town}?", "number"),
    ("The midwife of {town} is", "Who is the midwife of {town}?", "name"),
    ("The lucky colour of the {town} hiring fair is",
     "What is the lucky colour of the {town} hiring fair?", "colour"),
    ("The distance in miles from {town} to the salt marsh is",
     "What is the distance in miles from {town} to the salt marsh?", "number"),
    ("The herb hung over the doors of {town} at the lamp feast is",
     "Which herb is hung over the doors of {town} at the lamp feast?", "word"),
    ("The clerk who keeps the {town} harbour ledger is",
     "Who is the clerk who keeps the {town} harbour ledger?", "name"),
    ("The code word painted on the {town} watch house is",
     "What is the code word painted on the {town} watch house?", "word"),
    ("The weight in pounds of the great cheese of {town} is",
     "What is the weight in pounds of the great cheese of {town}?", "number"),
    ("The tune the bell ringers of {town} play at dawn is called",
     "What is the tune the bell ringers of {town} play at dawn called?", "Word"),
    ("The schoolmaster of {town} is", "Who is the schoolmaster of {town}?", "name"),
    ("The year the stone bridge of {town} was finished is",
     "In which year was the stone bridge of {town} finished?", "number"),
    ("The nickname of the {town} mill cat is",
     "What is the nickname of the {town} mill cat?", "Word"),
]

FILLER = [
    "In {town} the {trade}s open their shutters before the morning bell, and the smell of "
    "{good} drifts along {street}.",
    "Most of the {good} sold in {town} comes down the valley road on carts drawn by {animals}.",
    "When {weather} settles over {town}, the children of {street} are kept indoors and the "
    "{trade}s work by lamplight.",
    "The {adj} lanes behind {landmark} were laid out long before anyone in {town} kept written "
    "records.",
    "Every {season}, {town} holds {feast}, and the {trade}s close early so that their "
    "apprentices can join the procession to {landmark}.",
    "Travellers who reach {town} in {season} often remark on {weather} and on the price of "
    "{good} in the upper market.",
    "A {trade} from {street} once claimed that the finest {good} in the county came from "
    "within sight of {landmark}.",
    "The road from {town} to the coast is {adj} in places, and carters prefer to travel it in "
    "daylight.",
    "On market days the {animals} of the outlying farms are penned near {landmark}, and the "
    "noise carries as far as {street}.",
    "Older people in {town} still measure the year by {feast} rather than by the calendar.",
    "The council of {town} meets above {landmark} on the first evening of each month to settle "
    "disputes over {good} and grazing.",
    "During {weather} the river below {town} rises quickly, and the {trade}s on {street} move "
    "their stock to the upper floors.",
    "It is said in {town} that a {trade} who cannot sing the old {season} songs will never "
    "keep an apprentice for long.",
    "The inn on {street} serves a stew of barley and {food} that visitors to {town} rarely "
    "forget.",
    "Few houses in {town} are more than two storeys high, because the ground near {landmark} "
    "is soft and the winters are long.",
    "The {trade}s of {town} buy most of their {good} from the hill farms and sell it again, "
    "worked and finished, at the coast.",
    "A {adj} path climbs from {street} to {landmark}, and on clear days it gives a view of "
    "the whole valley.",
    "Letters for {town} arrive twice a week with the carrier, who also brings news, gossip "
    "and the occasional crate of {good}.",
    "In the weeks before {feast}, the windows along {street} are hung with ribbons and "
    "bundles of dried herbs.",
    "The schoolroom of {town} stands beside {landmark}, and its bell is rung by whichever "
    "child arrives first.",
    "Nobody in {town} remembers a {season} as harsh as the one in which {weather} lasted for "
    "forty days.",
    "The {trade}s and the {trade2}s of {town} have argued for generations over which guild "
    "should lead the procession at {feast}.",
    "Along {street} the {adj} cottages lean against one another like tired {animals}.",
    "Merchants from the coast say that {town} is slow to trust strangers but quick to feed "
    "them.",
]


@dataclass(frozen=True)
class Fact:
    key: str  # the statement up to its value: the answer prefix
    question: str
    answer: str

    @property
    def statement(self) -> str:
        return f"{self.key} {self.answer}."


@dataclass(frozen=True)
class Passage:
    text: str
    facts: tuple[Fact, ...]


# Prefixes: an instruction and a worked example (a fact no passage holds, of a key no template
# shares: the model must not find the question's key in the prefix).
INSTRUCTIONS = [
    "Below are passages from the records of the valley towns. Answer the question at the end "
    "with the words the records use.",
    "You will read several entries from a gazetteer of invented towns, then answer one "
    "question about them. Copy the answer exactly from the entries.",
    "The following notes were gathered by a travelling clerk. Read them and answer the "
    "question that follows, using the wording of the notes.",
    "Read the town records below carefully. One of them contains the answer to the final "
    "question.",
]
EXAMPLES = [
    Fact("The name of the lighthouse cat of Nettlecombe is",
         "What is the name of the lighthouse cat of Nettlecombe?", "Pepper"),
    Fact("The number of lamps on the Nettlecombe harbour wall is",
         "How many lamps are on the Nettlecombe harbour wall?", "212"),
    Fact("The harbour master of Nettlecombe is", "Who is the harbour master of Nettlecombe?",
         "Nell Abney"),
]


def prefix(rng: random.Random) -> str:
    demo = rng.choice(EXAMPLES)
    return (f"{rng.choice(INSTRUCTIONS)}\n\nQuestion: {demo.question}\n"
            f"Answer: {demo.statement}")


def filler(rng: random.Random, town: str, template: str) -> str:
    trade, trade2 = rng.sample(TRADES, 2)
    return template.format(
        town=town, trade=trade, trade2=trade2, good=rng.choice(GOODS),
        street=rng.choice(STREETS), food=rng.choice(FOODS), weather=rng.choice(WEATHER),
        season=rng.choice(SEASONS),
        feast=rng.choice(FEASTS), animals=rng.choice(ANIMALS), landmark=rng.choice(LANDMARKS),
        adj=rng.choice(ADJECTIVES))


def passage(rng: random.Random, town: str, facts: tuple[Fact, ...], num_tokens: int,
            count: Callable[[str], int]) -> Passage:
    """Filler about `town` up to about `num_tokens` tokens ("\\n\\n" + text, as the bench sends
    it), the facts at random sentences (never the first), in paragraphs of 4 to 7 sentences."""
    sentences = [f"{town} is a market town of the upper valley."]
    budget = num_tokens - sum(count(" " + f.statement) for f in facts)
    deck: list[str] = []
    while True:
        if not deck:  # every filler template once before any repeats
            deck = rng.sample(FILLER, len(FILLER))
        sentence = filler(rng, town, deck.pop())
        if count("\n\n" + " ".join([*sentences, sentence])) > budget:
            break
        sentences.append(sentence)
    for fact in facts:
        sentences.insert(rng.randrange(1, len(sentences) + 1), fact.statement)
    paragraphs, start = [], 0
    while start < len(sentences):
        size = rng.randint(4, 7)
        paragraphs.append(" ".join(sentences[start:start + size]))
        start += size
    return Passage("\n".join(paragraphs), facts)


def pool(count: Callable[[str], int], size: int, num_tokens: int, seed: int) -> list[Passage]:
    rng = random.Random(seed)
    if 2 * size > len(TEMPLATES) or size > len(TOWNS):
        raise ValueError(f"a pool of {size} passages needs more fact templates or towns "
                         f"(at most {len(TEMPLATES) // 2} passages)")
    towns, templates = rng.sample(TOWNS, size), rng.sample(TEMPLATES, 2 * size)
    values = {"word": iter(rng.sample(WORDS, len(WORDS))),
              "colour": iter(rng.sample(COLOURS, len(COLOURS))),
              "name": (f"{f} {last}" for f, last in zip(
                  rng.sample(FIRST, len(FIRST)), rng.sample(LAST, len(LAST)), strict=True)),
              "number": iter(rng.sample(range(120, 9800), 2 * size))}
    out = []
    for i, town in enumerate(towns):
        facts = []
        for key, question, kind in templates[2 * i:2 * i + 2]:
            value = str(next(values[kind.lower()]))
            slots = {"town": town, "colour": rng.choice(DOORS)}  # {colour}: a gate or door
            facts.append(Fact(key.format(**slots), question.format(**slots),
                              value.capitalize() if kind == "Word" else value))
        out.append(passage(rng, town, tuple(facts), num_tokens, count))
    return out


def generate(count: Callable[[str], int], num: int, *, seed: int = 0, chunks: int = 6,
             chunk_tokens: int = 512, pool_size: int = 12) -> list[dict]:
    """`num` examples; `count` gives the number of tokens of a text."""
    if not 1 <= chunks <= pool_size:
        raise ValueError(f"chunks: {chunks} is not in [1, pool size {pool_size}]")
    passages = pool(count, pool_size, chunk_tokens, seed)
    rng = random.Random(seed + 1)
    examples = []
    for i in range(num):
        answering = i % pool_size  # every passage gets asked about in turn
        others = rng.sample([j for j in range(pool_size) if j != answering], chunks - 1)
        order = [*others]
        order.insert(rng.randrange(chunks), answering)
        fact = rng.choice(passages[answering].facts)
        examples.append({
            "prefix": prefix(rng), "chunks": [passages[j].text for j in order],
            "question": fact.question, "answer": fact.answer,
            "answer_prefix": fact.key, "answer_chunk": order.index(answering)})
    return examples


def token_counter(model: str | None = None) -> Callable[[str], int]:
    tokenizer, _ = load_tokenizer(model)
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the .jsonl file to write")
    parser.add_argument("--num", type=int, default=None, help="default: 8 (--hard: 96)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=6, help="passages per example")
    parser.add_argument("--chunk-tokens", type=int, default=512, help="tokens per passage")
    parser.add_argument("--pool", type=int, default=12, help="distinct passages")
    parser.add_argument("--model", default=None, help="whose tokenizer sizes the passages")
    parser.add_argument("--hard", action="store_true", help="the hard set (see above)")
    parser.add_argument("--history-out", type=Path, default=None,
                        help="with --hard: where to write the history prompts")
    args = parser.parse_args()
    if args.hard:
        from blend_hard_data import HARD_NUM, HARD_SEED, hard_sets

        seed = args.seed or HARD_SEED
        examples, history = hard_sets(token_counter(args.model), num=args.num or HARD_NUM,
                                      seed=seed, chunks=args.chunks,
                                      chunk_tokens=args.chunk_tokens)
        if args.history_out is not None:
            write_jsonl(args.history_out, history)
    else:
        examples = generate(token_counter(args.model), args.num or 8, seed=args.seed,
                            chunks=args.chunks, chunk_tokens=args.chunk_tokens,
                            pool_size=args.pool)
    write_jsonl(args.out, examples)


def write_jsonl(path: Path, examples: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example) + "\n")
    print(f"wrote {len(examples)} examples to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
