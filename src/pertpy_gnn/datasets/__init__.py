"""Datasets: the simulated screen, remote loaders and readers."""

__all__: list[str] = []
