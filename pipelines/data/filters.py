"""Rule filters in the spirit of the Gopher (Rae et al. 2021) and C4 heuristics.

Each filter reads one document and answers keep, or drop with a reason
"code (detail)". A threshold set to None is not checked. Defaults are the
published Gopher values; a recipe for source code loosens the prose rules.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import numpy as np

from pipelines.data.steps import Filter, Verdict

_WORD = re.compile(r"\S+")
_PARAGRAPHS = re.compile(r"\n{2,}")
#: ASCII's control characters (category Cc) other than tab, newline and carriage return.
_ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
SYMBOLS = ("#", "...", "\u2026")
BULLETS = ("\u2022", "\u2023", "\u25b6", "\u25cf", "\u25e6", "\u25aa", "-", "*")
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _fail(code: str, detail: str) -> tuple[bool, str]:
    return False, f"{code} ({detail})"


class LengthFilter(Filter):
    """Documents outside [min, max] characters or words."""

    name = "length"

    def __init__(
        self,
        min_chars: int | None = None,
        max_chars: int | None = None,
        min_words: int | None = None,
        max_words: int | None = None,
    ):
        self.min_chars, self.max_chars, self.min_words, self.max_words = min_chars, max_chars, min_words, max_words

    def keep(self, row: dict[str, Any]) -> Verdict:
        chars = len(row["text"])
        if self.min_chars is not None and chars < self.min_chars:
            return _fail("too_short", f"{chars} chars < {self.min_chars}")
        if self.max_chars is not None and chars > self.max_chars:
            return _fail("too_long", f"{chars} chars > {self.max_chars}")
        if self.min_words is not None or self.max_words is not None:
            words = len(_words(row["text"]))
            if self.min_words is not None and words < self.min_words:
                return _fail("too_few_words", f"{words} words < {self.min_words}")
            if self.max_words is not None and words > self.max_words:
                return _fail("too_many_words", f"{words} words > {self.max_words}")
        return True


class GopherQualityFilter(Filter):
    """Word-shape heuristics: mean word length, symbols, ellipsis and bullet lines, alphabetic words, stop words."""

    name = "gopher_quality"

    def __init__(  # the documented defaults live in pipelines.data.config.GopherQualityStep
        self,
        *,
        min_mean_word_length: float | None,
        max_mean_word_length: float | None,
        max_symbol_word_ratio: float | None,
        max_ellipsis_line_fraction: float | None,
        max_bullet_line_fraction: float | None,
        min_alpha_word_fraction: float | None,
        min_stop_words: int | None,
    ):
        self.min_mean_word_length = min_mean_word_length
        self.max_mean_word_length = max_mean_word_length
        self.max_symbol_word_ratio = max_symbol_word_ratio
        self.max_ellipsis_line_fraction = max_ellipsis_line_fraction
        self.max_bullet_line_fraction = max_bullet_line_fraction
        self.min_alpha_word_fraction = min_alpha_word_fraction
        self.min_stop_words = min_stop_words

    def keep(self, row: dict[str, Any]) -> Verdict:
        text = row["text"]
        words = _words(text)
        if not words:
            return _fail("no_words", "0 words")
        mean = sum(len(w) for w in words) / len(words)
        if self.min_mean_word_length is not None and mean < self.min_mean_word_length:
            return _fail("mean_word_length", f"{mean:.2f} < {self.min_mean_word_length}")
        if self.max_mean_word_length is not None and mean > self.max_mean_word_length:
            return _fail("mean_word_length", f"{mean:.2f} > {self.max_mean_word_length}")
        if self.max_symbol_word_ratio is not None:
            ratio = sum(text.count(symbol) for symbol in SYMBOLS) / len(words)
            if ratio > self.max_symbol_word_ratio:
                return _fail("symbol_word_ratio", f"{ratio:.3f} > {self.max_symbol_word_ratio}")
        lines = [line for line in text.split("\n") if line.strip()]
        if lines and self.max_ellipsis_line_fraction is not None:
            fraction = sum(line.rstrip().endswith(("...", "\u2026")) for line in lines) / len(lines)
            if fraction > self.max_ellipsis_line_fraction:
                return _fail("ellipsis_lines", f"{fraction:.3f} > {self.max_ellipsis_line_fraction}")
        if lines and self.max_bullet_line_fraction is not None:
            fraction = sum(line.lstrip().startswith(BULLETS) for line in lines) / len(lines)
            if fraction > self.max_bullet_line_fraction:
                return _fail("bullet_lines", f"{fraction:.3f} > {self.max_bullet_line_fraction}")
        if self.min_alpha_word_fraction is not None:
            fraction = sum(any(c.isalpha() for c in w) for w in words) / len(words)
            if fraction < self.min_alpha_word_fraction:
                return _fail("alpha_words", f"{fraction:.3f} < {self.min_alpha_word_fraction}")
        if self.min_stop_words is not None:
            found = sum(w.lower() in STOP_WORDS for w in words)
            if found < self.min_stop_words:
                return _fail("stop_words", f"{found} < {self.min_stop_words}")
        return True


def _duplicate_fraction(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of characters in them)."""
    seen: set[str] = set()
    repeated = repeated_chars = 0
    for item in items:
        if item in seen:
            repeated += 1
            repeated_chars += len(item)
        seen.add(item)
    total_chars = sum(len(item) for item in items) or 1
    return repeated / max(1, len(items)), repeated_chars / total_chars


