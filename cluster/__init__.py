"""How Loom work reaches a Ray cluster: CLI, connection, job submission."""
