"""Request-body field types shared by the native and the OpenAI routes, and validation errors made safe to
send back.

Why: a JSON string may hold a lone UTF-16 surrogate ("\\ud800") that no tokenizer can encode, JSON
numbers may be NaN/Infinity (Python's parser accepts them) or integers of hundreds of digits, and a
pydantic error echoes the offending input — which JSON cannot encode when it is NaN or a surrogate. Every
one of those was a 500; with these types and `safe_errors` they are 4xx that name the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import AfterValidator, Field

#: a prompt or text of at most this many characters (longer ones are refused before tokenizing)
MAX_PROMPT_CHARS = 1 << 20
#: the largest seed (a 63-bit non-negative integer, what `torch.Generator.manual_seed` takes)
MAX_SEED = 2**63 - 1


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"not valid Unicode text (lone surrogate at character {err.start})") from None
    return value


#: a string that is valid Unicode (no lone surrogates), at most MAX_PROMPT_CHARS long
Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_utf8)]
#: a finite float (JSON NaN / Infinity refused)
Finite = Annotated[float, Field(allow_inf_nan=False)]


def _safe(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")[:200]
    if isinstance(value, int) and not isinstance(value, bool):
        return value if abs(value) < 2**63 else f"<integer of {len(str(abs(value)))} digits>"
    return value if isinstance(value, (bool, type(None))) else _safe(str(value))


def safe_errors(errors: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic/FastAPI errors as JSON-safe dicts: `loc`, `msg`, `type` (inputs and contexts dropped,
    surrogates escaped, huge integers summarised)."""
    return [
        {
            "loc": [_safe(p) for p in e.get("loc", ())],
            "msg": _safe(str(e.get("msg", ""))),
            "type": _safe(str(e.get("type", ""))),
        }
        for e in errors
    ]


def first_field(errors: Sequence[dict[str, Any]]) -> str | None:
    """The dotted field name of the first error (without the leading 'body'), or None."""
    if not errors:
        return None
    loc = [str(p) for p in errors[0].get("loc", ()) if p != "body"]
    return ".".join(loc) or None
