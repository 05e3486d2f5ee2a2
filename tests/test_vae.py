"""VAE: the loss on reparameterize_kl, log_prob as the IWAE-k bound on iwae_bound, decoders that sample what
they model, and samples keyed by (seed, index) only."""

import math

import pytest
import torch

import genkern
from genkern.models import VAE


def make(**kwargs):
    torch.manual_seed(0)
    return VAE(**{"latent_dim": 4, "hidden": 32, **kwargs})


def digits_like(m, n=6):
    torch.manual_seed(1)
    return torch.randint(0, m.levels, (n, m.in_channels, *m.image_size))


@pytest.mark.parametrize(
    "kwargs", [{}, {"levels": 5}, {"arch": "conv", "hidden": 8}, {"arch": "conv", "levels": 5, "hidden": 8}]
)
def test_shapes_and_loss_is_the_negative_elbo_of_reparameterize_kl(kwargs):
    m = make(**kwargs)
    x = digits_like(m)
    mu, logvar = m.encode(x)
    assert mu.shape == logvar.shape == (6, 4)
    z, kl = genkern.reparameterize_kl(mu, logvar, seed=3)
    elbo = m.log_px_z(m.decode(z), x) - kl
    torch.testing.assert_close(m.loss(x, seed=3), -elbo.mean() / (m.dims * math.log(2)))
    m.loss(x, seed=3).backward()
    assert all(p.grad is not None for p in m.parameters())
    assert m.sample(3, seed=0).shape == (3, 1, 8, 8)


@pytest.mark.parametrize("k", [1, 5])
def test_log_prob_is_the_iwae_bound(k):
    m = make(levels=3)
    x = digits_like(m)
    mu, logvar = m.encode(x)
    zk = genkern.reparameterize(mu, logvar, seed=7, num_samples=k)
    log_px_z = torch.stack([m.log_px_z(m.decode(zk[i]), x) for i in range(k)])
    log_w = log_px_z + genkern.gaussian_log_prob(zk) - genkern.gaussian_log_prob(zk, mu, logvar)
    expected = torch.logsumexp(log_w, 0) - math.log(k)
    torch.testing.assert_close(m.log_prob(x, k, seed=7), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(m.bits_per_dim(x, k, seed=7), -expected / (m.dims * math.log(2)), rtol=1e-5, atol=1e-5)


def test_iwae_tightens_with_k_on_average():
    m = make(levels=2)
    with torch.no_grad():  # a decoder that depends on z strongly, so that the posterior matters
        for p in m.parameters():
            p.mul_(3)
    x = digits_like(m, 64)
    with torch.no_grad():
        elbo = torch.stack([m.log_prob(x, 1, seed=s) for s in range(8)]).mean()
        iwae = m.log_prob(x, 64, seed=0).mean()
    assert iwae > elbo


@pytest.mark.parametrize("levels", [2, 5])
def test_samples_follow_the_decoder(levels):
    """With the last decoder layer reduced to its bias, every pixel is drawn from softmax(bias) (or
    sigmoid): the frequencies over 4000 samples match within 4 standard errors."""
    m = make(levels=levels)
    last = m.decoder_net[-1]
    m.requires_grad_(False)
    torch.manual_seed(2)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.randn_like(last.bias) * 1.5)
    x = m.sample(4000, seed=5)
    if levels == 2:
        p = torch.sigmoid(last.bias).view(1, 8, 8)
        freq = x.double().mean(0)
    else:
        p = torch.softmax(last.bias.view(levels, 64), 0).view(levels, 1, 8, 8)  # decoder outputs (C, levels, H, W)
        freq = torch.stack([(x == k).double().mean(0) for k in range(levels)])
    se = (p * (1 - p) / 4000).sqrt().double() + 1e-4
    assert ((freq - p.double()).abs() / se).max() < 4.5


@pytest.mark.parametrize("levels", [2, 5])
def test_a_sample_depends_only_on_seed_and_index(levels):
    m = make(levels=levels)
    full = m.sample(150, seed=11)
    pieces = [m.sample(1, seed=11), m.sample(6, seed=11, first_sample=1), m.sample(70, seed=11, first_sample=7)]
    pieces.append(m.sample(73, seed=11, first_sample=77))
    assert torch.equal(torch.cat(pieces), full)
    assert not torch.equal(m.sample(150, seed=12), full)
    assert torch.equal(m.sample(0, seed=11), full[:0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="bernoulli"):
        VAE(levels=3, decoder="bernoulli")
    with pytest.raises(ValueError, match="arch"):
        VAE(arch="rnn")
    with pytest.raises(ValueError, match="divisible by 4"):
        VAE(arch="conv", image_size=6)
    m = make()
    with pytest.raises(ValueError, match="levels"):
        m.loss(torch.full((2, 1, 8, 8), 2), seed=0)
    with pytest.raises(ValueError, match="shape"):
        m.loss(torch.zeros(2, 64), seed=0)
    with pytest.raises(ValueError, match="k"):
        m.log_prob(torch.zeros(2, 1, 8, 8), 0, seed=0)
