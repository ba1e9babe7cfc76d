"""Embedded text data for embedding models: retrieval triplets and small STS / retrieval / classification /
clustering evaluation sets, all generated from one small deterministic "world" of facts.

The world has topics; each topic has entities, and each entity has facts (where it lives, its colour, what it
does, its size). Every concept has two or three surface words (synonyms), so matching needs meaning, not
string overlap. A query asks for one fact of one entity; its positive passage states that fact with other
words; its hard negative states another fact of the same entity, or the same kind of fact of a sibling entity.
Sample i of a set is drawn from its own generator seeded with (seed, set, i), like the image sets.
"""

from __future__ import annotations

import hashlib

import numpy as np

# topic -> entities, each entity with its synonyms (the first is its canonical name).
TOPICS: dict[str, list[tuple[str, ...]]] = {
    "animals": [("fox", "vixen"), ("owl", "night bird"), ("whale", "leviathan"), ("horse", "stallion"),
                ("frog", "toad"), ("bee", "honeybee")],
    "food": [("bread", "loaf"), ("cheese", "curd"), ("apple", "pippin"), ("soup", "broth"),
             ("rice", "grain"), ("cake", "pastry")],
    "sports": [("tennis", "racket game"), ("rowing", "sculling"), ("chess", "board game"),
               ("boxing", "prizefighting"), ("skiing", "slalom"), ("cycling", "biking")],
    "music": [("violin", "fiddle"), ("drum", "tom"), ("piano", "keyboard"), ("flute", "fife"),
              ("choir", "chorus"), ("guitar", "lute")],
    "weather": [("storm", "tempest"), ("fog", "mist"), ("snow", "flurry"), ("rain", "drizzle"),
                ("wind", "gale"), ("heat", "swelter")],
    "technology": [("robot", "android"), ("laptop", "notebook"), ("router", "modem"), ("camera", "lens"),
                   ("battery", "cell"), ("drone", "quadcopter")],
}
# fact kind -> values, each with synonyms; the question words for the kind come from QUESTIONS.
FACTS: dict[str, list[tuple[str, ...]]] = {
    "place": [("forest", "woods"), ("city", "town"), ("river", "stream"), ("mountain", "peak"),
              ("desert", "dunes"), ("island", "isle"), ("valley", "dale"), ("harbor", "port")],
    "color": [("red", "crimson"), ("blue", "azure"), ("green", "emerald"), ("gold", "yellow"),
              ("black", "ebony"), ("white", "ivory"), ("grey", "ashen"), ("brown", "umber")],
    "action": [("sings", "hums"), ("runs", "sprints"), ("sleeps", "dozes"), ("glows", "shines"),
               ("falls", "drops"), ("spins", "twirls"), ("waits", "lingers"), ("climbs", "ascends")],
    "size": [("tiny", "minute"), ("huge", "enormous"), ("long", "lengthy"), ("short", "brief"),
             ("heavy", "weighty"), ("light", "feathery"), ("wide", "broad"), ("thin", "slender")],
}
QUESTIONS = {
    "place": ("where is the {e} found", "in which place does the {e} stay", "where can one see the {e}"),
    "color": ("what color is the {e}", "which colour does the {e} have", "what hue is the {e}"),
    "action": ("what does the {e} do", "how does the {e} behave", "what is the {e} known to do"),
    "size": ("how big is the {e}", "what size is the {e}", "how large is the {e}"),
}
STATEMENTS = {
    "place": ("the {e} is found near the {v}", "you can see the {e} by the {v}", "the {e} stays in the {v}"),
    "color": ("the {e} is {v}", "the {e} has a {v} colour", "a {v} {e} was seen"),
    "action": ("the {e} {v} all day", "every morning the {e} {v}", "the {e} often {v}"),
    "size": ("the {e} is {v}", "people say the {e} is {v}", "a {v} {e} appeared"),
}
SENTIMENT_WORDS = {"positive": ("love", "adore", "enjoy", "admire"), "negative": ("hate", "dislike", "dread", "loathe")}
FILLERS = ("today", "again", "as usual", "in spring", "this year", "at dawn")
EVAL_CATEGORIES = ("sts", "classification", "retrieval", "clustering")


def _rng(seed: int, name: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}/{name}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _pick(rng, options):
    return options[rng.integers(len(options))]


def _world(seed: int) -> dict[tuple[str, str], dict[str, int]]:
    """Facts of every entity, (topic, entity) -> {fact kind: value index}; fixed by the seed."""
    rng = np.random.default_rng(seed)
    return {(topic, entity[0]): {kind: int(rng.integers(len(values))) for kind, values in FACTS.items()}
            for topic, entities in TOPICS.items() for entity in entities}


