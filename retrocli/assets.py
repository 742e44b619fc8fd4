"""Files shipped inside the package (the default tokenizer, the bundled model): one locator for all."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def asset_path(*parts: str) -> Path:
    """The installed path of retrocli/assets/<parts...>."""
    return Path(str(resources.files("retrocli").joinpath("assets", *parts)))
