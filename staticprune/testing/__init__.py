"""Generated data and hand-set models for tests and documented examples (no downloads, deterministic)."""