def _entities() -> list[tuple[str, tuple[str, ...]]]:
    return [(topic, entity) for topic, entities in TOPICS.items() for entity in entities]


def _statement(rng, entity: tuple[str, ...], kind: str, value: int) -> str:
    text = _pick(rng, STATEMENTS[kind]).format(e=_pick(rng, entity), v=_pick(rng, FACTS[kind][value]))
    return f"{text} {_pick(rng, FILLERS)}" if rng.random() < 0.5 else text


def build_triplets(seed: int = 0, num_train: int = 2000, num_test: int = 200):
    """(query, positive, negative) triplets: a question about one fact, a passage stating it, a hard negative.

    The hard negative is, with equal odds, another fact of the same entity or the same kind of fact of
    another entity of the same topic (with a different value, so it never answers the query).
    """
    import datasets

    from ..engine.loop import progress_bar

    world, entities = _world(seed), _entities()

    def sample(split: str, i: int) -> dict[str, str]:
        rng = _rng(seed, f"triplets/{split}", i)
        topic, entity = entities[rng.integers(len(entities))]
        facts = world[(topic, entity[0])]
        kind = _pick(rng, list(FACTS))
        query = _pick(rng, QUESTIONS[kind]).format(e=_pick(rng, entity))
        positive = _statement(rng, entity, kind, facts[kind])
        if rng.random() < 0.5:
            other_kind = _pick(rng, [k for k in FACTS if k != kind])
            negative = _statement(rng, entity, other_kind, facts[other_kind])
        else:
            siblings = [e for t, e in entities if t == topic and e != entity and world[(t, e[0])][kind] != facts[kind]]
            sibling = _pick(rng, siblings) if siblings else _pick(rng, [e for _, e in entities if e != entity])
            negative = _statement(rng, sibling, kind, world[(_topic_of(sibling), sibling[0])][kind])
        return {"query": query, "positive": positive, "negative": negative}

    def split(name: str, n: int):
        return datasets.Dataset.from_list([sample(name, i)
                                           for i in progress_bar(range(n), desc=f"building triplets ({name})")])

    return datasets.DatasetDict(train=split("train", num_train), test=split("test", num_test))


def _topic_of(entity: tuple[str, ...]) -> str:
    return next(topic for topic, entities in TOPICS.items() if entity in entities)


def _sts_set(seed: int, index: int, size: int) -> dict:
    """Sentence pairs over four slots (entity, fact kind + value, filler); the gold score, 0-5, counts the slots
    that mean the same thing, whatever words express them."""
    entities = _entities()
    pairs, scores = [], []
    for i in range(size):
        rng = _rng(seed, f"sts/{index}", i)
        _, entity = entities[rng.integers(len(entities))]
        kind = _pick(rng, list(FACTS))
        value = int(rng.integers(len(FACTS[kind])))
        template = int(rng.integers(3))
        same = rng.random(3) < rng.random()  # how many slots survive varies from pair to pair
        other_entity = entity if same[0] else _pick(rng, [e for _, e in entities if e != entity])
        other_kind = kind if same[1] else _pick(rng, [k for k in FACTS if k != kind])
        other_value = value if (same[1] and same[2]) else int(rng.integers(len(FACTS[other_kind])))
        if other_kind == kind and other_value == value and not (same[1] and same[2]):
            other_value = (value + 1) % len(FACTS[kind])
        first = STATEMENTS[kind][template].format(e=_pick(rng, entity), v=_pick(rng, FACTS[kind][value]))
        second = _pick(rng, STATEMENTS[other_kind]).format(e=_pick(rng, other_entity),
                                                           v=_pick(rng, FACTS[other_kind][other_value]))
        score = 2.5 * (other_entity == entity) + 1.0 * (other_kind == kind) + 1.5 * (
            other_kind == kind and other_value == value)
        pairs.append((first, second))
        scores.append(score)
    return {"sentence1": [a for a, _ in pairs], "sentence2": [b for _, b in pairs], "score": scores}


def _labelled_set(seed: int, index: int, size: int, task: str) -> dict:
    """Sentences labelled by topic, by the kind of fact they state, or by the sentiment towards the entity."""
    entities = _entities()
    texts, labels = [], []
    names = {"topic": list(TOPICS), "fact": list(FACTS), "sentiment": list(SENTIMENT_WORDS)}[task]
    for i in range(size):
        rng = _rng(seed, f"{task}/{index}", i)
        label = i % len(names)
        if task == "topic":
            entity = _pick(rng, TOPICS[names[label]])
            kind = _pick(rng, list(FACTS))
            text = _statement(rng, entity, kind, int(rng.integers(len(FACTS[kind]))))
        elif task == "fact":
            _, entity = entities[rng.integers(len(entities))]
            text = _statement(rng, entity, names[label], int(rng.integers(len(FACTS[names[label]]))))
        else:
            _, entity = entities[rng.integers(len(entities))]
            kind = _pick(rng, list(FACTS))
            text = f"i {_pick(rng, SENTIMENT_WORDS[names[label]])} the {_pick(rng, entity)} because " + \
                _statement(rng, entity, kind, int(rng.integers(len(FACTS[kind]))))
        texts.append(text)
        labels.append(label)
    return {"text": texts, "label": labels, "label_names": names}


