"""Performance and memory tooling shared by ldm-diagnose and ldm-bench."""
