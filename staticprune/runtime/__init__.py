"""Running exported graphs and engines: ONNX Runtime sessions, TensorRT engines, and the capacity-bucket
dispatcher. Imports neither torch nor onnx, so that it runs on the Jetson image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def usage_error(message: str) -> Exception:
    """staticprune.cli.UsageError (one line, exit 2); the CLI module imports only the standard library at module
    level, so this keeps the runtime free of torch and onnx."""
    from staticprune.cli import UsageError

    return UsageError(message)


def read_json(path: Path, what: str) -> Any:
    """The parsed JSON file, or a usage error naming `what` ('sidecar X', 'X') when it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise usage_error(f"{what} is not a readable JSON file ({exc.__class__.__name__})") from None
