"""Rectified flow (flow matching) and its Euler sampler: the training objective of Stable Diffusion 3.

Lesson 8 (``notebooks/08_sd_lineage.ipynb``) trains a tiny model with it and samples it here.

SD 1.x, 2.x and SDXL learn to predict the noise of a DDPM forward process with a noise schedule.
SD 3 instead draws a straight line between data and noise and learns the velocity along it
(Liu et al. 2022, "Flow straight and fast"; Lipman et al. 2022, "Flow matching"; Esser et al. 2024,
"Scaling rectified flow transformers", the SD 3 paper)::

    x_sigma = (1 - sigma) * x_0 + sigma * eps          sigma in [0, 1]: 0 is data, 1 is pure noise
    v       = d x_sigma / d sigma = eps - x_0          the velocity the model learns to predict

Sampling integrates the ODE dx/dsigma = v(x, sigma) from sigma = 1 down to 0. If the learned paths were
exactly straight, one Euler step would be exact; they are not quite (many x_0 share one x_1), so a few
steps are needed. Notation, code name -> paper symbol:

    sigma  -> t   (the SD 3 paper writes z_t = (1 - t) x_0 + t eps)
    eps    -> eps ~ N(0, I)
    v      -> v_Theta(z_t, t), the network's output
    shift  -> alpha in eq. (23) of the SD 3 paper: t_m = alpha * t / (1 + (alpha - 1) * t)

This sigma is flow matching's own, the share of noise in x_sigma; it is not Karras' sigma of the
DDPM-type models, sqrt((1 - alpha_bar) / alpha_bar) (the notation block in course_lib/schedules.py).

The sigma schedule and the Euler step reproduce diffusers' ``FlowMatchEulerDiscreteScheduler``
exactly (``tests/test_dit.py`` compares them over whole sampling loops).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma of shape (B,)) -> v, same shape as x


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The point at noise level ``sigma`` on the straight line from ``x0`` (sigma=0) to ``noise`` (sigma=1).

    ``sigma`` has shape (B,) and broadcasts over the other dimensions of ``x0``.
    """
    s = sigma.reshape(-1, *([1] * (x0.dim() - 1))).to(x0)  # (B, 1, ...)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the model must predict: d x_sigma / d sigma = noise - x0 (the same for every sigma on a line)."""
    return noise - x0


def sample_sigmas(n: int, generator: torch.Generator, kind: Literal["uniform", "logit_normal"] = "uniform",
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Training noise levels, shape (n,).

    ``"uniform"`` is plain rectified flow. ``"logit_normal"`` is what SD 3 trains with (its eq. 19, with
    m=0, s=1): sigma = sigmoid(u), u ~ N(0, 1), which spends more training on the middle noise levels,
    where predicting the velocity is hardest.
    """
    if kind == "uniform":
        sigma = torch.rand(n, generator=generator, device=generator.device)
    elif kind == "logit_normal":
        sigma = torch.sigmoid(torch.randn(n, generator=generator, device=generator.device))
    else:
        raise ValueError(f"kind must be 'uniform' or 'logit_normal', got {kind!r}")
    return sigma.to(device)


def flow_matching_loss(velocity_fn: VelocityFn, x0: torch.Tensor, generator: torch.Generator,
                       kind: Literal["uniform", "logit_normal"] = "uniform") -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity at random noise levels (the whole objective)."""
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0)
    sigma = sample_sigmas(x0.shape[0], generator, kind, device=x0.device)  # (B,)
    x_sigma = interpolate(x0, noise, sigma)
    return torch.nn.functional.mse_loss(velocity_fn(x_sigma, sigma), velocity_target(x0, noise))


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD 3's timestep shift (paper eq. 23): spend more of the steps at high noise. shift=1 changes nothing.

    Larger images keep more of their structure at a given sigma (many pixels average the noise away),
    so SD 3 uses shift=3.0 at 1024x1024 to push the schedule towards the noisy end.
    """
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The ``num_steps + 1`` noise levels of a sampling run, from 1 down to 0, as diffusers makes them.

    ``FlowMatchEulerDiscreteScheduler.set_timesteps`` spaces the steps evenly between the largest and the
    smallest *training* sigma (1 and 1/num_train_timesteps, the latter already shifted once when the
    scheduler was built), shifts them, and appends a final 0. So the smallest sigma is shifted twice,
    a quirk that this function copies so that the course and diffusers agree to the last bit.
    The model is called with ``timestep = sigma * num_train_timesteps``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    n = num_train_timesteps
    train_sigmas = shift_sigmas(torch.arange(1, n + 1, dtype=torch.float32) / n, shift)  # (n,), as the scheduler builds them
    sigma_min, sigma_max = train_sigmas[0].item(), train_sigmas[-1].item()
    t = torch.linspace(sigma_max * n, sigma_min * n, num_steps, dtype=torch.float64)  # (num_steps,) in "timesteps"
    sigmas = shift_sigmas(t / n, shift).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


def uniform_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """``num_steps + 1`` evenly spaced noise levels from 1 to 0 (then shifted): the plain rectified-flow schedule.

    Unlike ``flow_sigmas`` (diffusers' schedule, whose last step only covers 1/1000 -> 0), every step
    here covers the same stretch of sigma, so n steps are n useful steps.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    return shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1), shift)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor) -> torch.Tensor:
    """One Euler step of dx/dsigma = v from ``sigma`` to ``sigma_next`` (< sigma): x + (sigma_next - sigma) * v."""
    return x + (sigma_next - sigma) * v


