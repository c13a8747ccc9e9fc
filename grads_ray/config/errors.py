"""The config's one error and the message helpers the sections' checks share.

Apart so that every module of the package (sections, loading, paths) raises the same
:class:`ConfigError` without importing one another, and an enumeration or a number-or-word setting
gets the same message whatever section holds it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run: the message names the key."""


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def _number_or(key: str, value: str, word: str, positive: bool = False) -> None:
    if value == word:
        return
    try:
        x = float(value)
    except ValueError:
        raise ConfigError(f"{key} must be a number or {word}, got {value!r}") from None
    if x < 0 or (positive and x == 0):
        raise ConfigError(f"{key} must be {'> 0' if positive else '>= 0'}, got {value!r}")


def _switch(key: str, value: str) -> None:
    """A ``use_gpu``-style setting: auto, true or false."""
    if value not in ("auto", "true", "false"):
        raise ConfigError(f"{key} must be auto, true or false, got {value!r}")
