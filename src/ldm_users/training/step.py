"""One optimizer step of the LDM stage: the code ldm-train runs and ldm-bench times (so they cannot drift).

Per micro-batch: cached latent posterior -> z ~ N(mean, std) * scaling_factor, users -> null user with
probability p_uncond, DDPM noise at random timesteps, regress epsilon or v, backward; on the last
micro-batch: clip, a finite check, optimizer and LR-scheduler step. Everything stays on the device;
the only host sync is the finite check once per optimizer step (a non-finite step must be skipped,
not applied). The batch indices go to the GPU through pinned memory, without a blocking copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def diffusion_target(scheduler, latents, noise, timesteps, prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"train.prediction_type={prediction_type}: use epsilon or v_prediction")


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
    finite: bool
    skipped: bool            # the optimizer did not apply this step (non-finite, or the fp16 scaler skipped it)


class LdmTrainStep:
    """`step_fn(step) -> StepResult`: seeding, data order and RNG use are pure functions of the step (exact resume)."""

    def __init__(self, *, accelerator, model, forward, optimizer, lr_scheduler, noise_scheduler, cache, order,
                 scaling: float, batch: int, seed: int, p_uncond: float, null_id: int, prediction_type: str,
                 channels_last: bool, max_norm: float):
        from ldm_users.training.common import seed_step

        self._seed_step = seed_step
        self.accelerator, self.model, self.forward = accelerator, model, forward
        self.optimizer, self.lr_scheduler, self.noise_scheduler = optimizer, lr_scheduler, noise_scheduler
        self.cache, self.order, self.scaling, self.batch, self.seed = cache, order, scaling, batch, seed
        self.p_uncond, self.null_id, self.prediction_type = p_uncond, null_id, prediction_type
        self.channels_last, self.max_norm = channels_last, max_norm
        self.device = accelerator.device
        self.accum = accelerator.gradient_accumulation_steps
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.num_timesteps = noise_scheduler.config.num_train_timesteps
        self.fp16_scaler = accelerator.scaler is not None

    def micro_batch(self, step: int, micro: int):
        """(noisy latents, timesteps, user ids, target) for one micro-batch."""
        device, cache = self.device, self.cache
        self._seed_step(self.seed, step, micro, self.rank)
        position = ((step * self.accum + micro) * self.world + self.rank) * self.batch
        idx = to_device(self.order.indices(position, self.batch), cache.mean.device)
        z = to_device(cache.mean[idx] + cache.std[idx] * torch.randn_like(cache.mean[idx]), device) * self.scaling
        users = to_device(cache.labels[idx], device)
        users = torch.where(torch.rand(users.shape, device=device) < self.p_uncond,
                            torch.full_like(users, self.null_id), users)
        noise = torch.randn_like(z)
        timesteps = torch.randint(0, self.num_timesteps, (z.shape[0],), device=device)
        noisy = self.noise_scheduler.add_noise(z, noise, timesteps)
        if self.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        target = diffusion_target(self.noise_scheduler, z, noise, timesteps, self.prediction_type)
        return noisy, timesteps, users, target

    def __call__(self, step: int) -> StepResult:
        accelerator, model, optimizer = self.accelerator, self.model, self.optimizer
        total = torch.zeros((), device=self.device)
        grad_norm, finite = None, True
        for micro in range(self.accum):
            noisy, timesteps, users, target = self.micro_batch(step, micro)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    pred = self.forward(noisy, timesteps, users)
                    loss = F.mse_loss(pred.float(), target.float())
                # Backward outside autocast: autocast keeps its fp16/bf16 copies of the weights (2 B/param)
                # until its outermost context exits; inside it they would live through the whole backward.
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), self.max_norm)
                    # The one host sync per optimizer step.
                    finite = bool(torch.isfinite(grad_norm) & torch.isfinite(loss))
                    if finite or self.fp16_scaler:  # the fp16 GradScaler skips (and rescales) by itself
                        optimizer.step()
                        self.lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            total += loss.detach() / self.accum
        skipped = not finite or (self.fp16_scaler and accelerator.optimizer_step_was_skipped)
        return StepResult(loss=total, last_loss=loss.detach(), grad_norm=grad_norm, finite=finite, skipped=skipped)
