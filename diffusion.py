"""Gaussian diffusion as DiM trains and samples it: DiT's setup (Ho et al. 2020; Nichol & Dhariwal 2021).

The paper trains DiM exactly like DiT, so this is DiT's process written compactly:
  - 1,000 steps, betas linear from 1e-4 to 0.02;
  - the model predicts the noise eps and, with learn_sigma, a value v in [-1, 1] that interpolates
    the log variance between the posterior's beta~_t and beta_t (improved DDPM's "learned range");
  - loss = MSE(eps) + the variational bound term for the variance with the mean held fixed
    (improved DDPM's hybrid loss; at t = 0 the bound is the discretised Gaussian likelihood);
  - sampling: ancestral DDPM with respaced timesteps (e.g. 250 of 1,000) or DDIM (eta = 0 default),
    and classifier-free guidance by batching conditional and null-class inputs.

Everything is a function of tensors; a "model" here is any callable model_fn(x_t, t) -> output,
with t the timestep indices of the original 1,000-step process. Shapes are those of the data,
(N, C, H, W) or (N, T, C, H, W): channels are always dimension -3.
"""

import math

import numpy as np
import torch
from tqdm.auto import tqdm


def _at(values, t, x):
    """values[t] (float64 table, (N,) indices) broadcast against x: (N, 1, 1, ...). The move to x's
    device costs nothing once Diffusion.to has put the tables there."""
    return values.to(x.device)[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) for data in [-1, 1] quantised to 256 levels under N(mean, e^(2 log_scale)), in nats."""
    def cdf(v):  # the standard normal CDF, by the tanh approximation improved DDPM uses
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))

    inv_std = torch.exp(-log_scale)
    cdf_plus = cdf(inv_std * (x - mean + 1.0 / 255))
    cdf_minus = cdf(inv_std * (x - mean - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))            # the edge bin at -1 takes all below
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))  # ... and at +1 all above
    log_bin = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_bin))


def mean_over_data(x):
    return x.mean(dim=tuple(range(1, x.dim())))                       # (N,)


class Diffusion:
    """The schedule and its derived tables; `respaced(n)` gives the process on n of its steps."""

    def __init__(self, num_timesteps=1000, learn_sigma=True, betas=None, timestep_map=None):
        if betas is None:
            betas = np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)
        self.learn_sigma = learn_sigma
        self.betas = torch.from_numpy(betas)                            # (T,) float64
        self.num_timesteps = len(betas)
        # Index i of this (possibly respaced) process is step timestep_map[i] of the original one.
        self.timestep_map = torch.arange(self.num_timesteps) if timestep_map is None else timestep_map
        alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t)
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # beta~_0 = 0: clip its log to beta~_1's, as improved DDPM does (a one-step process has only beta_0)
        self.posterior_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
                                                if self.num_timesteps > 1 else self.betas)
        self.posterior_mean_coef1 = self.betas * torch.sqrt(self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * torch.sqrt(alphas) / (1 - self.alphas_cumprod)
        self.log_betas = torch.log(self.betas)
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = torch.rsqrt(self.alphas_cumprod)             # x_0 from x_t ...
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1 / self.alphas_cumprod - 1)   # ... and eps

    def to(self, device):
        """Moves every table to `device` (in place, like nn.Module.to) and returns self. Tables left on
        the host cost a copy at every lookup, and a copy from pageable host memory waits for the GPU,
        so the host could not queue a training step ahead of the GPU."""
        for name, value in vars(self).items():
            if torch.is_tensor(value):
                setattr(self, name, value.to(device))
        return self

    def respaced(self, num_steps):
        """The same process on num_steps evenly spaced steps of this one (DiT's timestep respacing):
        keep the cumulative products at those steps and recompute the betas between them."""
        if not 1 <= num_steps <= self.num_timesteps:
            raise ValueError(f"num_steps must be in [1, {self.num_timesteps}], got {num_steps}")
        kept = np.unique(np.round(np.linspace(0, self.num_timesteps - 1, num_steps)).astype(np.int64))
        alphas_cumprod = self.alphas_cumprod.cpu().numpy()[kept]
        betas = 1 - alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])
        respaced = Diffusion(learn_sigma=self.learn_sigma, betas=betas, timestep_map=self.timestep_map.cpu()[kept])
        return respaced.to(self.betas.device)

    # ----------------------------------------------------------------- the forward process q

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        return _at(self.sqrt_alphas_cumprod, t, x0) * x0 + _at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0, xt, t):
        """Mean, variance and log variance of q(x_{t-1} | x_t, x_0)."""
        mean = _at(self.posterior_mean_coef1, t, xt) * x0 + _at(self.posterior_mean_coef2, t, xt) * xt
        return mean, _at(self.posterior_variance, t, xt), _at(self.posterior_log_variance, t, xt)

    # ------------------------------------------------------------------ the reverse process p

    def p_mean_variance(self, model_output, xt, t, clip_x0=False):
        """From the model's output at x_t: the mean and log variance of p(x_{t-1} | x_t), and x_0.
        clip_x0 clamps the predicted x_0 to [-1, 1], as ADM does for pixels (DiT, on latents, does not)."""
        if self.learn_sigma:
            eps, v = model_output.chunk(2, dim=-3)
            low, high = _at(self.posterior_log_variance, t, xt), _at(self.log_betas, t, xt)
            fraction = (v + 1) / 2                                      # v in [-1, 1] -> [0, 1]
            log_variance = fraction * high + (1 - fraction) * low
        else:  # fixed small variance, beta~_t
            eps, log_variance = model_output, _at(self.posterior_log_variance, t, xt)
        x0 = self.predict_x0(xt, t, eps)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(x0, xt, t)
        return mean, log_variance, x0, eps

    def predict_x0(self, xt, t, eps):
        return _at(self.sqrt_recip_alphas_cumprod, t, xt) * xt - _at(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps

    def training_losses(self, model_fn, x0, t, noise=None):
        """Per-sample losses at timesteps t: dict(loss, mse, vb); vb is zero without learn_sigma."""
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)
        output = model_fn(xt, self.timestep_map.to(t.device)[t])
        if not self.learn_sigma:
            mse = mean_over_data((noise - output) ** 2)
            return dict(loss=mse, mse=mse, vb=torch.zeros_like(mse))
        eps, v = output.chunk(2, dim=-3)
        mse = mean_over_data((noise - eps) ** 2)
        # The bound trains only the variance: the mean it sees is held fixed (stop-gradient).
        frozen = torch.cat([eps.detach(), v], dim=-3)
        vb = self.vb_term(frozen, x0, xt, t)
        return dict(loss=mse + vb, mse=mse, vb=vb)

    def vb_term(self, model_output, x0, xt, t):
        """One term of the variational bound, in bits per dimension: KL(q || p) for t > 0, and
        -log p(x_0 | x_1) under the discretised Gaussian at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior(x0, xt, t)
        mean, log_variance, _, _ = self.p_mean_variance(model_output, xt, t)
        kl = mean_over_data(normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2.0)
        nll = -mean_over_data(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ------------------------------------------------------------------------------ sampling

    def _steps(self, progress):
        return tqdm(list(range(self.num_timesteps))[::-1], disable=not progress, desc="sampling", leave=False)

    @torch.no_grad()
    def ddpm_sample(self, model_fn, noise, progress=False, clip_x0=False, noise_fn=torch.randn_like):
        """Ancestral sampling from x_T = noise through every step of this (respaced) process.
        noise_fn(x) draws each step's noise (mass sampling draws it per sample, see sample.py)."""
        x = noise
        for i in self._steps(progress):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            output = model_fn(x, self.timestep_map.to(x.device)[t])
            mean, log_variance, _, _ = self.p_mean_variance(output, x, t, clip_x0)
            x = mean + (i > 0) * torch.exp(0.5 * log_variance) * noise_fn(x)
        return x

    @torch.no_grad()
    def ddim_sample(self, model_fn, noise, eta=0.0, progress=False, clip_x0=False, noise_fn=torch.randn_like):
        """DDIM (Song et al., 2021): deterministic for eta = 0, ancestral-like for eta = 1."""
        x = noise
        for i in self._steps(progress):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            _, _, x0, _ = self.p_mean_variance(model_fn(x, self.timestep_map.to(x.device)[t]), x, t, clip_x0)
            eps = (_at(self.sqrt_recip_alphas_cumprod, t, x) * x - x0) / _at(self.sqrt_recipm1_alphas_cumprod, t, x)
            alpha_bar, alpha_bar_prev = _at(self.alphas_cumprod, t, x), _at(self.alphas_cumprod_prev, t, x)
            sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
            x = x0 * alpha_bar_prev.sqrt() + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
            x = x + (i > 0) * sigma * noise_fn(x)
        return x


def guided(model, labels, cfg_scale, null_class):
    """model_fn for classifier-free guidance: eps = eps(x | null) + s (eps(x | y) - eps(x | null)),
    conditional and null inputs in one batch. We guide every channel; DiT guides only the first 3 of
    the 4 latent channels (an accident of its code, not a choice its paper makes), which would make
    guidance depend on the data's channel count. The learned variance is the conditional one."""
    def model_fn(x, t):
        if cfg_scale == 1.0:
            return model(x, t, labels)
        nulls = torch.full_like(labels, null_class)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, nulls]))
        cond, uncond = out.chunk(2, dim=0)
        channels = x.shape[-3]
        eps = uncond[..., :channels, :, :] + cfg_scale * (cond[..., :channels, :, :] - uncond[..., :channels, :, :])
        return torch.cat([eps, cond[..., channels:, :, :]], dim=-3)
    return model_fn
