"""Model adapters: pipeline loading, the denoiser and its layers, tokenizers built without downloads."""

__all__: list[str] = []
