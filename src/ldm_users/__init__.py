"""ldm-users: user-conditioned latent diffusion experiments (Hydra + diffusers + accelerate + W&B)."""

__version__ = "0.1.0"

# Exported at the top level so diffusers' `DiffusionPipeline.from_pretrained` can import the custom
# components named in an export's model_index.json (library "ldm_users").
from ldm_users.models.condition import UserConditionEncoder  # noqa: E402,F401


def __getattr__(name):
    # The pipeline imports diffusers' pipeline machinery; load it only when asked for.
    if name == "UserLDMPipeline":
        from ldm_users.pipeline import UserLDMPipeline

        return UserLDMPipeline
    raise AttributeError(name)
