"""The console scripts (ldm-train, ldm-sample, ldm-eval, ldm-diagnose, ldm-report, ldm-bench): entry points only.

Each module is a Hydra app (or, for ldm-report, argparse) that turns a config into a call into the library;
`python -m ldm_users.cli.<name>` runs the same as the console script.
"""
