"""ldm-report's library: job dirs -> one row per job (jobs.py) -> report.md / report.csv (tables.py) and the
loss and accuracy-against-FD plots (plots.py). Reads only files (no W&B access needed)."""
