"""Compatibility alias: this module lives in `boot.pipeline` (the core package `boot`)."""

from boot.pipeline import *  # noqa: F401,F403
