"""Test helpers for hfpapers and its users: `LocalHub`, a Hub-protocol server on localhost."""

from .localhub import LocalHub, serve

__all__ = ["LocalHub", "serve"]
