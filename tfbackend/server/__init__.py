"""OpenAI-compatible HTTP server: ``tfbackend serve`` (see tfbackend.entrypoints.serve)."""
