"""Architecture of the Llama models Loom trains from scratch."""

from __future__ import annotations

from pydantic import Field, model_validator

from pipelines.schema import StrictModel


class ModelConfig(StrictModel):
    hidden_size: int = Field(default=64, ge=8, description="Width of the residual stream.")
    num_layers: int = Field(default=2, ge=1, description="Decoder layers.")
    # Head size 64 / 2 = 32: the smallest vLLM's CPU attention serves.
    num_heads: int = Field(default=2, ge=1, description="Attention heads.")
    num_kv_heads: int = Field(
        default=2, ge=1, description="Key/value heads (grouped-query attention when fewer than num_heads)."
    )
    intermediate_size: int = Field(default=256, ge=8, description="Width of the MLP.")
    max_position_embeddings: int = Field(default=256, ge=8, description="Longest context the model supports.")
    tie_embeddings: bool = Field(default=True, description="Share input and output embeddings.")

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        elif (self.hidden_size // self.num_heads) % 2:
            problems.append("hidden_size / num_heads must be even (rotary embeddings)")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if problems:
            raise ValueError("; ".join(problems))
        return self
