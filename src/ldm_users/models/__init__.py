"""Models: the user condition encoder, the denoiser wrapper and their construction from config."""
