"""Training: the VAE stage, the LDM stage, and what they share (accelerator, checkpoints, schedules)."""
