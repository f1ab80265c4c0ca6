"""Plotting."""

__all__: list[str] = []