def _retrieval_set(seed: int, index: int, num_queries: int) -> dict:
    """Queries about facts; a corpus holding, for each query's entity, one passage per fact kind, so every
    entity contributes three hard distractors next to the relevant passage."""
    world, entities = _world(seed), _entities()
    rng = _rng(seed, f"retrieval/{index}", 0)
    chosen = [entities[j] for j in rng.permutation(len(entities))[:max(1, num_queries // 2)]]
    corpus, passage_of = [], {}
    for topic, entity in chosen:
        for kind in FACTS:
            passage_of[(entity[0], kind)] = len(corpus)
            corpus.append(_statement(rng, entity, kind, world[(topic, entity[0])][kind]))
    queries, relevant = [], []
    for i in range(num_queries):
        q_rng = _rng(seed, f"retrieval/{index}/query", i)
        _, entity = chosen[i % len(chosen)]
        kind = _pick(q_rng, list(FACTS))
        queries.append(_pick(q_rng, QUESTIONS[kind]).format(e=_pick(q_rng, entity)))
        relevant.append([passage_of[(entity[0], kind)]])
    return {"queries": queries, "corpus": corpus, "relevant": relevant}


def build_eval_suite(seed: int = 1000, sets_per_category: int = 6, size: int = 96) -> dict[str, list[dict]]:
    """The embedded benchmark: `sets_per_category` small datasets for each of STS, classification, retrieval
    and clustering (the paper's four MTEB categories), so that a paired test across datasets has samples.

    The world's facts depend on `seed`, so a suite built with another seed than the training triplets asks
    about facts the model has never been trained on.
    """
    if sets_per_category < 1 or size < 8:
        raise ValueError(f"need sets_per_category >= 1 and size >= 8, got {sets_per_category} and {size}")
    labelled_tasks = ("topic", "fact", "sentiment")
    suite: dict[str, list[dict]] = {category: [] for category in EVAL_CATEGORIES}
    for k in range(sets_per_category):
        suite["sts"].append({"name": f"sts-{k}", **_sts_set(seed, k, size)})
        task = labelled_tasks[k % len(labelled_tasks)]
        suite["classification"].append({"name": f"{task}-classification-{k}", **_labelled_set(seed, k, size, task)})
        suite["clustering"].append({"name": f"{task}-clustering-{k}",
                                    **_labelled_set(seed + 1, k, size, task)})
        suite["retrieval"].append({"name": f"retrieval-{k}", **_retrieval_set(seed, k, size // 2)})
    return suite


def vocabulary() -> list[str]:
    """Every word the embedded text can contain, sorted (the word-level tokenizer's vocabulary)."""
    words: set[str] = set()
    phrases = [name for entities in TOPICS.values() for entity in entities for name in entity]
    phrases += [name for values in FACTS.values() for value in values for name in value]
    phrases += [t for templates in (*QUESTIONS.values(), *STATEMENTS.values()) for t in templates]
    phrases += [w for ws in SENTIMENT_WORDS.values() for w in ws] + list(FILLERS) + ["i", "because"]
    for phrase in phrases:
        words.update(phrase.replace("{e}", " ").replace("{v}", " ").split())
    return sorted(words)


def word_tokenizer(words, *, extra_special_tokens=(), append_eos: bool = True, split_punctuation: bool = True):
    """A word-level fast tokenizer for models trained from scratch on embedded data (no download needed).

    Ids: <pad> 0, <unk> 1, <s> 2, </s> 3, then `extra_special_tokens`, then `words` (repeats dropped). Every text
    starts with <s> and, with `append_eos`, ends with </s>; batches pad on the left. `split_punctuation` makes
    "fox," two tokens; without it only whitespace separates them.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", *extra_special_tokens]
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials, *words]))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    template = "<s> $A </s>" if append_eos else "<s> $A"
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in ("<s>", "</s>") if t in template])
    extra = {"additional_special_tokens": list(extra_special_tokens)} if extra_special_tokens else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", padding_side="left", **extra)


def build_word_tokenizer():
    """The word tokenizer over `vocabulary()`: what a tiny decoder trained on the embedded text uses. Like the
    paper's tokenizers (`add_eos_token=True`) it wraps every text as `<s> text </s>`."""
    return word_tokenizer(vocabulary())
