"""Compatibility alias: this module lives in `boot.sdxl` (the core package `boot`)."""

from boot.sdxl import *  # noqa: F401,F403
