"""boot_serve: pipelines, export, Triton launcher, clients and benchmark for BOOT students."""
