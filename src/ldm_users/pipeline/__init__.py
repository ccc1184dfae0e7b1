"""The shipped model code: what an export carries beside its weights.

condition.py (UserConditionEncoder), denoiser.py (UserDenoiser and `kind_of`, how each backbone takes the users),
flux.py (Flux's latent packing, position ids and resolution shift) and pipeline_user_ldm.py (UserLDMPipeline)
import only torch, diffusers, the standard library and each other by relative import, because these very files
are copied into every export, where diffusers imports them for
`DiffusionPipeline.from_pretrained(export, trust_remote_code=True)` without ldm_users installed.
"""

from .condition import UserConditionEncoder
from .denoiser import UserDenoiser, kind_of

__all__ = ["UserConditionEncoder", "UserDenoiser", "UserLDMPipeline", "guided", "kind_of"]


def __getattr__(name):
    # diffusers' pipeline machinery costs seconds to import: config checks that only need `kind_of` skip it.
    if name in ("UserLDMPipeline", "guided"):
        from . import pipeline_user_ldm

        return getattr(pipeline_user_ldm, name)
    raise AttributeError(name)
