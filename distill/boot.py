"""Compatibility alias: this module lives in `boot.method` (the core package `boot`)."""

from boot.method import *  # noqa: F401,F403
