"""Integrations with the diffusers ecosystem."""

__all__: list[str] = []
