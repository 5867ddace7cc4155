"""tokensieve: training-free visual token compression for image and video LLMs.

    import tokensieve
    tokensieve.compress(model, "vidcom2", retain=0.25)   # patch in place
    out = model.generate(**inputs, max_new_tokens=32)    # same call as before, fewer tokens
    print(tokensieve.stats(model).tokens_after)
    tokensieve.restore(model)
"""

from . import methods
from .api import TrimHandle, compress, is_compressed, restore, stats
from .errors import InputError, TokensieveError

__version__ = "0.1.0"

__all__ = [
    "InputError",
    "TrimHandle",
    "TokensieveError",
    "__version__",
    "compress",
    "is_compressed",
    "methods",
    "restore",
    "stats",
]
