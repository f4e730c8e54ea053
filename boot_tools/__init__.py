"""Tools for users beside the product stages: random-weight model folders for trying the path, and
the GPU-machine helpers (each file says what it does and how to run it)."""
