"""The data stage: read, normalise, deduplicate, tokenize and pack text on Ray Data."""
