"""Local serving: an OpenAI-compatible HTTP API (`hetinfer serve`)."""
