"""Argument types shared by the command lines (``tokensieve`` and ``python -m tokensieve.zoo.train``)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def float_in(low: float, high: float, what: str = "a number", *, low_open: bool = False) -> Any:
    """An argparse type: a number in ``[low, high]`` (``(low, high]`` when ``low_open``; NaN
    refused), described as ``what``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not ((low < value) if low_open else (low <= value)) or not value <= high:
            raise argparse.ArgumentTypeError(f"expected {what} in {'(' if low_open else '['}{low:g}, {high:g}], "
                                             f"got {text!r}")
        return value

    return parse


def writable_dir(path: str | Path, option: str) -> Path:
    """Make ``path`` a directory that can be written to, before any long work starts, or raise
    :class:`~tokensieve.errors.InputError` naming ``option`` and why (so finished work is never
    lost for want of a place to put it)."""
    import tempfile

    from .errors import InputError

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"{option} exists and is not a directory: {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".tokensieve-write-check-"):
            pass
    except OSError as exc:
        raise InputError(f"{option} {out} cannot be written to ({exc.strerror or exc})") from None
    return out


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON when it parses (numbers, true/false, null), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    lowered = value.strip()
    if lowered.lower() in ("true", "false", "none", "null"):
        return key.strip(), {"true": True, "false": False}.get(lowered.lower())
    try:
        return key.strip(), json.loads(lowered)
    except ValueError:
        return key.strip(), value
