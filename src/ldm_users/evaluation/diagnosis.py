"""Which stage limits quality, and whether the judge can tell: ldm-eval's autoencoder ceiling, bottleneck and
weak-judge verdicts (metrics.json keys, one log line each).

Three Fréchet distances in the judge's feature space, all to the same reference (every real image):
  real floor  fd/classifier_real_holdout  the judge's held-out real images themselves
  ceiling     ceiling/fd_classifier       the same images through the autoencoder (the best a perfect denoiser
                                          could do with this autoencoder)
  generated   fd/classifier               the model's images
The gap from the floor to the generated figure is split into the autoencoder's part (ceiling - floor) and the
denoiser's (generated - ceiling). The rule (`bottleneck`):
  - generated <= NEAR_FLOOR x floor: neither stage (the generated images are about as close as real ones);
  - else the autoencoder when its part is at least AUTOENCODER_SHARE of the gap, otherwise the denoiser.
E.g. floor 7.2, ceiling 39.7, generated 43.5: the autoencoder takes 90% of the gap -> autoencoder; floor 17.5,
ceiling 23, generated 40: 24% -> denoiser. Floor and ceiling are measured on the same images, so they share the
upward bias a Fréchet distance of few samples has; the generated figure uses eval.images_per_user per user, which
is why it can come out below the ceiling (the share is then above 1: still the autoencoder).

The judge is weak when its top-1 on held-out real images has less than JUDGE_MIN_SKILL of the way from chance to
perfect (skill = (top1 - chance) / (1 - chance)): its error rate is more than half a guesser's. Then accuracy
and FD figures say little about the model (they measure the judge), and ldm-eval says so.
"""

from __future__ import annotations

import logging

from ldm_users.evaluation.reconstruction import reconstruction_metrics

log = logging.getLogger(__name__)

NEAR_FLOOR = 1.5         # generated FD within this factor of the real floor: no stage limits quality much
AUTOENCODER_SHARE = 0.5  # the autoencoder's part of the floor -> generated gap that makes it the bottleneck
JUDGE_MIN_SKILL = 0.5    # 2 users: top-1 >= 0.75; 4: >= 0.625; 10: >= 0.55; 40: >= 0.51

JUDGE_ADVICE = ("more images per user (the judge trains on 80% of each user's images and is tested on the rest), "
                "a longer or wider judge (eval.classifier.steps, eval.classifier.width), or a pretrained feature "
                "space for image quality (eval.inception_weights=<local FID Inception weights>)")


def ceiling_metrics(vae, clf, dataset, device) -> dict:
    """ceiling/{psnr,ssim,fd_classifier,kid_classifier,top1,images}: the judge's held-out real images through the
    autoencoder, scored like generated images (None each when the judge holds out fewer than 2 images)."""
    scores = reconstruction_metrics(vae, clf, dataset, device)
    keys = ("psnr", "ssim", "fd_classifier", "kid_classifier", "top1", "images")
    return {f"ceiling/{k}": scores.get(k) for k in keys}


def bottleneck(floor, ceiling, generated) -> tuple[str | None, float | None, str]:
    """(stage, the autoencoder's share of the floor -> generated gap, one line) by the rule in the module doc."""
    if floor is None or ceiling is None or generated is None:
        return None, None, "bottleneck: unknown (needs the real floor, the ceiling and the generated FD)"
    figures = f"FD generated {generated:.3g}, autoencoder ceiling {ceiling:.3g}, real floor {floor:.3g}"
    gap = generated - floor
    share = (ceiling - floor) / gap if gap > 0 else None
    if generated <= NEAR_FLOOR * floor or share is None:
        return "neither", share, (f"bottleneck: neither stage ({figures}: generated within {NEAR_FLOOR}x of real "
                                  f"images)")
    stage = "autoencoder" if share >= AUTOENCODER_SHARE else "denoiser"
    return stage, share, f"bottleneck: {stage} ({figures}; the autoencoder takes {share:.0%} of the gap)"


def judge_verdict(holdout_top1, chance: float) -> tuple[bool | None, float | None]:
    """(reliable, skill) of the judge from its held-out top-1 (None, None without held-out images)."""
    if holdout_top1 is None:
        return None, None
    skill = (holdout_top1 - chance) / (1 - chance)
    return skill >= JUDGE_MIN_SKILL, skill


def diagnose(metrics: dict) -> dict:
    """bottleneck/{stage,autoencoder_share,line} and judge/{reliable,skill,advice} from the other metrics.json
    keys; logs the bottleneck line, and a warning when the judge is weak."""
    stage, share, line = bottleneck(metrics.get("fd/classifier_real_holdout"), metrics.get("ceiling/fd_classifier"),
                                    metrics.get("fd/classifier"))
    reliable, skill = judge_verdict(metrics.get("classifier/holdout_top1"), metrics["user_acc/chance"])
    if reliable is False:
        line += " (by a weak judge: see judge/advice)"
    out = {"bottleneck/stage": stage, "bottleneck/autoencoder_share": share, "bottleneck/line": line,
           "judge/reliable": reliable, "judge/skill": skill,
           "judge/advice": JUDGE_ADVICE if reliable is False else None}
    if reliable is False:
        log.warning("weak judge: its top-1 on held-out real images is %.3g (chance %.3g), so accuracy and FD figures "
                    "mean little; to make them meaningful: %s.", metrics["classifier/holdout_top1"],
                    metrics["user_acc/chance"], JUDGE_ADVICE)
    log.info(line)
    return out
