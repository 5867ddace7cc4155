"""Exceptions raised by tokensieve.

Every error names what is wrong and what is accepted. ``InputError`` also derives from
``ValueError`` so callers that catch ``ValueError`` keep working.
"""


class TokensieveError(Exception):
    """Base class of every error tokensieve raises on purpose."""


class InputError(TokensieveError, ValueError):
    """Bad user input: an unknown name, a value out of range, a file that cannot be read."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for
    one-line errors that wrap a library's."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip()
