"""Test helpers: tiny, randomly initialised diffusers pipelines built locally (no model hub)."""

__all__ = []
