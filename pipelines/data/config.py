"""The ``data`` section of a recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipelines.schema import StrictModel


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

    @model_validator(mode="after")
    def _path_needed(self) -> SourceConfig:
        if self.format != "stdlib" and not self.path:
            raise ValueError(f"format '{self.format}' needs a 'path'")
        return self


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
    min_document_chars: int = Field(
        default=32, ge=1, description="Documents shorter than this after normalisation are dropped."
    )
    vocab_size: int = Field(
        default=4096, ge=300, le=1_000_000, description="BPE vocabulary size, special tokens included."
    )
    tokenizer_path: str | None = Field(
        default=None,
        description="Local directory of an existing Hugging Face tokenizer to use instead of training one.",
    )
    seq_len: int = Field(default=128, ge=8, description="Tokens per packed training sequence.")
    val_fraction: float = Field(
        default=0.05, ge=0.0, lt=0.5, description="Share of packed sequences held out for evaluation."
    )
    rows_per_shard: int = Field(default=2048, ge=1, description="Packed sequences per parquet shard (at least).")
    tokenize_actors: int = Field(
        default=2, ge=1, description="Actors in the tokenizer pool (each loads the tokenizer once)."
    )
    batch_size: int = Field(default=128, ge=1, description="Documents per Ray Data batch for tokenize and pack.")
