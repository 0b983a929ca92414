"""Serving: Ray Serve + vLLM behind one OpenAI-compatible endpoint."""
