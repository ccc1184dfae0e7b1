"""Everything after training: load a model (export, run dir, checkpoint), build and write exports, pick the
sampler, move to a device, replay denoiser calls fast. Imports nothing from ldm_users.training."""
