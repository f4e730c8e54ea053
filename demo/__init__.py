"""Gradio demo of the boot product (python -m demo.app)."""
