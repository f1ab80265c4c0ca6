"""Tools: train models, predict, score and evaluate."""

__all__: list[str] = []
