"""Each rule filter drops exactly the planted bad documents, with the right reason."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.data.config import CharsetStep, GopherQualityStep, RepetitionStep
from pipelines.data.filters import BlocklistFilter, LengthFilter
from pipelines.data.steps import reason_key
from tests.helpers import document_table

PROSE = [
    "The committee met on Tuesday to review the budget and the plans that have been made for the new library. "
    "Members agreed that the work should begin with the roof, and that the windows can wait until spring.",
    "A river runs through the valley and the farmers who live there have built small bridges of stone and wood. "
    "In summer the children swim in the shallow pools, and in winter the water freezes at the edges.",
    "Good software is written to be read by people first and by machines second. That is why the names of "
    "functions matter, and why a short comment that explains the reason behind a choice is worth having.",
]


def run(step, planted: dict[str, str]) -> dict[str, str | None]:
    """Apply a filter to the prose documents plus planted ones; map every document to its reason."""
    names = [f"good{i}" for i in range(len(PROSE))] + list(planted)
    texts = PROSE + list(planted.values())
    table = document_table(texts, names)
    out = step._batch(table)
    return dict(zip(out.column("doc_id").to_pylist(), out.column("reject_reason").to_pylist(), strict=True))


def dropped(result: dict[str, str | None]) -> dict[str, str]:
    return {name: reason_key(reason) for name, reason in result.items() if reason is not None}


def test_length_filter_drops_short_long_and_wordy_documents():
    result = run(
        LengthFilter(min_chars=20, max_chars=400, min_words=5, max_words=60),
        {
            "short": "tiny text",
            "long": "x" * 401,
            "few_words": "supercalifragilistic expialidocious",
            "many_words": "word " * 61,
        },
    )
    assert dropped(result) == {
        "short": "length: too_short",
        "long": "length: too_long",
        "few_words": "length: too_few_words",
        "many_words": "length: too_many_words",
    }
    assert result["short"] == "length: too_short (9 chars < 20)"


def test_gopher_quality_drops_each_planted_violation():
    planted = {
        "short_words": "a b c d e f g h i j k l m n o p q r s t u v w x y z and the of to",
        "long_words": "the and " + " ".join(["incomprehensibilities"] * 30),
        "symbols": "the and of " + " ".join(["# heading"] * 20),
        "ellipsis": "\n".join(
            ["the story goes on and on for a long while and then..."] * 5 + ["the end of it all, and that is that"]
        ),
        "bullets": "\n".join(["- the item of the list and more"] * 10),
        "numbers": "the and " + " ".join(["12345 67890 3.1415"] * 20),
        "no_stop_words": "Quick brown foxes jump over lazy dogs while cats sleep quietly inside warm houses nearby today",
    }
    result = run(GopherQualityStep(type="gopher_quality").build(), planted)
    assert dropped(result) == {
        "short_words": "gopher_quality: mean_word_length",
        "long_words": "gopher_quality: mean_word_length",
        "symbols": "gopher_quality: symbol_word_ratio",
        "ellipsis": "gopher_quality: ellipsis_lines",
        "bullets": "gopher_quality: bullet_lines",
        "numbers": "gopher_quality: alpha_words",
        "no_stop_words": "gopher_quality: stop_words",
    }


def test_a_threshold_set_to_none_is_not_checked():
    result = run(
        GopherQualityStep(type="gopher_quality", min_stop_words=None).build(),
        {"no_stop_words": "Quick brown foxes jump over lazy dogs"},
    )
    assert dropped(result) == {}


def test_repetition_drops_repeated_lines_paragraphs_and_ngrams():
    planted = {
        "lines": "\n".join(["click here to subscribe now"] * 6 + ["a different line of text follows", "and one more"]),
        "paragraphs": "\n\n".join(["This paragraph appears again and again in the page."] * 4 + ["Unique ending."]),
        "top_ngram": " ".join(["buy cheap"] * 30) + " and the rest of the sentence is ordinary words here",
        "duplicate_ngrams": " ".join(
            ["one sentence of twenty distinct words that says very little about anything in particular here today"] * 2
        ),
    }
    result = run(
        RepetitionStep(
            type="repetition",
            max_duplicate_line_char_fraction=None,
            max_duplicate_paragraph_char_fraction=None,
            max_top_ngram_char_fraction={2: 0.2},
            max_duplicate_ngram_char_fraction={5: 0.15},
        ).build(),
        planted,
    )
    assert dropped(result) == {
        "lines": "repetition: duplicate_lines",
        "paragraphs": "repetition: duplicate_paragraphs",
        "top_ngram": "repetition: top_2gram",
        "duplicate_ngrams": "repetition: duplicate_5grams",
    }


def test_blocklist_matches_whole_words_in_any_case():
    result = run(
        BlocklistFilter(["casino", "free money"], max_matches=0),
        {"spam": "Win FREE MONEY at the Casino tonight", "substring": "the casinos of old are not matched"},
    )
    assert dropped(result) == {"spam": "blocklist: blocklisted_words"}
    assert "casino, free money" in result["spam"]


def test_charset_drops_other_scripts_and_control_characters():
    result = run(
        CharsetStep(type="charset", scripts=["latin"]).build(),
        {
            "cyrillic": "Съешь же ещё этих мягких французских булок, да выпей чаю",
            "control": "text with many \x00\x01\x02\x03 control \x04\x05 characters \ufffd\ufffd",
            "accents": "Café crème brûlée à la carte, naïve façade",
        },
    )
    assert dropped(result) == {"cyrillic": "charset: script", "control": "charset: bad_chars"}


def test_a_filter_keeps_the_first_reason_of_an_already_dropped_row():
    table = pa.table(
        {
            "doc_id": ["a"],
            "source": ["s"],
            "text": ["x"],
            "reject_reason": pa.array(["read: invalid utf-8"], pa.string()),
        }
    )
    assert LengthFilter(min_chars=5)._batch(table).column("reject_reason").to_pylist() == ["read: invalid utf-8"]


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_documents_are_dropped_not_crashing(text):
    assert dropped(run(GopherQualityStep(type="gopher_quality").build(), {"empty": text})) == {
        "empty": "gopher_quality: no_words"
    }


def _gopher_ngram_verdict(text: str, top: dict[int, float], duplicate: dict[int, float]) -> str | None:
    """The n-gram checks as first written, a Python tuple per position: the reference NGrams must match."""
    from collections import Counter

    words = [w.lower() for w in text.split()]
    total_chars = sum(len(w) for w in words) or 1
    for n, limit in sorted(top.items()):
        grams = Counter(zip(*(words[i:] for i in range(n)), strict=False))
        if not grams:
            continue
        gram, count = grams.most_common(1)[0]
        share = count * sum(len(w) for w in gram) / total_chars
        if count > 1 and share > limit:
            return f"top_{n}gram ({share:.3f} of chars > {limit})"
    for n, limit in sorted(duplicate.items()):
        seen, covered = set(), [False] * len(words)
        for i in range(len(words) - n + 1):
            gram = tuple(words[i : i + n])
            if gram in seen:
                covered[i : i + n] = [True] * n
            seen.add(gram)
        share = sum(len(w) for w, hit in zip(words, covered, strict=True) if hit) / total_chars
        if share > limit:
            return f"duplicate_{n}grams ({share:.3f} of chars > {limit})"
    return None


def test_the_repetition_ngram_checks_give_the_verdicts_of_the_tuple_per_position_reference():
    import random

    from tests.scale_corpus import ScaleCorpusSpec, document, plan

    step = RepetitionStep(
        type="repetition",
        max_duplicate_line_fraction=None,
        max_duplicate_line_char_fraction=None,
        max_duplicate_paragraph_fraction=None,
        max_duplicate_paragraph_char_fraction=None,
    )
    spec = ScaleCorpusSpec(documents=300, seed=5, pool_blocks=3000)
    layout = plan(spec)
    rng = random.Random(0)
    vocabulary = "the a of to in is it and or not Foo BAR baz x y z 1 2 == ( ) return self".split()
    texts = [document(spec, layout, i)["record"]["text"] for i in range(spec.documents)]
    for _ in range(700):  # short texts, few words: ties, repeats and n-grams near the document's length
        words = rng.choices(vocabulary[: rng.randint(2, len(vocabulary))], k=rng.randint(0, 60))
        texts.append(" ".join(words))
    outcomes = set()
    rng.shuffle(texts)
    together = step.build().keep_batch([{"text": text} for text in texts])  # as a Ray Data batch is judged
    for text, in_batch in zip(texts, together, strict=True):
        alone = step.build().keep({"text": text})
        expected = _gopher_ngram_verdict(text, step.max_top_ngram_char_fraction, step.max_duplicate_ngram_char_fraction)
        assert (None if alone is True else alone[1]) == expected, text[:200]
        assert in_batch == alone, text[:200]
        outcomes.add(expected.split(" ")[0] if expected else "kept")
    assert len(outcomes) >= 4, outcomes  # kept, and several different checks failing


def test_repetition_refuses_an_ngram_size_below_one_or_a_limit_outside_zero_to_one():
    with pytest.raises(ValueError) as refused:
        RepetitionStep(
            type="repetition", max_top_ngram_char_fraction={0: 0.2}, max_duplicate_ngram_char_fraction={5: 1.5}
        )
    assert "got 0: 0.2" in str(refused.value) and "got 5: 1.5" in str(refused.value)
