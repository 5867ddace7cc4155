"""Exceptions raised by visiontrim.

Every error names what is wrong and what is accepted. ``InputError`` also derives from
``ValueError`` so callers that catch ``ValueError`` keep working.
"""


class VisiontrimError(Exception):
    """Base class of every error visiontrim raises on purpose."""


class InputError(VisiontrimError, ValueError):
    """Bad user input: an unknown name, a value out of range, a file that cannot be read."""
