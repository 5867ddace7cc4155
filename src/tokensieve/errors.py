"""Exceptions raised by tokensieve.

Every error names what is wrong and what is accepted. ``InputError`` also derives from
``ValueError`` so callers that catch ``ValueError`` keep working.
"""


class TokensieveError(Exception):
    """Base class of every error tokensieve raises on purpose."""


class InputError(TokensieveError, ValueError):
    """Bad user input: an unknown name, a value out of range, a file that cannot be read."""
