"""Configuration: the one settings model and its loading (imports nothing of ours)."""
from config.settings import ConfigError, Destination, Settings, load_settings

__all__ = ["ConfigError", "Destination", "Settings", "load_settings"]
