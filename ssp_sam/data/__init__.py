"""Datasets: the official layout, a team's own JSON-lines format, and the synthetic referring benchmark."""