class RepetitionFilter(Filter):
    """Repeated lines, paragraphs and n-grams (Gopher's repetition removal, Table A1)."""

    name = "repetition"

    def __init__(  # the documented defaults live in pipelines.data.config.RepetitionStep
        self,
        *,
        max_duplicate_line_fraction: float | None,
        max_duplicate_line_char_fraction: float | None,
        max_duplicate_paragraph_fraction: float | None,
        max_duplicate_paragraph_char_fraction: float | None,
        max_top_ngram_char_fraction: dict[int, float],
        max_duplicate_ngram_char_fraction: dict[int, float],
    ):
        self.line_limits = (max_duplicate_line_fraction, max_duplicate_line_char_fraction)
        self.paragraph_limits = (max_duplicate_paragraph_fraction, max_duplicate_paragraph_char_fraction)
        self.top_ngram = max_top_ngram_char_fraction
        self.duplicate_ngram = max_duplicate_ngram_char_fraction

    def _check_units(self, code: str, units: list[str], limits: tuple[float | None, float | None]) -> Verdict:
        share, char_share = _duplicate_fraction(units)
        if limits[0] is not None and share > limits[0]:
            return _fail(f"duplicate_{code}s", f"{share:.3f} of {code}s > {limits[0]}")
        if limits[1] is not None and char_share > limits[1]:
            return _fail(f"duplicate_{code}_chars", f"{char_share:.3f} of chars > {limits[1]}")
        return True

    def keep(self, row: dict[str, Any]) -> Verdict:
        return self.keep_batch([row])[0]

    def keep_batch(self, rows: list[dict[str, Any]]) -> list[Verdict]:
        """Lines and paragraphs a document at a time; the n-gram checks for the whole batch at once."""
        verdicts: list[Verdict] = []
        words_of: dict[int, list[str]] = {}
        for index, row in enumerate(rows):
            text = row["text"]
            verdict: Verdict = True
            for code, units, limits in (
                ("paragraph", [p for p in _PARAGRAPHS.split(text) if p.strip()], self.paragraph_limits),
                ("line", [line for line in text.split("\n") if line.strip()], self.line_limits),
            ):
                verdict = self._check_units(code, units, limits)
                if verdict is not True:
                    break
            verdicts.append(verdict)
            if verdict is True:
                words = [w.lower() for w in _words(text)]
                if words:
                    words_of[index] = words
        indices = list(words_of)
        # A few hundred documents at a time: larger arrays fall out of the CPU's caches and run slower.
        for chunk in range(0, len(indices), self.NGRAM_CHUNK):
            part = indices[chunk : chunk + self.NGRAM_CHUNK]
            for doc, reason in self._ngram_failures([words_of[i] for i in part]).items():
                verdicts[part[doc]] = (False, reason)
        return verdicts

    NGRAM_CHUNK = 128

    def _ngram_failures(self, documents: list[list[str]]) -> dict[int, str]:
        """Document index -> reason, for the documents that fail an n-gram check (the first that fails)."""
        grams = NGrams(documents)
        failed: dict[int, str] = {}
        for n, limit in sorted(self.top_ngram.items()):
            count, chars = grams.most_common(n)
            share = count * chars / grams.total_chars
            for doc in np.flatnonzero((count > 1) & (share > limit)):
                failed.setdefault(int(doc), f"top_{n}gram ({share[doc]:.3f} of chars > {limit})")
        for n, limit in sorted(self.duplicate_ngram.items()):
            share = grams.duplicate_chars(n) / grams.total_chars
            for doc in np.flatnonzero(share > limit):
                failed.setdefault(int(doc), f"duplicate_{n}grams ({share[doc]:.3f} of chars > {limit})")
        return failed