@torch.no_grad()
def euler_sample(velocity_fn: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor,
                 return_trajectory: bool = False):
    """Integrate from ``noise`` (at sigmas[0], normally 1) to data (at sigmas[-1], normally 0) with Euler steps.

    ``velocity_fn(x, sigma)`` gets ``sigma`` as a (B,) tensor. Returns the final sample, or, with
    ``return_trajectory=True``, a tensor (len(sigmas), *noise.shape) holding every intermediate x.
    """
    if sigmas.dim() != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    x = noise.float()  # diffusers computes the step in float32 too
    path = [x]
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].to(x.device)
        v = velocity_fn(x, sigma.expand(x.shape[0]))
        x = euler_step(x, v.float(), sigma, sigmas[i + 1].to(x.device))
        path.append(x)
    return torch.stack(path) if return_trajectory else x


def straightness(trajectory: torch.Tensor) -> torch.Tensor:
    """How straight each sampled path is: |end - start| / (length along the path), 1 for a straight line.

    ``trajectory`` is (steps + 1, B, ...); returns (B,).
    """
    flat = trajectory.flatten(2)  # (S, B, D)
    chord = (flat[-1] - flat[0]).norm(dim=-1)
    length = (flat[1:] - flat[:-1]).norm(dim=-1).sum(0)
    return chord / length.clamp_min(1e-12)


# --- A 2-D toy distribution and a small velocity network, for seeing the paths. ---

def ring_of_gaussians(n: int, generator: torch.Generator, modes: int = 8, radius: float = 2.0,
                      std: float = 0.12) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points from ``modes`` small Gaussians spaced around a circle; returns (points (n, 2), mode index (n,))."""
    mode = torch.randint(0, modes, (n,), generator=generator)
    angle = 2 * math.pi * mode.float() / modes
    centres = radius * torch.stack([angle.cos(), angle.sin()], dim=1)  # (n, 2)
    return centres + std * torch.randn(n, 2, generator=generator), mode


def sinusoidal_features(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) noise levels in [0, 1] -> (B, dim) sin/cos features at geometric frequencies (a timestep embedding)."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(0, math.log(1000.0), half, device=sigma.device))  # (half,)
    angles = sigma[:, None] * freqs[None] * (math.pi / 2)  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class VelocityMLP(torch.nn.Module):
    """v(x, sigma) for points in 2-D: the noise level enters as sinusoidal features concatenated to x."""

    def __init__(self, dim: int = 2, hidden: int = 128, time_features: int = 16):
        super().__init__()
        self.time_features = time_features
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + time_features, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, dim),
        )

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_features(sigma.to(x), self.time_features)  # (B, time_features)
        return self.net(torch.cat([x, features], dim=1))
