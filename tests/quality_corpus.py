"""A corpus with planted junk for the quality classifier (tests and benchmarks).

Clean documents are English prose already on the machine: paragraphs of the standard library's
docstrings (runs of prose, not code or doctest lines), one to three paragraphs per document. Junk
is generated, five kinds: symbol soup, web boilerplate (navigation, cookie and footer lines),
keyword spam, log lines, and word salad (a prose paragraph's words shuffled: the stop words and
word lengths of prose, which the word-shape heuristics pass). Deterministic by seed.

Three sources: ``reference`` (clean: the positives), ``junk`` (junk: the negatives) and ``web``
(the corpus to filter: clean documents disjoint from the reference's, with ``junk_share`` planted
junk); ``planted_junk`` holds the web documents that are junk, the truth to score against.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache

_TRIPLE_QUOTED = re.compile(r'"""(.*?)"""', re.S)
_WORD = re.compile(r"[A-Za-z]+")
STOP = {"the", "a", "of", "and", "to", "is", "in", "that", "be", "with", "for", "it", "this"}
JUNK_KINDS = ("symbol_soup", "boilerplate", "spam", "log_lines", "word_salad")
BOILERPLATE = [
    "Home | About | Contact | Privacy Policy | Terms of Service",
    "We use cookies to improve your experience. Accept all cookies",
    "Copyright (c) All rights reserved.",
    "Sign in | Register | Forgot password?",
    "Click here to subscribe to our newsletter!",
    "Share on Facebook Share on Twitter Share on LinkedIn",
    "Previous page | Next page | Back to top",
    "Skip to main content",
    "Related posts: Top 10 deals | Best offers | Trending now",
    "Powered by WordPress | Theme by Example",
]
SPAM = "cheap best free buy online discount deal offer casino viagra loan crypto win prize bonus sale click now".split()


def docstring_prose(source: str) -> list[str]:
    """The prose paragraphs of a Python file's triple-quoted strings: runs of words, not code, doctest or list lines."""
    paragraphs = []
    for block in _TRIPLE_QUOTED.findall(source):
        for paragraph in re.split(r"\n\s*\n", block):
            lines = [line.strip() for line in paragraph.strip().splitlines()]
            if any(line.startswith((">>>", "...", "$", "-", "*", ":", "|")) for line in lines):
                continue
            text = " ".join(lines)
            words = text.split()
            if len(words) < 30:
                continue
            alpha = sum(bool(_WORD.fullmatch(w.strip(".,;:()'\"`"))) for w in words) / len(words)
            if alpha < 0.85 or sum(w.lower() in STOP for w in words) < 4:
                continue
            paragraphs.append(text)
    return paragraphs


@lru_cache(maxsize=1)
def prose_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs of the standard library's docstrings, deduplicated, in file order."""
    from pipelines.data.readers import stdlib_files

    seen, paragraphs = set(), []
    for path in stdlib_files():
        try:
            source = open(path, encoding="utf-8").read()  # noqa: SIM115
        except (OSError, UnicodeDecodeError):
            continue
        for text in docstring_prose(source):
            if text not in seen:
                seen.add(text)
                paragraphs.append(text)
    return tuple(paragraphs)


def junk_document(rng: random.Random, kind: str, paragraphs: tuple[str, ...]) -> str:
    if kind == "symbol_soup":
        return " ".join(
            "".join(rng.choices("#@$%^&*~|<>{}[]=+_/\\;:!?0123456789abcxyz", k=rng.randint(2, 9)))
            for _ in range(rng.randint(40, 120))
        )
    if kind == "boilerplate":
        return "\n".join(rng.choice(BOILERPLATE) for _ in range(rng.randint(6, 16)))
    if kind == "spam":
        return " ".join(rng.choice(SPAM) + ("!" if rng.random() < 0.2 else "") for _ in range(rng.randint(40, 120)))
    if kind == "log_lines":
        return "\n".join(
            f"2024-0{rng.randint(1, 9)}-{rng.randint(10, 28)} {rng.randint(10, 23)}:{rng.randint(10, 59)}:"
            f"{rng.randint(10, 59)} {rng.choice(['INFO', 'WARN', 'ERROR', 'DEBUG'])} "
            f"[{rng.choice(['worker', 'db', 'http', 'cache'])}-{rng.randint(1, 99)}] "
            f"{rng.choice(['request', 'retry', 'timeout', 'conn', 'flush'])} id={rng.getrandbits(32):08x} "
            f"ms={rng.randint(1, 9999)}"
            for _ in range(rng.randint(5, 20))
        )
    if kind == "word_salad":
        words = " ".join(rng.sample(paragraphs, 2)).split()
        rng.shuffle(words)
        return " ".join(words)
    raise ValueError(kind)


def _doc_id(source: str, index: int, seed: int) -> str:
    return hashlib.sha1(f"{source}/{index}/{seed}".encode()).hexdigest()[:16]


@dataclass
class QualityCorpus:
    #: source name -> [(doc_id, text)]
    sources: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    planted_junk: set[str] = field(default_factory=set)  # web doc ids that are junk
    junk_kinds: dict[str, str] = field(default_factory=dict)  # doc id -> junk kind (junk and web sources)


def quality_corpus(
    reference: int,
    junk: int,
    web: int,
    junk_share: float = 0.2,
    seed: int = 0,
    kinds: tuple[str, ...] = JUNK_KINDS,
) -> QualityCorpus:
    """``reference`` clean documents, ``junk`` junk documents and ``web`` documents of which ``junk_share``
    are junk, of ``kinds`` in turn; the clean documents of ``reference`` and ``web`` share no paragraph."""
    rng = random.Random(seed)
    paragraphs = list(prose_paragraphs())
    rng.shuffle(paragraphs)
    web_junk = round(web * junk_share)
    split = len(paragraphs) * reference // max(1, reference + web - web_junk)
    pools = {"reference": paragraphs[:split], "web": paragraphs[split:]}

    def clean(pool: list[str]) -> str:
        return "\n\n".join(rng.sample(pool, min(len(pool), rng.randint(1, 3))))

    corpus = QualityCorpus()
    corpus.sources["reference"] = [(_doc_id("reference", i, seed), clean(pools["reference"])) for i in range(reference)]
    corpus.sources["junk"] = []
    for i in range(junk):
        doc_id, kind = _doc_id("junk", i, seed), kinds[i % len(kinds)]
        corpus.sources["junk"].append((doc_id, junk_document(rng, kind, tuple(pools["reference"]))))
        corpus.junk_kinds[doc_id] = kind
    corpus.sources["web"] = []
    for i in range(web):
        doc_id = _doc_id("web", i, seed)
        if i < web_junk:
            kind = kinds[i % len(kinds)]
            corpus.sources["web"].append((doc_id, junk_document(rng, kind, tuple(pools["web"]))))
            corpus.planted_junk.add(doc_id)
            corpus.junk_kinds[doc_id] = kind
        else:
            corpus.sources["web"].append((doc_id, clean(pools["web"])))
    rng.shuffle(corpus.sources["web"])
    return corpus
