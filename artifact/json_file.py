"""Read a JSON file a user can hand us (a resume state, a token cache's record, a rank folder's files) as one
UserError on anything wrong with its bytes: unreadable, not UTF-8, not JSON, nested deeper than Python's parser
recurses, or not the JSON object the reader expects. Each message names the file and ends with what to do.

Field checks stay with each reader; this only turns the ways `json.loads(path.read_text())` fails into one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsv3c.errors import UserError


def read_json(path: Path, fix: str) -> Any:
    """The parsed contents of `path`; UserError "PATH: what is wrong; FIX" when it cannot be parsed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: missing; {fix}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e}); {fix}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); {fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); {fix}") from None
    except RecursionError:  # arrays or objects nested thousands deep
        raise UserError(f"{path}: not valid JSON (nested too deep); {fix}") from None


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """`read_json` for a file that must hold one JSON object (what every dsv3c record is)."""
    raw = read_json(path, fix)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object, got {_kind(raw)}; {fix}")
    return raw


def _kind(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
