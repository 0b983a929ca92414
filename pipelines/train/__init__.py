"""The training stage: DeepSpeed inside Ray Train workers."""
