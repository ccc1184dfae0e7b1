"""One optimizer step of each stage: the code ldm-train runs, ldm-bench times and ldm-diagnose measures.

`TrainStep` is the part both stages share. Per micro-batch: seed every RNG from (seed, step, micro-batch, rank),
take the micro-batch's data (a pure function of the step, so resume is exact), forward and loss under autocast,
backward; on the last micro-batch: clip, one finite check (the only host sync of a step: a non-finite step must be
skipped, not applied), optimizer and LR-scheduler step, then the EMA update if the step was applied.

`VaeTrainStep` trains the autoencoder on images; `LdmTrainStep` the denoiser on cached latent posteriors:
z ~ N(mean, std) * scaling_factor, users -> the null user with probability p_uncond (classifier-free guidance),
then the objective (training/objectives.py) gives timesteps, noisy input, target and loss weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ldm_users.training.common import DataOrder, seed_step
from ldm_users.training.nonfinite import step_is_finite
from ldm_users.training.objectives import Objective, weighted_mse


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without the stream sync a pageable copy does (pinned buffers are cached by torch)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass
class StepResult:
    loss: torch.Tensor       # this optimizer step's loss, mean over its micro-batches (on the device)
    last_loss: torch.Tensor  # the last micro-batch's loss (for error messages)
    grad_norm: torch.Tensor  # total gradient norm before clipping (on the device)
    skipped: bool            # the optimizer did not apply this step (non-finite, or the fp16 scaler skipped it)
    extras: dict = field(default_factory=dict)  # the last micro-batch's loss terms (name -> tensor), for the logs


@dataclass(frozen=True)
class StepSettings:
    """What a step needs besides the objects it updates."""

    batch: int                           # images per micro-batch on each process
    seed: int                            # with (step, micro-batch, rank): every random draw of the step
    max_grad_norm: float = float("inf")  # gradient clipping (inf: none)
    random_flip: bool = False            # VAE: flip each image horizontally with probability 1/2
    latent_scale: float = 1.0            # LDM: the VAE's scaling_factor
    p_uncond: float = 0.0                # LDM: probability that a user becomes the null user
    null_id: int = 0                     # LDM: the null user's index
    channels_last: bool = False          # LDM: the noisy latents in channels_last memory format


class TrainStep:
    """`step(step_index) -> StepResult`. Subclasses say what a micro-batch is (`inputs`) and its loss (`loss`)."""

    def __init__(self, accelerator, model, optimizer, lr_scheduler, order: DataOrder, settings: StepSettings,
                 ema=None):
        self.accelerator, self.model, self.forward = accelerator, model, model
        self.optimizer, self.lr_scheduler, self.order, self.settings = optimizer, lr_scheduler, order, settings
        self.ema = ema
        self.ema_params = list(accelerator.unwrap_model(model).parameters()) if ema is not None else []
        self.device = accelerator.device
        self.accum = accelerator.gradient_accumulation_steps
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.fp16_scaler = accelerator.scaler is not None

    def indices(self, step: int, micro: int) -> torch.Tensor:
        """The dataset indices of this micro-batch on this rank: the sample stream is split by step, micro, rank."""
        batch = self.settings.batch
        position = ((step * self.accum + micro) * self.world + self.rank) * batch
        return self.order.indices(position, batch)

    def inputs(self, step: int, micro: int):
        raise NotImplementedError

    def loss(self, inputs) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def check_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        return step_is_finite(self.accelerator, loss, grad_norm)

    def __call__(self, step: int) -> StepResult:
        accelerator, optimizer = self.accelerator, self.optimizer
        total = torch.zeros((), device=self.device)
        grad_norm, finite = None, True
        for micro in range(self.accum):
            seed_step(self.settings.seed, step, micro, self.rank)
            inputs = self.inputs(step, micro)
            with accelerator.accumulate(self.model):
                with accelerator.autocast():
                    loss, extras = self.loss(inputs)
                # Backward outside autocast: autocast keeps its fp16/bf16 copies of the weights (2 B/param)
                # until its outermost context exits; inside it they would live through the whole backward.
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
                    finite = self.check_finite(loss, grad_norm)
                    if finite or self.fp16_scaler:  # the fp16 GradScaler skips (and rescales) by itself
                        optimizer.step()
                        self.lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            total += loss.detach() / self.accum
        # This optimizer's own flag: accelerate's optimizer_step_was_skipped is true if any prepared optimizer's last
        # step was skipped (the VAE stage's discriminator has its own).
        skipped = not finite or (self.fp16_scaler and optimizer.step_was_skipped)
        if self.ema is not None and not skipped:
            self.ema.step(self.ema_params)
        return StepResult(loss=total, last_loss=loss.detach(), grad_norm=grad_norm, skipped=skipped, extras=extras)


class VAEWithLoss(torch.nn.Module):
    """The autoencoder and its generator loss (training/vae_losses.py) behind one forward(), so DDP sees (and syncs)
    the whole step. Only the VAE is a submodule: the discriminator has its own optimizer and checkpoint entry, and
    the perceptual net is loaded from its file. With `decoder_only` the encoder runs without gradients."""

    def __init__(self, vae, reconstruction, kl_weight: float, adversarial=None, decoder_only: bool = False):
        super().__init__()
        self.vae = vae
        self.reconstruction, self.kl_weight, self.adversarial = reconstruction, float(kl_weight), adversarial
        self.decoder_only = decoder_only

    def forward(self, images: torch.Tensor, adversarial: bool = False):
        """(loss, loss terms, the reconstructions without gradient) of a batch; `adversarial`: add the generator's
        adversarial term (from vae_train.disc.start on)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.decoder_only):
            posterior = self.vae.encode(images).latent_dist
        recon = self.vae.decode(posterior.sample()).sample.float()
        images = images.float()
        nll, terms = self.reconstruction(recon, images)
        kl = posterior.kl().mean() / images[0].numel()  # per pixel, so kl_weight is comparable across sizes
        loss = nll + self.kl_weight * kl
        terms["kl"] = kl.detach()
        if adversarial:
            g_term, g_terms = self.adversarial.generator_loss(recon, nll, self.vae.decoder.conv_out.weight)
            loss = loss + g_term
            terms.update(g_terms)
        return loss, terms, recon.detach()


