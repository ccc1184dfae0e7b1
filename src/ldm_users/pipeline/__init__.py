"""The shipped model code: what an export carries beside its weights.

condition.py (UserConditionEncoder), families.py (a class per backbone family: how it takes the users, its
latents, its config checks, its default objective; and the latent size), denoiser.py (UserDenoiser), flux.py
(Flux's latent packing, position ids and resolution shift) and pipeline_user_ldm.py (UserLDMPipeline)
import only torch, diffusers, the standard library and each other by relative import, because these very files
are copied into every export, where diffusers imports them for
`DiffusionPipeline.from_pretrained(export, trust_remote_code=True)` without ldm_users installed.
"""

from .condition import UserConditionEncoder
from .denoiser import UserDenoiser
from .families import FAMILIES, Family, family_of, is_flow_matching, latent_size

__all__ = ["FAMILIES", "Family", "UserConditionEncoder", "UserDenoiser", "UserLDMPipeline", "family_of", "guided",
           "is_flow_matching", "latent_size"]


def __getattr__(name):
    # diffusers' pipeline machinery costs seconds to import: config checks that only need the families skip it.
    if name in ("UserLDMPipeline", "guided"):
        from . import pipeline_user_ldm

        return getattr(pipeline_user_ldm, name)
    raise AttributeError(name)
