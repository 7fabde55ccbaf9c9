"""Answers that are JSON or tool calls: parse them into fields and score a reply field by field.

A structured answer is a JSON value, a `<tool_call name="..." arguments='{...}'/>` element (the form the
bundled task and many tool-calling datasets use; either quote style) or a `<tool_call>{"name": ...,
"arguments": {...}}</tool_call>` block. The one thing to know: fields are flat paths to scalar values
(`name`, `arguments.to`, `items[0].qty`), so a reply that gets the tool right and one argument wrong
scores partly, where exact match scores it 0.
"""

from __future__ import annotations

import json
import re

_TAG = re.compile(r"""^<tool_call\s+name=(?P<q1>["'])(?P<name>.*?)(?P=q1)\s+arguments=(?P<q2>["'])(?P<args>.*)(?P=q2)\s*/>$""",
                  re.DOTALL)
_BLOCK = re.compile(r"^<tool_call>\s*(?P<body>.*?)\s*</tool_call>$", re.DOTALL)


def parse(text: str) -> dict | None:
    """The fields of a structured answer, or None when `text` is not valid JSON or a well-formed tool call."""
    text = text.strip()
    if m := _TAG.match(text):
        args = _json(m["args"])
        if not isinstance(args, dict):
            return None
        return {"name": m["name"], **flatten(args, "arguments")}
    if m := _BLOCK.match(text):
        call = _json(m["body"])
        if not isinstance(call, dict) or "name" not in call:
            return None
        return flatten(call)
    if not text or text[0] not in "{[":  # a bare number or string is prose, not a structured answer
        return None
    value = _json(text)
    return None if value is _INVALID else flatten(value)


_INVALID = object()


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _INVALID


def flatten(value, prefix: str = "") -> dict:
    """{path: scalar} of a JSON value; an empty object or list is a field of its own."""
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def field_match(reference: dict, reply: dict | None) -> float:
    """Share of fields, over the union of both answers' fields, that hold the same value in both (0 if invalid)."""
    if reply is None:
        return 0.0
    keys = reference.keys() | reply.keys()
    same = sum(1 for k in keys if k in reference and k in reply and _same(reference[k], reply[k]))
    return same / len(keys) if keys else 1.0


def _same(a, b) -> bool:
    # JSON's 1 and 1.0 are the same value, but True is not 1
    return type(a) is type(b) and a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                              and not isinstance(a, bool) and not isinstance(b, bool) and a == b)
