"""Export-safe primitives in plain torch. This package knows no method and no model."""

from staticprune.ops.tokens import restore_tokens

__all__ = ["restore_tokens"]