class NGrams:
    """The word n-grams of a batch of documents as dense integer labels, for Gopher's n-gram checks.

    The documents' words are laid end to end. Level 1 labels (document, word); level n labels the
    pair (level n-1 label at i, word i+n-1) by ``np.unique``: exact (no hash collisions), and never
    across two documents because every label carries its document. So the checks for n = 2..10 cost
    one ``np.unique`` a level for the whole batch: one a level per document, and before that a
    Python tuple per position, made the repetition filter the costliest step of a large run.
    Every per-document figure comes back as an array indexed by document.
    """

    def __init__(self, documents: list[list[str]]):
        import pyarrow as pa
        import pyarrow.compute as pc

        lengths = np.fromiter((len(words) for words in documents), np.int64, len(documents))
        array = pa.array([word for words in documents for word in words], pa.string())
        encoded = array.dictionary_encode()
        self.documents = len(documents)
        self.doc = np.repeat(np.arange(self.documents, dtype=np.int64), lengths)
        self.vocabulary = max(1, len(encoded.dictionary))
        self.words = encoded.indices.to_numpy().astype(np.int64)
        self.word_chars = pc.utf8_length(array).to_numpy().astype(np.int64)
        self.chars_before = np.concatenate(([0], np.cumsum(self.word_chars)))  # chars of words [0, i)
        totals = np.bincount(self.doc, weights=self.word_chars, minlength=self.documents).astype(np.int64)
        self.total_chars = np.maximum(totals, 1)
        ends = np.cumsum(lengths)
        #: Words from each position to its document's end.
        self.remaining = np.repeat(ends, lengths) - np.arange(len(self.words))
        self.levels: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}

    def level(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(starts of the n-grams, label of each, first start of each label, occurrences of each label)."""
        if n not in self.levels:
            starts = np.flatnonzero(self.remaining >= n)
            if n == 1:
                codes = self.doc * self.vocabulary + self.words
            else:
                # Every n-gram start is an (n-1)-gram start: its label there, then the next word.
                codes = self._labels_at(n - 1)[starts] * self.vocabulary + self.words[starts + n - 1]
            _, first, labels, counts = np.unique(codes, return_index=True, return_inverse=True, return_counts=True)
            self.levels[n] = (starts, labels.reshape(-1), starts[first], counts)
        return self.levels[n]

    def _labels_at(self, n: int) -> np.ndarray:
        """Level n's labels by word position (-1 where no n-gram starts)."""
        starts, labels, _, _ = self.level(n)
        by_position = np.full(len(self.words), -1, np.int64)
        by_position[starts] = labels
        return by_position

    def most_common(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Per document, (occurrences, characters) of its most frequent n-gram; on a tie the one seen
        first; (0, 0) for a document shorter than n words."""
        count = np.zeros(self.documents, np.int64)
        chars = np.zeros(self.documents, np.int64)
        starts, labels, _, counts = self.level(n)
        if not len(starts):
            return count, chars
        occurrences = counts[labels]
        doc = self.doc[starts]
        np.maximum.at(count, doc, occurrences)
        # The first start (in order) of a label with the top count is the top label's first start.
        top = np.flatnonzero(occurrences == count[doc])
        first_doc, first = np.unique(doc[top], return_index=True)
        start = starts[top[first]]
        chars[first_doc] = self.chars_before[start + n] - self.chars_before[start]
        return count, chars

    def duplicate_chars(self, n: int) -> np.ndarray:
        """Per document, characters of words covered by an n-gram that occurred before (each word once)."""
        starts, labels, first, _ = self.level(n)
        repeats = starts[first[labels] < starts]
        depth = np.zeros(len(self.words) + 1, np.int64)
        np.add.at(depth, repeats, 1)
        np.add.at(depth, repeats + n, -1)  # n-grams end inside their document
        covered = np.cumsum(depth[:-1]) > 0
        return np.bincount(self.doc[covered], weights=self.word_chars[covered], minlength=self.documents).astype(
            np.int64
        )


class BlocklistFilter(Filter):
    """Documents containing more than ``max_matches`` blocklisted words (whole words, any case)."""

    name = "blocklist"

    def __init__(self, words: list[str], max_matches: int = 0):
        self.max_matches = max_matches
        alternatives = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
        self.pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE) if words else None

    def keep(self, row: dict[str, Any]) -> Verdict:
        if self.pattern is None:
            return True
        hits = self.pattern.findall(row["text"])
        if len(hits) > self.max_matches:
            shown = ", ".join(sorted({h.lower() for h in hits})[:5])
            return _fail("blocklisted_words", f"{len(hits)} > {self.max_matches}: {shown}")
        return True


def _script(char: str) -> str:
    """The script of a letter, from its Unicode name ("LATIN SMALL LETTER A" -> "latin")."""
    try:
        return unicodedata.name(char).split(" ", 1)[0].lower()
    except ValueError:
        return "unknown"


class CharsetFilter(Filter):
    """Charset and script check: few control/replacement characters, letters mostly of the allowed scripts.

    A script check, not a language identifier: it tells Latin text from Cyrillic or CJK,
    not English from French.
    """

    name = "charset"

    # The documented defaults live in pipelines.data.config.CharsetStep.
    def __init__(self, *, scripts: list[str], min_script_fraction: float, max_bad_char_fraction: float):
        self.scripts = {s.lower() for s in scripts}
        self.min_script_fraction = min_script_fraction
        self.max_bad_char_fraction = max_bad_char_fraction

    def keep(self, row: dict[str, Any]) -> Verdict:
        text = row["text"]
        if not text:
            return _fail("empty", "0 chars")
        if text.isascii():
            # The same verdict without a Python step per character (most of a code or English corpus):
            # ASCII has no replacement, surrogate or private-use character, and its letters are Latin.
            bad = len(_ASCII_CONTROL.findall(text))
            if bad / len(text) > self.max_bad_char_fraction:
                return _fail(
                    "bad_chars", f"{bad / len(text):.3f} control/replacement chars > {self.max_bad_char_fraction}"
                )
            has_letters = any(c.isalpha() for c in text)
            if not has_letters or "latin" in self.scripts or self.min_script_fraction <= 0:
                return True
            return _fail("script", f"0.000 of letters in {sorted(self.scripts)} < {self.min_script_fraction}")
        bad = sum(c == "\ufffd" or (unicodedata.category(c) in ("Cc", "Cs", "Co") and c not in "\n\t\r") for c in text)
        if bad / len(text) > self.max_bad_char_fraction:
            return _fail("bad_chars", f"{bad / len(text):.3f} control/replacement chars > {self.max_bad_char_fraction}")
        # ASCII letters are Latin: only the rest need a Unicode name lookup.
        letters = [c for c in text if c.isalpha()]
        if not letters:
            return True
        allowed = sum(
            c.isascii() and "latin" in self.scripts or (not c.isascii() and _script(c) in self.scripts) for c in letters
        )
        fraction = allowed / len(letters)
        if fraction < self.min_script_fraction:
            return _fail("script", f"{fraction:.3f} of letters in {sorted(self.scripts)} < {self.min_script_fraction}")
        return True
