"""Data: folder-per-user datasets, the built-in synthetic dataset, and the preprocessing cache."""
