"""JSON that ``statecast publish`` is given (an argument, or ``--ndjson`` lines):
decoded, or refused with a message that says what is wrong with it.

msgspec's own message for a lone surrogate escape (``"\\ud800"``, which JSON can
write but no text holds) is "Input data was truncated" or "invalid utf-16 surrogate
pair", neither of which points at the escape; so it is looked for and named.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

__all__ = ["BadJSON", "decode", "lone_surrogate"]

# A backslash escape; ``\\\\`` is matched whole, so the escapes are found in order.
_ESCAPE = re.compile(rb"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)


class BadJSON(ValueError):
    """What is wrong with the JSON (without saying where it came from)."""


def lone_surrogate(raw: bytes) -> str | None:
    """The first ``\\uXXXX`` escape in ``raw`` that is half of a UTF-16 surrogate pair
    without the other half, as written; ``None`` if there is none."""
    high: re.Match[bytes] | None = None  # a high half that waits for its low half
    for m in _ESCAPE.finditer(raw):
        digits = m.group(1)
        code = None if digits is None else int(digits, 16)
        if high is not None:
            if code is not None and 0xDC00 <= code <= 0xDFFF and m.start() == high.end():
                high = None
                continue
            return high.group().decode()
        if code is not None and 0xD800 <= code <= 0xDBFF:
            high = m
        elif code is not None and 0xDC00 <= code <= 0xDFFF:
            return m.group().decode()
    return None if high is None else high.group().decode()


def decode(raw: bytes | str, decoder: msgspec.json.Decoder[Any], what: str) -> Any:
    """``raw`` decoded; :class:`BadJSON` if it is empty or not ``what`` (``"valid
    JSON"``, ``"a JSON object"``), is nested too deeply, is not UTF-8, or holds a lone
    surrogate escape."""
    try:
        data = raw if isinstance(raw, bytes) else raw.encode()
    except UnicodeEncodeError:  # an argument's bytes that are not UTF-8 (surrogateescape)
        raise BadJSON("not UTF-8 text") from None
    if not data.strip():
        raise BadJSON("empty: no JSON value")
    try:
        return decoder.decode(data)
    except UnicodeDecodeError:
        raise BadJSON("not UTF-8 text") from None
    except RecursionError:
        raise BadJSON("nested too deeply (at most 64 levels)") from None
    except msgspec.MsgspecError as exc:
        escape = lone_surrogate(data)
        if escape is not None:
            raise BadJSON(f"{escape} is a lone surrogate escape: not valid Unicode text") from None
        if isinstance(exc, msgspec.ValidationError) and not str(exc).startswith("Expected"):
            raise BadJSON(str(exc)) from None  # "Number out of range - at `$.value`"
        if isinstance(exc, msgspec.ValidationError):
            raise BadJSON(f"not {what}: {exc}") from None  # "Expected `object`, got `null`"
        raise BadJSON(f"not valid JSON: {exc}") from None
