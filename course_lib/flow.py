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


# --- Theory in 2-D (lesson 11): conditional and marginal paths, the ODE and the SDE. ---
#
# Data: a mixture of K Gaussians N(m_k, tau^2 I) with weights pi_k (the ring above is one). For the straight
# path x_sigma = (1 - sigma) x0 + sigma eps everything is Gaussian given the mode k, so the *marginal* velocity
# field, the one the ODE must follow, has a closed form. A network trained on the *conditional* target eps - x0
# (``flow_matching_loss``) regresses onto it, because the minimiser of E |v(x_sigma) - (eps - x0)|^2 is
# v(x) = E[eps - x0 | x_sigma = x]: the conditional flow-matching theorem (Lipman et al. 2022) in one line.


class GaussianMixture2D:
    """A mixture of isotropic Gaussians in 2-D: ``means`` (K, 2), one ``std`` (tau), ``weights`` (K,) summing to 1."""

    def __init__(self, means: torch.Tensor, std: float, weights: torch.Tensor | None = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2 or means.shape[1] != 2 or len(means) == 0:
            raise ValueError(f"means must be (K, 2) with K >= 1, got {tuple(means.shape)}")
        if not std > 0:
            raise ValueError(f"std must be positive, got {std}")
        weights = torch.full((len(means),), 1.0 / len(means), dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (len(means),) or (weights < 0).any() or abs(float(weights.sum()) - 1) > 1e-6:
            raise ValueError(f"weights must be {len(means)} non-negative numbers summing to 1, got {weights.tolist()}")
        self.means, self.std, self.weights = means, float(std), weights

    @classmethod
    def ring(cls, modes: int = 8, radius: float = 2.0, std: float = 0.12) -> "GaussianMixture2D":
        """``ring_of_gaussians``' distribution."""
        angle = 2 * math.pi * torch.arange(modes, dtype=torch.float64) / modes
        return cls(radius * torch.stack([angle.cos(), angle.sin()], 1), std)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, 2) float32 points."""
        k = torch.multinomial(self.weights.float(), n, replacement=True, generator=generator)
        return (self.means[k] + self.std * torch.randn(n, 2, generator=generator, dtype=torch.float64)).float()

    def _posterior(self, x: torch.Tensor, sigma: torch.Tensor):
        """Given x at noise level sigma: responsibilities r (N, K), E[x0 | x, k] and E[eps | x, k] (N, K, 2)."""
        x = x.double()[:, None, :]  # (N, 1, 2)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1).expand(x.shape[0], 1, 1)
        mean = (1 - s) * self.means[None]  # (N, K, 2): where mode k's points sit at sigma
        var = (1 - s) ** 2 * self.std ** 2 + s ** 2  # (N, 1, 1): their variance
        d = x - mean
        logp = torch.log(self.weights)[None] - (d ** 2).sum(-1) / (2 * var[..., 0]) - torch.log(var[..., 0])  # (N, K)
        r = torch.softmax(logp, dim=1)
        x0 = self.means[None] + (1 - s) * self.std ** 2 / var * d  # Gaussian conditioning, per mode
        eps = s / var * d
        return r, x0, eps

    def velocity(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """The marginal velocity u(x, sigma) = E[eps - x0 | x_sigma = x], (N, 2): what flow matching learns."""
        r, x0, eps = self._posterior(x, sigma)
        return (r[..., None] * (eps - x0)).sum(1).to(x.dtype)

    def score(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """grad log p_sigma(x) = -E[eps | x] / sigma, (N, 2) (sigma > 0)."""
        r, _, eps = self._posterior(x, sigma)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        return (-(r[..., None] * eps).sum(1) / s).to(x.dtype)


def score_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """The score a velocity implies on the straight path: E[eps | x] = x + (1 - sigma) v, score = -E[eps | x] / sigma."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))
    return -(x + (1 - s) * v) / s


@torch.no_grad()
def sde_sample(velocity_fn: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor, churn: float,
               generator: torch.Generator, return_trajectory: bool = False):
    """Euler-Maruyama on the reverse SDE with the flow's marginals, from sigma = sigmas[0] to sigmas[-1].

    Any diffusion coefficient g(sigma) keeps the marginals p_sigma if the drift is v - g^2/2 * score (run
    backwards in sigma): dx = [v - g^2/2 grad log p] dsigma + g dW. Here g = churn * sigma and the score comes
    from the velocity itself (``score_from_velocity``), so one velocity network gives both samplers. With
    ``churn = 0`` this is ``euler_sample``, the ODE; larger churn injects more fresh noise and forgets more.
    """
    if churn < 0:
        raise ValueError(f"churn must be >= 0, got {churn}")
    x = noise.float()
    path = [x]
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        h = s - s_next  # > 0: we walk from noise towards data
        v = velocity_fn(x, torch.full((x.shape[0],), s, device=x.device))
        drift = v - 0.5 * (churn * s) ** 2 * score_from_velocity(x, v, s) if s > 0 else v
        x = x - h * drift
        if churn > 0 and s_next > 0:
            z = torch.randn(x.shape, generator=generator, device=generator.device).to(x)
            x = x + churn * s * math.sqrt(h) * z
        path.append(x)
    return torch.stack(path) if return_trajectory else x


def train_velocity_mlp(mixture: GaussianMixture2D, steps: int = 2000, batch: int = 512, lr: float = 2e-3,
                       seed: int = 0, hidden: int = 128) -> tuple[VelocityMLP, list[float]]:
    """Flow matching in 2-D: a ``VelocityMLP`` trained on the conditional target eps - x0 (``flow_matching_loss``)
    for points of ``mixture``; returns the network and its loss per step (a few seconds on a CPU)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = VelocityMLP(hidden=hidden)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = flow_matching_loss(net, mixture.sample(batch, g), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return net.eval(), losses


def vp_to_flow(x: torch.Tensor, alpha_bar: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """A DDPM latent x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, rewritten as a point of the straight path (lesson 11).

    Dividing by sqrt(ab) + sqrt(1 - ab) gives (1 - sigma) x0 + sigma eps with sigma = sqrt(1 - ab) / (sqrt(ab) +
    sqrt(1 - ab)): the same x0 and eps, so the two processes have the same marginals up to this rescaling, and a
    DDIM path can be measured (``straightness``) in the flow's coordinates. Returns (x in flow coordinates, sigma).
    """
    ab = torch.as_tensor(alpha_bar, dtype=torch.float32, device=x.device)
    norm = ab.sqrt() + (1 - ab).sqrt()
    return x / norm, (1 - ab).sqrt() / norm
