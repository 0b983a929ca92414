"""The ``data`` section of a recipe."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipelines.data.utils import LOCAL_EDGES
from pipelines.schema import StrictModel, field_problems


class SourceConfig(StrictModel):
    format: Literal["stdlib", "jsonl", "parquet", "text"] = Field(
        description="'stdlib': the running Python's standard library (module sources and module "
        "docstrings); 'jsonl' / 'parquet': records with a text field; 'text': plain files."
    )
    path: str | None = Field(
        default=None,
        description="File, folder or glob of the source (local path or pyarrow URI). Not used by 'stdlib'.",
    )
    text_field: str = Field(default="text", description="Column holding the document text (jsonl, parquet).")
    text_unit: Literal["file", "line"] = Field(
        default="file", description="For 'text': one document per file or one per line."
    )
    name: str = Field(default="default", description="Name of the source, kept in every row as 'source'.")
    id_field: str | None = Field(
        default=None,
        description="jsonl / parquet: the record's own id, kept in every row (and reject) as 'source_id'. "
        "Unset: 'source_id' is the record's location (path, and line number or row index).",
    )
    metadata_fields: list[str] = Field(
        default_factory=list,
        description="jsonl / parquet: record fields kept with the document, as a JSON object in column "
        "'metadata', through every step, the rejects and the dedup decisions.",
    )

    @model_validator(mode="after")
    def _path_needed(self) -> SourceConfig:
        problems = []
        if self.format != "stdlib" and not self.path:
            problems.append(f"format '{self.format}' needs a 'path'")
        if self.format not in ("jsonl", "parquet") and (self.id_field or self.metadata_fields):
            problems.append(f"id_field and metadata_fields need records (jsonl or parquet), not '{self.format}'")
        if self.text_field in self.metadata_fields or (self.id_field and self.id_field == self.text_field):
            problems.append(f"the text field '{self.text_field}' cannot also be the id or a metadata field")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class NormalizeStep(StrictModel):
    type: Literal["normalize"] = Field(description="Unicode normal form, Unix newlines, trimmed whitespace.")
    form: Literal["NFC", "NFKC"] = Field(default="NFC", description="Unicode normalisation form.")

    def build(self):
        from pipelines.data.steps import Normalize

        return Normalize(self.form)


class LengthStep(StrictModel):
    type: Literal["length"] = Field(description="Drop documents outside a character / word range.")
    min_chars: int | None = Field(default=32, ge=0, description="Fewest characters (None: no bound).")
    max_chars: int | None = Field(default=1_000_000, ge=1, description="Most characters (None: no bound).")
    min_words: int | None = Field(default=None, ge=0, description="Fewest whitespace-separated words.")
    max_words: int | None = Field(default=None, ge=1, description="Most whitespace-separated words.")

    def build(self):
        from pipelines.data.filters import LengthFilter

        return LengthFilter(self.min_chars, self.max_chars, self.min_words, self.max_words)


class GopherQualityStep(StrictModel):
    type: Literal["gopher_quality"] = Field(description="Gopher word-shape heuristics (prose).")
    min_mean_word_length: float | None = Field(default=3, ge=0, description="Smallest mean word length.")
    max_mean_word_length: float | None = Field(default=10, gt=0, description="Largest mean word length.")
    max_symbol_word_ratio: float | None = Field(
        default=0.1, ge=0, description="Most '#' and ellipsis symbols per word."
    )
    max_ellipsis_line_fraction: float | None = Field(
        default=0.3, ge=0, le=1, description="Most lines ending in an ellipsis, as a share of lines."
    )
    max_bullet_line_fraction: float | None = Field(
        default=0.9, ge=0, le=1, description="Most lines starting with a bullet, as a share of lines."
    )
    min_alpha_word_fraction: float | None = Field(
        default=0.8, ge=0, le=1, description="Fewest words holding a letter, as a share of words."
    )
    min_stop_words: int | None = Field(
        default=2, ge=0, description="Fewest English stop words (the, be, to, of, and, that, have, with)."
    )

    def build(self):
        from pipelines.data.filters import GopherQualityFilter

        return GopherQualityFilter(**self.model_dump(exclude={"type"}))


class RepetitionStep(StrictModel):
    type: Literal["repetition"] = Field(description="Gopher repetition heuristics: lines, paragraphs, n-grams.")
    max_duplicate_line_fraction: float | None = Field(
        default=0.3, ge=0, le=1, description="Most repeated lines, as a share of non-blank lines."
    )
    max_duplicate_line_char_fraction: float | None = Field(
        default=0.2, ge=0, le=1, description="Most characters in repeated lines, as a share of characters."
    )
    max_duplicate_paragraph_fraction: float | None = Field(
        default=0.3, ge=0, le=1, description="Most repeated paragraphs, as a share of paragraphs."
    )
    max_duplicate_paragraph_char_fraction: float | None = Field(
        default=0.2, ge=0, le=1, description="Most characters in repeated paragraphs, as a share of characters."
    )
    max_top_ngram_char_fraction: dict[int, float] = Field(
        default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16},
        description="n -> most characters covered by the most frequent word n-gram.",
    )
    max_duplicate_ngram_char_fraction: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> most characters covered by repeated word n-grams.",
    )

    @model_validator(mode="after")
    def _ngram_limits(self) -> RepetitionStep:
        problems = [
            f"{field}: n must be at least 1 and its limit in [0, 1], got {n}: {limit}"
            for field in ("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction")
            for n, limit in getattr(self, field).items()
            if n < 1 or not 0 <= limit <= 1
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def build(self):
        from pipelines.data.filters import RepetitionFilter

        return RepetitionFilter(**self.model_dump(exclude={"type"}))


class BlocklistStep(StrictModel):
    type: Literal["blocklist"] = Field(description="Drop documents containing blocklisted words.")
    words: list[str] = Field(min_length=1, description="Words (or phrases) matched whole, in any case.")
    max_matches: int = Field(default=0, ge=0, description="Matches a document may hold and still be kept.")

    def build(self):
        from pipelines.data.filters import BlocklistFilter

        return BlocklistFilter(self.words, self.max_matches)


class CharsetStep(StrictModel):
    type: Literal["charset"] = Field(description="Charset and script check (not a language identifier).")
    scripts: list[str] = Field(
        default_factory=lambda: ["latin"],
        min_length=1,
        description="Unicode scripts letters may come from (first word of the character name: latin, cyrillic, cjk...).",
    )
    min_script_fraction: float = Field(
        default=0.9, ge=0, le=1, description="Fewest letters of the allowed scripts, as a share of letters."
    )
    max_bad_char_fraction: float = Field(
        default=0.01, ge=0, le=1, description="Most control / replacement characters, as a share of characters."
    )

    def build(self):
        from pipelines.data.filters import CharsetFilter

        return CharsetFilter(**self.model_dump(exclude={"type"}))


LocalComponentsEdges = Annotated[
    int,
    Field(
        ge=0,
        description="Candidate graphs with at most this many edges (16 bytes each) get their connected components "
        "in one process; larger ones are shrunk by distributed large-star/small-star rounds first. 0: all distributed.",
    ),
]


class ExactDedupStep(StrictModel):
    type: Literal["exact_dedup"] = Field(description="Keep one document per normalised content hash.")
    num_partitions: int = Field(default=8, ge=1, description="Hash partitions of the dedup shuffle.")

    def build(self):
        from pipelines.data.dedup import ExactDedup

        return ExactDedup(self.num_partitions)


class MinHashDedupStep(StrictModel):
    type: Literal["minhash_dedup"] = Field(description="Near-duplicate removal with MinHash LSH.")
    threshold: float = Field(
        default=0.8, gt=0, lt=1, description="Jaccard similarity of word n-gram sets that counts as duplicate."
    )
    num_perm: int = Field(default=128, ge=16, le=1024, description="MinHash permutations (signature length).")
    ngram: int = Field(default=5, ge=1, le=32, description="Words per shingle.")
    seed: int = Field(default=1, ge=0, description="Seed of the permutations.")
    false_positive_weight: float = Field(
        default=0.05, gt=0, lt=1,
        description="Weight of false positives against false negatives (1 - this) when choosing bands and rows. "
        "Low by default, so the bands favour recall at the threshold (0.05 at 0.8 and 128 permutations: 16 bands "
        "of 8 rows: a pair at exactly the threshold becomes a candidate with probability 0.95, where 0.5 chose 9 "
        "bands of 13 rows and 0.40, missing near-duplicates just above it); `verify` drops the extra false candidates.",
    )  # fmt: skip
    verify: bool = Field(
        default=True,
        description="Check every candidate pair's true Jaccard similarity (over its shingle sets) before merging "
        "it, so candidates below the threshold never join a cluster. On by default: it is what keeps precision "
        "with recall-leaning bands (measured: docs/results/dedup_defaults.json).",
    )
    num_partitions: int = Field(default=8, ge=1, description="Hash partitions of each shuffle (buckets, components).")
    local_components_edges: LocalComponentsEdges = LOCAL_EDGES

    def build(self):
        from pipelines.data.dedup import MinHashDedup

        return MinHashDedup(**self.model_dump(exclude={"type"}))


class PerplexityStep(StrictModel):
    type: Literal["perplexity"] = Field(description="Drop documents a reference language model finds too surprising.")
    model_path: str = Field(
        description="Local Hugging Face causal LM directory (e.g. an earlier run's train/model) used as reference."
    )
    max_perplexity: float | None = Field(default=None, gt=0, description="Absolute threshold.")
    max_relative_to_median: float | None = Field(
        default=None, gt=0, description="Threshold as a multiple of the corpus median, e.g. 1.2."
    )
    max_percentile: float | None = Field(
        default=None, gt=0, lt=100, description="Threshold as a percentile of the corpus, e.g. 90 drops the top 10%."
    )
    max_tokens: int = Field(default=512, ge=2, description="Tokens of each document scored (its beginning).")
    actors: int = Field(default=1, ge=1, description="Scoring actors, each holding the model once.")
    batch_size: int = Field(default=16, ge=1, description="Documents per scoring batch.")

    @model_validator(mode="after")
    def _one_rule(self) -> PerplexityStep:
        rules = [self.max_perplexity, self.max_relative_to_median, self.max_percentile]
        if sum(rule is not None for rule in rules) != 1:
            raise ValueError("set exactly one of max_perplexity, max_relative_to_median, max_percentile")
        return self

    def build(self):
        from pipelines.data.perplexity import PerplexityFilter

        return PerplexityFilter(**self.model_dump(exclude={"type"}))


class QualityClassifierStep(StrictModel):
    type: Literal["quality_classifier"] = Field(
        description="A learned quality filter: a linear classifier over hashed word n-grams (fastText-style), trained "
        "on documents of named reference sources (positives) against a named junk source and/or the rejects of named "
        "earlier steps (negatives), then scoring every kept document in an actor pool; low scores are dropped."
    )
    positive_sources: list[str] = Field(
        min_length=1, description="Source names whose kept documents are the positives (the reference of quality)."
    )
    negative_sources: list[str] = Field(
        default_factory=list, description="Source names whose kept documents are negatives (a junk source)."
    )
    negatives_from_steps: list[str] = Field(
        default_factory=list,
        description="Names of earlier steps (e.g. gopher_quality, repetition) whose rejects are negatives too: the "
        "heuristics' rejects teach the classifier what they catch, and it generalises to what they miss.",
    )
    threshold: float | None = Field(
        default=None, gt=0, lt=1, description="Drop kept documents whose score (probability of quality) is below this."
    )
    keep_fraction: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Keep this share of the scored documents, the highest-scoring (approximate quantile across the "
        "cluster); instead of threshold.",
    )
    word_ngrams: int = Field(default=2, ge=1, le=5, description="Word n-grams hashed as features: 1 to this n.")
    hash_bits: int = Field(default=18, ge=10, le=24, description="Hashed feature space of 2**hash_bits dimensions.")
    regularization: float = Field(
        default=1.0, gt=0, description="Inverse regularization strength C of the logistic regression."
    )
    max_train_documents: int = Field(
        default=20_000,
        ge=2,
        description="Most training documents per class, the same ones on every run (smallest hash of doc_id).",
    )
    holdout_fraction: float = Field(
        default=0.2, ge=0, lt=1, description="Share of the labelled documents held out to report precision and recall."
    )
    max_chars: int = Field(
        default=10_000, ge=100, description="Characters of each document featurized (its beginning)."
    )
    actors: int = Field(default=1, ge=1, description="Scoring actors, each holding the model once.")
    batch_size: int = Field(default=256, ge=1, description="Documents per scoring batch.")

    @model_validator(mode="after")
    def _labels_and_rule(self) -> QualityClassifierStep:
        problems = []
        if (self.threshold is None) == (self.keep_fraction is None):
            problems.append(("threshold", "set exactly one of threshold, keep_fraction"))
        if not self.negative_sources and not self.negatives_from_steps:
            problems.append(("negative_sources", "name negatives: negative_sources and/or negatives_from_steps"))
        both = sorted(set(self.positive_sources) & set(self.negative_sources))
        if both:
            problems.append(("negative_sources", f"sources cannot be positives and negatives: {', '.join(both)}"))
        if "quality_classifier" in self.negatives_from_steps:
            problems.append(("negatives_from_steps", "a quality_classifier's rejects cannot teach another one"))
        if problems:
            raise field_problems(problems)
        return self

    def build(self):
        from pipelines.data.quality import QualityClassifier

        return QualityClassifier(**self.model_dump(exclude={"type"}))


class SimHashDedupStep(StrictModel):
    type: Literal["simhash_dedup"] = Field(description="Near-duplicate removal with 64-bit SimHash fingerprints.")
    max_hamming: int = Field(
        default=6, ge=1, le=15, description="Most differing fingerprint bits between near-duplicates."
    )
    ngram: int = Field(default=3, ge=1, le=32, description="Words per shingle (feature).")
    num_partitions: int = Field(default=8, ge=1, description="Hash partitions of each shuffle (buckets, components).")
    local_components_edges: LocalComponentsEdges = LOCAL_EDGES

    def build(self):
        from pipelines.data.dedup import SimHashDedup

        return SimHashDedup(**self.model_dump(exclude={"type"}))


StepConfig = Annotated[
    NormalizeStep | LengthStep | GopherQualityStep | RepetitionStep | BlocklistStep | CharsetStep
    | PerplexityStep | QualityClassifierStep | ExactDedupStep | MinHashDedupStep | SimHashDedupStep,
    Field(discriminator="type"),
]  # fmt: skip


def default_steps() -> list:
    return [
        NormalizeStep(type="normalize"),
        LengthStep(type="length"),
        ExactDedupStep(type="exact_dedup"),
        MinHashDedupStep(type="minhash_dedup"),
    ]


class DataConfig(StrictModel):
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(format="stdlib", name="stdlib")],
        min_length=1,
        description="Where the raw text comes from. Default: the Python standard library.",
    )
    max_documents: int | None = Field(
        default=None,
        ge=1,
        description="Read at most this many raw documents from each source (the stdlib: first files by path); unset: all.",
    )
    steps: list[StepConfig] = Field(
        default_factory=default_steps,
        description="Curation steps in order, each chosen by 'type': normalize, length, gopher_quality, "
        "repetition, blocklist, charset, perplexity, quality_classifier, exact_dedup, minhash_dedup, simhash_dedup.",
    )
    vocab_size: int = Field(
        default=4096, ge=300, le=1_000_000, description="BPE vocabulary size, special tokens included."
    )
    tokenizer_path: str | None = Field(
        default=None,
        description="Local directory of an existing Hugging Face tokenizer to use instead of training one.",
    )
    tokenizer_train_chars: int = Field(
        default=200_000_000,
        ge=1_000,
        description="Train the BPE on at most about this many characters of the kept text: a sample of "
        "the documents (by doc_id hash, so the same for any block layout) when there is more. BPE merges "
        "settle long before a corpus of gigabytes is read, and training reads every character.",
    )
    seq_len: int = Field(default=128, ge=8, description="Tokens per packed training sequence.")
    val_fraction: float = Field(
        default=0.05, ge=0.0, lt=0.5, description="Share of packed sequences held out for evaluation."
    )
    heldout_documents: int = Field(
        default=32,
        ge=0,
        description="Documents per source kept out of tokenizer training and training, for the eval stage's "
        "tasks (those with the smallest hash of seed and doc_id; at most a tenth of a source), written to "
        "heldout/; 0: none.",
    )
    rows_per_shard: int = Field(default=2048, ge=1, description="Packed sequences per parquet shard (at least).")
    mix: dict[str, float] | None = Field(
        default=None,
        description="Token share per source name, e.g. {code: 0.6, prose: 0.4} (normalised to sum 1). "
        "Sources are downsampled by document to match; unset: every curated document is kept.",
    )
    tokenize_actors: int = Field(
        default=2, ge=1, description="Actors in the tokenizer pool (each loads the tokenizer once)."
    )
    batch_size: int = Field(default=128, ge=1, description="Documents per Ray Data batch for tokenize and pack.")
    shuffle: Literal["default", "sort"] = Field(
        default="default",
        description="How Ray Data shuffles for the data stage's group-bys and sorts: 'default' leaves Ray's choice "
        "(SHUFFLE_V2, which starts aggregator actors for every group-by, or RAY_DATA_DEFAULT_SHUFFLE_STRATEGY); "
        "'sort' (SORT_SHUFFLE_PULL_BASED) runs them as tasks on the pooled workers (group-bys on uint64 hashes keep "
        "the hash shuffle). The output is the same either way; on a small corpus and few cores 'sort' skips "
        "seconds of actor start-up per group-by.",
    )

    @model_validator(mode="after")
    def _mix_names_sources(self) -> DataConfig:
        if self.mix is None:
            return self
        names = [source.name for source in self.sources]
        problems = [
            f"mix names unknown source '{name}' (sources: {', '.join(names)})" for name in self.mix if name not in names
        ]
        problems += [f"mix weight of '{name}' must be >= 0 (got {w})" for name, w in self.mix.items() if w < 0]
        if not problems and sum(self.mix.values()) <= 0:
            problems.append("mix weights must not all be zero")
        if len(set(names)) != len(names):
            problems.append(f"mix needs distinct source names (got {names})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _classifier_labels_exist(self) -> DataConfig:
        """Every quality_classifier names sources of this recipe and steps that come before it."""
        names = [source.name for source in self.sources]
        problems = []
        for index, step in enumerate(self.steps):
            if not isinstance(step, QualityClassifierStep):
                continue
            for field in ("positive_sources", "negative_sources"):
                unknown = [name for name in getattr(step, field) if name not in names]
                if unknown:
                    problems.append(
                        (
                            f"steps.{index}.{field}",
                            f"unknown source(s) {', '.join(unknown)} (sources: {', '.join(names)})",
                        )
                    )
            earlier = [s.type for s in self.steps[:index]]
            missing = [name for name in step.negatives_from_steps if name not in earlier]
            if missing:
                problems.append(
                    (
                        f"steps.{index}.negatives_from_steps",
                        f"{', '.join(missing)} not among the earlier steps ({', '.join(earlier) or 'none'})",
                    )
                )
        if problems:
            raise field_problems(problems)
        return self
