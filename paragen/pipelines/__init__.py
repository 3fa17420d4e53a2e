"""Glue to concrete diffusers pipelines: which modules to patch, the request loop, outputs."""
