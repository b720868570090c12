"""Errors that carry the file and the problem, so a user can act on them."""

from __future__ import annotations


class ChestSSLError(Exception):
    """Base class for every error chestssl raises on purpose."""


class DataError(ChestSSLError, ValueError):
    """Input data is missing, unreadable or inconsistent.

    The message always names the file (or dataset) and what is wrong with it.
    """


class ConfigError(ChestSSLError, ValueError):
    """A configuration key or value is unknown or invalid."""


class CheckpointError(ChestSSLError, ValueError):
    """A checkpoint is corrupt, of another architecture, or made with other preprocessing."""
