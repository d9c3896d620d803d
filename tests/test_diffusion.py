"""Gaussian diffusion against closed forms."""

import math

import numpy as np
import pytest
import torch

from diffusion import Diffusion, discretized_gaussian_log_likelihood, guided


def test_schedule_and_cumulative_products():
    d = Diffusion()
    assert d.num_timesteps == 1000
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    for t in (0, 1, 10, 500, 999):
        assert d.alphas_cumprod[t].item() == pytest.approx(np.prod(1 - d.betas[: t + 1].numpy()), rel=1e-12)
    spaced = Diffusion().respaced(250)
    assert spaced.num_timesteps == 250 and spaced.timestep_map[0] == 0 and spaced.timestep_map[-1] == 999
    torch.testing.assert_close(spaced.alphas_cumprod, d.alphas_cumprod[spaced.timestep_map])


def test_q_sample_moments():
    d = Diffusion()
    torch.manual_seed(0)
    x0 = torch.tensor([0.7, -0.3]).view(1, 2, 1, 1).expand(200_000, 2, 1, 1)
    t = torch.full((200_000,), 300)
    xt = d.q_sample(x0, t, torch.randn_like(x0))
    alpha_bar = d.alphas_cumprod[300].item()
    mean, var = xt.mean(0).flatten(), xt.var(0).flatten()
    torch.testing.assert_close(mean, math.sqrt(alpha_bar) * torch.tensor([0.7, -0.3]), atol=6e-3, rtol=0)
    torch.testing.assert_close(var, torch.full((2,), 1 - alpha_bar), atol=1e-2, rtol=0)


def test_posterior_is_the_product_of_gaussians():
    # q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): precisions add, means weight by them.
    d = Diffusion()
    t = torch.tensor([1, 17, 400, 999])
    alpha, beta = 1 - d.betas[t], d.betas[t]
    alpha_bar_prev = d.alphas_cumprod[t - 1]
    precision = alpha / beta + 1 / (1 - alpha_bar_prev)
    torch.testing.assert_close(d.posterior_variance[t], 1 / precision)
    x0, xt = torch.randn(4, 1, 2, 2, dtype=torch.float64), torch.randn(4, 1, 2, 2, dtype=torch.float64)
    mean, variance, _ = d.q_posterior(x0, xt, t)
    view = (-1, 1, 1, 1)
    expected = (alpha.sqrt() / beta).view(view) * xt + (alpha_bar_prev.sqrt() / (1 - alpha_bar_prev)).view(view) * x0
    torch.testing.assert_close(mean, expected / precision.view(view))


def exact_model(diffusion, c, learn_sigma=True):
    """The noise that takes c to x_t, in closed form: the ideal model for a data set of one point."""
    def model_fn(x, t):
        alpha_bar = diffusion.alphas_cumprod[t].float().view(-1, *([1] * (x.dim() - 1)))
        eps = (x - alpha_bar.sqrt() * c) / (1 - alpha_bar).sqrt()
        return torch.cat([eps, torch.rand_like(eps) * 2 - 1], dim=-3) if learn_sigma else eps
    return model_fn


@pytest.mark.parametrize("shape", [(3, 4, 4), (2, 3, 4, 4)])  # an image and a 2-frame video
def test_samplers_recover_a_single_data_point(shape):
    torch.manual_seed(0)
    base = Diffusion()
    c = torch.rand(1, *shape) * 1.6 - 0.8
    noise = torch.randn(5, *shape)
    for learn_sigma in (True, False):
        model_fn = exact_model(base, c, learn_sigma)
        diffusion = Diffusion(learn_sigma=learn_sigma)
        ddpm = diffusion.respaced(250).ddpm_sample(model_fn, noise)
        ddim = diffusion.respaced(50).ddim_sample(model_fn, noise)
        ddim_eta = diffusion.respaced(50).ddim_sample(model_fn, noise, eta=1.0)
        for out in (ddpm, ddim, ddim_eta):
            assert (out - c).abs().max().item() < 1e-3


def test_guidance():
    def model(x, t, y):  # a class-dependent output, 2 x 3 channels
        return torch.cat([x + y.view(-1, 1, 1, 1).float(), x * 0 + 0.5 * y.view(-1, 1, 1, 1)], dim=1)
    x, t, y = torch.randn(2, 3, 4, 4), torch.tensor([5, 6]), torch.tensor([1, 2])
    torch.testing.assert_close(guided(model, y, 1.0, null_class=9)(x, t), model(x, t, y))
    out = guided(model, y, 4.0, null_class=9)(x, t)
    cond, null = model(x, t, y), model(x, t, torch.tensor([9, 9]))
    torch.testing.assert_close(out[:, :3], null[:, :3] + 4.0 * (cond[:, :3] - null[:, :3]))
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])


def test_discretized_likelihood_is_a_distribution():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64).view(256, 1)
    mean = torch.tensor([[-0.9, 0.0, 0.37, 1.2]], dtype=torch.float64)
    log_scale = torch.log(torch.tensor([[0.05, 0.3, 0.01, 0.5]], dtype=torch.float64))
    total = discretized_gaussian_log_likelihood(levels, mean, log_scale).exp().sum(0)
    torch.testing.assert_close(total, torch.ones(4, dtype=torch.float64), atol=1e-3, rtol=0)


def test_hybrid_loss_trains_variance_only_through_vb():
    d = Diffusion()
    torch.manual_seed(0)
    x0 = torch.rand(6, 3, 4, 4) * 2 - 1
    t = torch.tensor([0, 1, 2, 100, 500, 999])
    output = torch.randn(6, 6, 4, 4, requires_grad=True)
    losses = d.training_losses(lambda xt, tt: output, x0, t)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert (losses["vb"] > 0).all()
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), output, retain_graph=True)
    assert torch.equal(grad_vb[:, :3], torch.zeros_like(grad_vb[:, :3]))  # the mean is held fixed
    assert grad_vb[:, 3:].abs().sum() > 0
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), output)
    assert torch.equal(grad_mse[:, 3:], torch.zeros_like(grad_mse[:, 3:]))


def test_exact_model_minimises_the_noise_loss():
    d = Diffusion(learn_sigma=False)
    c = torch.rand(1, 3, 4, 4)
    t = torch.randint(0, 1000, (8,))
    losses = d.training_losses(exact_model(d, c, learn_sigma=False), c.expand(8, -1, -1, -1), t)
    assert losses["loss"].max().item() < 1e-8
