"""The one place JSON the tool reads is parsed: a policy, a space file, a manifest, metrics, a finished
record, run.json. Whatever the bytes hold, the caller gets a value or one `UserError` line.

Decisions: `json.loads` raises `ValueError` (not `JSONDecodeError`) for an integer of more than 4,300 digits
and `RecursionError` for deep nesting, and it accepts `NaN`/`Infinity`, which are not JSON: all three are
refused here, as is a float literal past a float's range (`1e400`, which Python reads as inf), so no loader lets
them escape as a traceback or a non-finite number. `finite_json` makes what the tool writes readable by it.
"""

from __future__ import annotations

import json
import math
from typing import Any

from orchestrator.errors import UserError

MAX_DEPTH = 64  # deeper nesting than any document this tool writes


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    """A JSON number with a fraction or exponent, refused when it overflows a float (1e400 reads as inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is past a float's range")
    return value


def _depth(data: str) -> int:
    """The deepest nesting of arrays/objects in `data`, outside strings (cheap, before the parser recurses)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in data:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def parse_json(data: bytes | str, what: str, *, error: type[UserError] = UserError) -> Any:
    """`data` parsed as strict JSON; `what` names the document in the one-line error ("policy file x.json"),
    raised as `error` (a UserError kind: PolicyError, CheckpointError...)."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        if _depth(text) > MAX_DEPTH:
            raise ValueError(f"nested too deeply (more than {MAX_DEPTH} levels)")
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{what} is not valid JSON: {str(exc)[:200]}") from None


def finite_json(doc: Any) -> Any:
    """`doc` with every non-finite float (NaN, ±inf) replaced by None: what this tool writes, `parse_json` reads."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {key: finite_json(value) for key, value in doc.items()}
    if isinstance(doc, list | tuple):
        return [finite_json(value) for value in doc]
    return doc
