"""The RETRO decoder: config, model, KV cache (see retro.py)."""

from retrocli.model.retro import CONFIG_NAME, WEIGHTS_NAME, RetroCache, RetroConfig, RetroModel

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "RetroCache", "RetroConfig", "RetroModel"]
