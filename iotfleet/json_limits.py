"""Bounds on JSON documents the platform accepts from outside: nesting depth, measured cheaply.

Deep nesting is the cheap attack on JSON services: a few kilobytes of ``[[[[…``
exhaust recursive parsers, validators and serializers (pydantic stops
serializing at a depth, so a stored document deeper than that breaks every
later read). ``raw_depth`` measures a request body before anything parses it,
at C speed; ``json_depth`` measures an already parsed value without recursion.
"""

from __future__ import annotations

import re
from itertools import accumulate
from operator import sub
from typing import Any

MAX_BODY_DEPTH = 32
"""Deepest JSON request body the registry parses (its largest legitimate one, a rule, needs ~20)."""
MAX_METADATA_DEPTH = 8
"""Deepest free-form ``metadata`` object of a device."""

_STRING = re.compile(rb'"[^"]*"')
_NOT_SYNTAX = bytes(b for b in range(256) if b not in b'[]{}"')
_SAME_BRACKETS = bytes.maketrans(b"{}", b"[]")
_RUN = re.compile(rb"\[+|\]+")
_PASSES = 8


def raw_depth(body: bytes, limit: int) -> int:
    """Nesting depth of a JSON text, counted up to ``limit + 1`` (that value means "deeper than limit").

    The escapes that matter (``\\\\`` then ``\\"``) are removed first, then
    strings (brackets inside them do not count; the regex cannot backtrack),
    then every byte but brackets, and ``{}`` become ``[]`` (in valid JSON the
    kinds nest properly, so only the depth matters). A few passes then remove
    the innermost pairs (``bytes.replace`` does not rescan what it produced:
    one pass is one level, and wide flat documents vanish at C speed); what is
    left is measured from its runs of opens and closes with prefix sums in C.
    On this machine 0.2-0.9 s for the most hostile 8 MiB bodies, 4-15 times
    less than ``json.loads`` of the same body (3.1-3.7 s), which the web
    framework would run anyway; O(n) memory.
    Unbalanced text stops early with the depth found so far: the parser
    reports it as malformed.
    """
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Keep quotes and brackets only (string boundaries stay where they were), so
    # the regex runs on little text and most strings are "" by then.
    syntax = unescaped.translate(_SAME_BRACKETS, _NOT_SYNTAX).replace(b'""', b"")
    brackets = _STRING.sub(b"", syntax).replace(b'"', b"")
    removed = 0
    for _ in range(_PASSES):
        if not brackets:
            return removed
        if b"[" * (limit + 1 - removed) in brackets:
            # A run of k opens after d passes means depth >= d + k. Exiting here also
            # spares replace() its slow case (a long run of the needle's first byte).
            return limit + 1
        reduced = brackets.replace(b"[]", b"")
        if len(reduced) == len(brackets):
            return removed  # unbalanced or mismatched: not our error to report
        removed += 1
        brackets = reduced
    # Each pass took one level off every branch: what is left is the rest of the depth.
    # Its runs alternate opens and closes; the depth after the j-th run of opens is
    # (opens so far) - (closes before it): prefix sums, all in C (no Python loop).
    lengths = list(map(len, _RUN.findall(brackets)))
    if brackets[:1] != b"[":
        return removed  # starts with a close: malformed
    opens = accumulate(lengths[0::2])
    closes = accumulate(lengths[1::2], initial=0)
    return min(limit + 1, removed + max(map(sub, opens, closes), default=0))


def json_depth(value: Any, limit: int = 1_000) -> int:
    """Nesting depth of a parsed JSON value (scalars 0, ``[]`` 1, ``[[1]]`` 2); stops past ``limit``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        stack.extend((child, depth) for child in children)
    return deepest
