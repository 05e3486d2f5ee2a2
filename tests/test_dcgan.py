"""DCGAN: shapes, the non-saturating generator loss, the discriminator loss, samples keyed by (seed, index)."""

import pytest
import torch
import torch.nn.functional as F

from genkern.models import DCGAN


def make(**kwargs):
    torch.manual_seed(0)
    return DCGAN(**{"latent_dim": 8, "channels": 16, "levels": 17, **kwargs})


@pytest.mark.parametrize("size", [8, 16, 28])
def test_shapes(size):
    m = make(image_size=size)
    z = torch.randn(5, 8)
    images = m.generate(z)
    assert images.shape == (5, 1, size, size) and images.abs().max() <= 1
    assert m.discriminate(images).shape == (5,)
    assert m.sample(3, seed=0).shape == (3, 1, size, size)


def test_losses():
    m = make()
    z, real = torch.randn(6, 8), torch.rand(6, 1, 8, 8) * 2 - 1
    fake_logits = m.discriminate(m.generate(z))
    torch.testing.assert_close(m.generator_loss(z), -F.logsigmoid(fake_logits).mean())  # -log D(G(z))
    d = -F.logsigmoid(m.discriminate(real)).mean() - torch.log1p(-torch.sigmoid(fake_logits)).mean()
    torch.testing.assert_close(m.discriminator_loss(real, z), d)
    m.discriminator_loss(real, z).backward()
    assert all(p.grad is None for p in m.generator.parameters())
    assert all(p.grad is not None for p in m.discriminator.parameters())


def test_the_generator_loss_does_not_saturate():
    """Where D rejects the fakes confidently, log(1 - D(G(z))) has a vanishing gradient; -log D(G(z)) not."""
    m = make()
    with torch.no_grad():
        m.discriminator[-1].bias.fill_(-30.0)
    m.generator_loss(torch.randn(4, 8)).backward()
    assert m.generator[0].weight.grad.abs().sum() > 1e-3


def test_a_sample_depends_only_on_seed_and_index():
    m = make()
    full = m.sample(140, seed=3)
    parts = [m.sample(3, seed=3), m.sample(64, seed=3, first_sample=3), m.sample(73, seed=3, first_sample=67)]
    assert torch.equal(torch.cat(parts), full)
    assert full.dtype == torch.int64 and 0 <= full.min() and full.max() <= 16
    assert not torch.equal(m.sample(140, seed=4), full)


def test_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        DCGAN(image_size=7)
    with pytest.raises(ValueError, match="latent_dim"):
        DCGAN(latent_dim=0)
