"""retrocli: build and query RETRO chunk databases."""

__version__ = "0.1.0"

from retrocli.db import RetroDB, open_db  # noqa: E402
from retrocli.errors import RetroError  # noqa: E402

__all__ = ["RetroDB", "RetroError", "__version__", "open_db"]