class VaeTrainStep(TrainStep):
    """The autoencoder on a micro-batch of dataset images (flipped at random with data.random_flip); with a
    discriminator (`adversarial`, `disc_optimizer`), after the autoencoder's optimizer step the discriminator's on
    the same micro-batches' real images and reconstructions (its backward after the autoencoder's step, so under
    fp16 both see the loss scale they are unscaled with)."""

    def __init__(self, accelerator, model, optimizer, lr_scheduler, order, settings, dataset, ema=None,
                 adversarial=None, disc_optimizer=None):
        super().__init__(accelerator, model, optimizer, lr_scheduler, order, settings, ema)
        self.dataset, self.adversarial, self.disc_optimizer = dataset, adversarial, disc_optimizer
        self.step_index, self.pairs = 0, []

    def inputs(self, step: int, micro: int) -> torch.Tensor:
        self.step_index = step
        images, _ = self.dataset.batch(self.indices(step, micro).numpy())
        images = images.to(self.device)
        if self.settings.random_flip:
            mask = torch.rand(images.shape[0], device=images.device) < 0.5
            images = torch.where(mask[:, None, None, None], images.flip(-1), images)
        return images

    def gan_active(self) -> bool:
        return self.adversarial is not None and self.adversarial.active(self.step_index)

    def loss(self, images):
        loss, terms, recon = self.forward(images, self.gan_active())
        if self.gan_active():
            self.pairs.append((images, recon))
        return loss, terms

    def __call__(self, step: int) -> StepResult:
        self.pairs = []
        result = super().__call__(step)
        if self.pairs:
            result.extras.update(self.discriminator_step())
        self.pairs = []
        return result

    def discriminator_step(self) -> dict:
        accelerator, disc = self.accelerator, self.adversarial.disc
        for i, (images, recon) in enumerate(self.pairs):
            last = i == len(self.pairs) - 1
            with contextlib.nullcontext() if last or self.world == 1 else accelerator.no_sync(disc):
                with accelerator.autocast():
                    d_loss, terms = self.adversarial.discriminator_loss(images, recon)
                accelerator.backward(d_loss)
        if step_is_finite(accelerator, d_loss, None):  # a NaN must not reach the discriminator either
            self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        return terms


class LdmTrainStep(TrainStep):
    """The denoiser on a micro-batch of cached latent posteriors. `forward` may be a compiled `model`."""

    def __init__(self, accelerator, model, optimizer, lr_scheduler, order, settings, cache, objective: Objective,
                 ema=None, forward=None):
        super().__init__(accelerator, model, optimizer, lr_scheduler, order, settings, ema)
        self.cache, self.objective = cache, objective
        self.forward = model if forward is None else forward  # `or` would call len() on a compiled module

    def inputs(self, step: int, micro: int):
        """(noisy latents, timesteps, user ids, target, loss weights) for one micro-batch."""
        device, cache, s = self.device, self.cache, self.settings
        idx = to_device(self.indices(step, micro), cache.mean.device)
        z = to_device(cache.mean[idx] + cache.std[idx] * torch.randn_like(cache.mean[idx]), device) * s.latent_scale
        users = to_device(cache.labels[idx], device)
        users = torch.where(torch.rand(users.shape, device=device) < s.p_uncond, torch.full_like(users, s.null_id),
                            users)
        noise = torch.randn_like(z)
        timesteps = self.objective.sample_timesteps(z.shape[0], device)
        noisy = self.objective.noisy(z, noise, timesteps)
        if s.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        target = self.objective.target(z, noise, timesteps)
        return noisy, timesteps, users, target, self.objective.loss_weights(timesteps)

    def loss(self, inputs):
        noisy, timesteps, users, target, weights = inputs
        pred = self.forward(noisy, timesteps, users)
        return weighted_mse(pred, target, weights), {}
