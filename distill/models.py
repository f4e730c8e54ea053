"""Compatibility alias: this module lives in `boot.folders` (the core package `boot`)."""

from boot.folders import *  # noqa: F401,F403
