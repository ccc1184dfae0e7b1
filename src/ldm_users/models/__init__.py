"""Construction of the VAE, the denoiser and the user encoder from the config (the model code itself is in
ldm_users.pipeline, which every export ships)."""
