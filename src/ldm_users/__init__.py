"""ldm-users: user-conditioned latent diffusion experiments (Hydra + diffusers + accelerate + W&B)."""

__version__ = "0.1.0"


def __getattr__(name):
    # The pipeline imports diffusers' pipeline machinery: load it only when asked for.
    if name in ("UserLDMPipeline", "UserConditionEncoder"):
        from ldm_users import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
