"""The diffusion model layer: genkern.models.UNet, the DDPM/DDIM samplers and training_loss.

The samplers are checked with analytic denoisers (the exact E[eps | x_t] of Gaussian or point-mass data),
whose samples have known answers; the whole stack is checked by training a small U-Net on scikit-learn's
8x8 digits and sampling it (the slow test at the end).
"""

import copy
import math
import time

import pytest
import torch
from conftest import device_for
from png_writer import SIGNATURE, encode_png, image_grid, save_png

import genkern
from genkern.diffusion import reference as ref
from genkern.diffusion.samplers import DDIMSampler, DDPMSampler
from genkern.diffusion.schedules import NoiseSchedule
from genkern.diffusion.training import training_loss
from genkern.models import UNet
from genkern.models.unet import timestep_embedding

SCHEDULE = NoiseSchedule("linear")
SPACINGS = ["leading", "trailing", "linspace"]


class GaussianDenoiser:
    """The exact denoiser of data x0 ~ N(mean, std^2) per element: with x_t = a x0 + b eps (a = sqrt(ab_t),
    b = sqrt(1 - ab_t)), E[eps | x_t] = b (x_t - a mean) / (a^2 std^2 + b^2); std = 0 is a point mass.

    With `class_means` (and `class_stds`), the mean (and std) are those of class_labels (class
    len(class_means) - 1 being the null class); `prediction_type` converts the output to v or x0. Records the
    timesteps it is called with."""

    def __init__(self, schedule, mean=0.0, std=0.0, class_means=None, class_stds=None, prediction_type="epsilon"):
        self.alphas_cumprod = schedule.alphas_cumprod
        self.mean, self.std, self.class_means, self.class_stds = mean, std, class_means, class_stds
        self.prediction_type = prediction_type
        self.calls = []

    def __call__(self, x, t, class_labels=None):
        self.calls.append(t.clone())
        ab = self.alphas_cumprod.to(x.device)[t].reshape(-1, *[1] * (x.dim() - 1))
        a, b = ab.sqrt(), (1 - ab).sqrt()
        mean, std = self.mean, self.std
        if self.class_means is not None:
            mean = self.class_means.to(x.device, torch.float64)[class_labels].reshape(-1, *[1] * (x.dim() - 1))
        if self.class_stds is not None:
            std = self.class_stds.to(x.device, torch.float64)[class_labels].reshape(-1, *[1] * (x.dim() - 1))
        xt = x.double()
        eps = b * (xt - a * mean) / (a * a * std**2 + b * b)
        x0 = (xt - b * eps) / a
        out = {"epsilon": eps, "v_prediction": a * eps - b * x0, "sample": x0}[self.prediction_type]
        return out.to(x.dtype)


# ============================================================================================ UNet


@pytest.mark.parametrize("size,mults,attention", [(8, (1, 2), (4,)), (16, (1, 2, 2), (8,)), (32, (1, 2, 2, 2), (8, 4))])
def test_unet_shapes(size, mults, attention):
    torch.manual_seed(0)
    model = UNet(
        in_channels=3,
        base_channels=16,
        channel_mults=mults,
        num_res_blocks=2,
        attention_resolutions=attention,
        image_size=size,
    )
    x, t = torch.randn(2, 3, size, size), torch.tensor([0, 999])
    out = model(x, t)
    assert out.shape == x.shape
    assert not out.any()  # the final conv starts at zero: the untrained model predicts 0
    out.sum().backward()  # its weights still get gradients (the zero init does not cut the graph)
    assert model.output[-1].weight.grad.abs().sum() > 0


def test_unet_without_image_size_takes_any_multiple():
    model = UNet(base_channels=8, channel_mults=(1, 2, 2))
    for size in (8, 12, 32):
        assert model(torch.randn(1, 1, size, size), 10).shape == (1, 1, size, size)


def perturbed(model):
    """The model with its zero-initialised layers made non-zero, so that inputs reach the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_unet_class_conditioning():
    model = perturbed(UNet(base_channels=8, num_classes=10))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 500, 900])
    a = model(x, t, class_labels=torch.tensor([0, 1, 2]))
    b = model(x, t, class_labels=torch.tensor([3, 1, 2]))
    assert not torch.equal(a[0], b[0]) and torch.equal(a[1:], b[1:])
    # No labels: the null class num_classes, the unconditional model of classifier-free guidance.
    torch.testing.assert_close(model(x, t), model(x, t, class_labels=torch.full((3,), 10)))


def test_unet_learned_variance_doubles_the_output():
    assert UNet(in_channels=3, learned_variance=True, base_channels=8)(torch.randn(2, 3, 8, 8), 1).shape == (2, 6, 8, 8)
    model = UNet(in_channels=3, out_channels=1, learned_variance=True, base_channels=8)
    assert model.out_channels == 2 and model(torch.randn(2, 3, 8, 8), 1).shape == (2, 2, 8, 8)


def test_unet_timestep_forms_agree():
    model = perturbed(UNet(base_channels=8))
    x = torch.randn(2, 1, 8, 8)
    expected = model(x, torch.tensor([7, 7]))
    for t in (7, 7.0, torch.tensor(7), torch.tensor([7.0, 7.0]), torch.tensor([7, 7], dtype=torch.int32)):
        torch.testing.assert_close(model(x, t), expected)
    assert not torch.allclose(model(x, 8), expected)


def test_timestep_embedding():
    t = torch.tensor([0, 1, 10, 999])
    emb = timestep_embedding(t, 32)
    assert emb.shape == (4, 32)
    # sin then cos of t f_k, f_0 = 1 and f_k = 10000^(-k/16)
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(16), torch.ones(16)]))
    torch.testing.assert_close(emb[:, 0], torch.sin(t.float()))
    torch.testing.assert_close(emb[:, 16 + 15], torch.cos(t * 10000 ** (-15 / 16)))
    # Each (sin, cos) pair has norm 1, and nearby timesteps stay apart.
    torch.testing.assert_close(emb.norm(dim=1), torch.full((4,), 4.0))
    assert torch.cdist(emb, emb).add(torch.eye(4)).min() > 0.5
    assert timestep_embedding(t, 7).shape == (4, 7) and not timestep_embedding(t, 7)[:, -1].any()
    torch.testing.assert_close(timestep_embedding(torch.tensor([2.5]), 8)[0, 0], torch.tensor(math.sin(2.5)))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"in_channels": 0}, ValueError, "in_channels"),
        ({"in_channels": 1.0}, TypeError, "in_channels"),
        ({"out_channels": -1}, ValueError, "out_channels"),
        ({"base_channels": 12}, ValueError, "groups"),
        ({"channel_mults": ()}, ValueError, "channel_mults"),
        ({"channel_mults": 2}, TypeError, "channel_mults"),
        ({"channel_mults": (1, 0)}, ValueError, "channel_mults"),
        ({"num_res_blocks": 0}, ValueError, "num_res_blocks"),
        ({"attention_resolutions": (4,)}, ValueError, "image_size"),
        ({"attention_resolutions": (3,), "image_size": 8}, ValueError, "attention_resolutions"),
        ({"image_size": 9}, ValueError, "image_size"),
        ({"num_classes": 0}, ValueError, "num_classes"),
        ({"learned_variance": 1}, TypeError, "learned_variance"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"dropout": "0.1"}, TypeError, "dropout"),
        ({"groups": 0}, ValueError, "groups"),
    ],
)
def test_unet_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        UNet(**kwargs)


def test_unet_bad_inputs():
    model = UNet(base_channels=8, channel_mults=(1, 2, 2), num_classes=3)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(2, 3, 8, 8), 1)
    with pytest.raises(ValueError, match="divisible by"):
        model(torch.randn(2, 1, 6, 8), 1)
    with pytest.raises(TypeError, match="floating"):
        model(x.long(), 1)
    with pytest.raises(ValueError, match="t must have shape"):
        model(x, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="t must be"):
        model(x, "1")
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 3\]"):
        model(x, 1, class_labels=torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="class_labels"):
        model(x, 1, class_labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="unconditional"):
        UNet(base_channels=8)(x, 1, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="image_size"):
        UNet(base_channels=8, image_size=16)(x, 1)


# ============================================================================================ samplers


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_lands_on_a_point_mass(spacing, prediction_type):
    model = GaussianDenoiser(SCHEDULE, mean=0.7, prediction_type=prediction_type)
    sampler = DDIMSampler(SCHEDULE, prediction_type=prediction_type)
    x = sampler.sample(model, (4, 2, 3), 20, seed=0, spacing=spacing)
    torch.testing.assert_close(x, torch.full((4, 2, 3), 0.7), atol=1e-4, rtol=0)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_sampler_passes_the_schedule_timesteps(spacing):
    model = GaussianDenoiser(SCHEDULE, mean=0.7)
    DDIMSampler(SCHEDULE).sample(model, (3, 4), 10, seed=0, spacing=spacing, steps_offset=0)
    timesteps, _ = SCHEDULE.timesteps(10, spacing)
    assert len(model.calls) == 10
    for t, expected in zip(model.calls, timesteps):
        assert t.dtype == torch.int64 and t.shape == (3,) and (t == expected).all()


def test_default_number_of_steps():
    model = GaussianDenoiser(SCHEDULE)
    DDIMSampler(SCHEDULE).sample(model, (1, 2), seed=0)
    assert len(model.calls) == 50
    small = NoiseSchedule("linear", num_train_timesteps=30)
    model = GaussianDenoiser(small)
    DDPMSampler(small).sample(model, (1, 2), seed=0)
    assert len(model.calls) == 30


def test_ddpm_lands_on_a_point_mass():
    model = GaussianDenoiser(SCHEDULE, mean=-0.3)
    x = DDPMSampler(SCHEDULE).sample(model, (2, 3, 4), seed=0)  # every one of the 1000 steps
    torch.testing.assert_close(x, torch.full((2, 3, 4), -0.3), atol=1e-4, rtol=0)
    x = DDPMSampler(SCHEDULE).sample(model, (2, 3, 4), 25, seed=0, spacing="trailing")  # strided
    torch.testing.assert_close(x, torch.full((2, 3, 4), -0.3), atol=1e-4, rtol=0)


# Samples of N(0.5, 0.6^2) data in 100 steps. Their std falls short of 0.6 by the discretisation error of
# each sampler (measured on 200k samples: 0.584 for DDIM at eta = 0, 0.567 for DDPM's fixed_small, whose
# x0_hat = E[x0 | x_t] is not a draw of x0, 0.607 for fixed_large); 4096 samples add a standard error of
# 0.0066 to the std and 0.0094 to the mean. The tolerances hold those errors with a margin of 4 standard errors.
@pytest.mark.parametrize(
    "sampler,kwargs,expected_std",
    [
        (DDIMSampler(SCHEDULE), {}, 0.584),
        (DDIMSampler(SCHEDULE), {"eta": 1.0}, 0.567),
        (DDPMSampler(SCHEDULE), {}, 0.567),
        (DDPMSampler(SCHEDULE, variance_type="fixed_large"), {}, 0.607),
    ],
    ids=["ddim-eta0", "ddim-eta1", "ddpm-small", "ddpm-large"],
)
def test_samples_of_gaussian_data_have_its_moments(sampler, kwargs, expected_std):
    x = sampler.sample(GaussianDenoiser(SCHEDULE, mean=0.5, std=0.6), (4096,), 100, seed=3, **kwargs)
    assert abs(x.mean().item() - 0.5) < 0.04
    assert abs(x.std().item() - expected_std) < 0.027


def test_ddim_at_eta_one_is_ddpm():
    """sigma at eta = 1 is DDPM's fixed_small std, and both draw the same noise at each step (Song et al. 2021)."""
    model = GaussianDenoiser(SCHEDULE, mean=0.5, std=0.6)
    a = DDIMSampler(SCHEDULE).sample(model, (3, 5), 20, eta=1.0, seed=8, spacing="linspace")
    b = DDPMSampler(SCHEDULE).sample(model, (3, 5), 20, seed=8, spacing="linspace")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (DDIMSampler(SCHEDULE), {}),
        lambda: (DDIMSampler(SCHEDULE), {"eta": 0.5}),
        lambda: (DDPMSampler(SCHEDULE), {}),
    ],
    ids=["ddim", "ddim-eta", "ddpm"],
)
def test_samples_depend_only_on_the_seed(make):
    sampler, kwargs = make()
    model = GaussianDenoiser(SCHEDULE, mean=0.5, std=0.6)
    a = sampler.sample(model, (2, 5), 10, seed=1, **kwargs)
    assert torch.equal(a, sampler.sample(model, (2, 5), 10, seed=1, **kwargs))
    assert not torch.allclose(a, sampler.sample(model, (2, 5), 10, seed=2, **kwargs))
    torch.manual_seed(0)
    b = sampler.sample(model, (2, 5), 10, **kwargs)  # seed None: drawn from torch's generator
    torch.manual_seed(0)
    assert torch.equal(b, sampler.sample(model, (2, 5), 10, **kwargs))


def test_a_reused_sampler_equals_a_fresh_one():
    """A sampler keeps its last loop (device timestep rows, checked step) for the next call with the same key:
    every argument that changes the loop must change the key, in any order of calls."""
    model = GaussianDenoiser(SCHEDULE, mean=0.5, std=0.6)
    other = GaussianDenoiser(SCHEDULE, mean=-0.2, std=0.3)
    calls = [  # each call changes one argument of the one before
        (model, (2, 5), 10, {"seed": 1}),
        (model, (2, 5), 10, {"seed": 2}),
        (model, (2, 5), 12, {"seed": 2}),
        (model, (3, 5), 12, {"seed": 2}),
        (other, (3, 5), 12, {"seed": 2}),
        (other, (3, 5), 12, {"seed": 2, "spacing": "leading", "steps_offset": 0}),
        (other, (3, 5), 12, {"seed": 2, "spacing": "leading", "steps_offset": 1}),
        (other, (3, 5), 12, {"seed": 2, "spacing": "leading", "steps_offset": 1, "guidance_scale": 2.0}),
        (other, (3, 5), 12, {"seed": 2, "spacing": "leading", "steps_offset": 1, "dtype": torch.float64}),
        (model, (2, 5), 10, {"seed": 1}),
        (model, (2, 5), 10, {"seed": 1, "eta": 0.5}),
        (model, (2, 5), 10, {"seed": 2, "eta": 0.5}),
    ]
    for make in (DDIMSampler, DDPMSampler):
        reused = make(SCHEDULE)
        for m, shape, steps, kwargs in calls:
            if make is DDPMSampler:
                kwargs = {k: v for k, v in kwargs.items() if k != "eta"}
            expected = make(SCHEDULE).sample(m, shape, steps, **kwargs)
            assert torch.equal(reused.sample(m, shape, steps, **kwargs), expected), (make.__name__, shape, kwargs)


def test_ddim_at_eta_zero_depends_on_x_T_only():
    model = GaussianDenoiser(SCHEDULE, mean=0.5, std=0.6)
    x_T = torch.randn(3, 4, dtype=torch.float64)
    a = DDIMSampler(SCHEDULE).sample(model, (3, 4), 10, seed=1, x_T=x_T)
    assert a.dtype == torch.float32
    assert torch.equal(a, DDIMSampler(SCHEDULE).sample(model, (3, 4), 10, seed=2, x_T=x_T))
    assert not torch.equal(a, DDIMSampler(SCHEDULE).sample(model, (3, 4), 10, seed=1))


@pytest.mark.parametrize("backend", genkern.backends())
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_sampler_noise_follows_the_stream_contract(kind, backend):
    """x_T = the stream at offset 0; step i draws at offset i + 1: the samplers equal this hand-written loop
    of reference steps, on every backend."""
    device = device_for(backend)
    model = GaussianDenoiser(SCHEDULE, mean=0.5, std=0.6)
    shape, seed = (2, 3, 4), 5
    timesteps, prev = SCHEDULE.timesteps(8, "trailing")
    x = genkern.random.randn(shape, seed=seed, offset=0)
    for i, (t, p) in enumerate(zip(timesteps.tolist(), prev.tolist())):
        out = model(x, torch.full((2,), t))
        if kind == "ddim":
            x, _ = ref.ddim_step(out, t, x, SCHEDULE, prev_t=p, eta=0.8, seed=seed, offset=i + 1)
        else:
            x, _ = ref.ddpm_step(out, t, x, SCHEDULE, prev_t=p, seed=seed, offset=i + 1)
    if kind == "ddim":
        sampler, kwargs = DDIMSampler(SCHEDULE, backend=backend), {"eta": 0.8}
    else:
        sampler, kwargs = DDPMSampler(SCHEDULE, backend=backend), {}
    got = sampler.sample(model, shape, 8, seed=seed, spacing="trailing", device=device, **kwargs)
    assert got.device.type == device.type
    torch.testing.assert_close(got.cpu(), x, atol=1e-5, rtol=1e-5)


def guided_setup():
    # Classes 0 and 1 put all their mass on 1.0 and -2.0; the null class 2 on 0.5.
    model = GaussianDenoiser(SCHEDULE, class_means=torch.tensor([1.0, -2.0, 0.5]))
    labels = torch.tensor([0, 1, 1])
    guided_kwargs = {"class_labels": torch.cat([torch.full_like(labels, 2), labels])}
    return model, labels, guided_kwargs


@pytest.mark.parametrize("sampler", [DDIMSampler(SCHEDULE), DDPMSampler(SCHEDULE)], ids=["ddim", "ddpm"])
def test_guidance_scale_one_is_the_conditional_model(sampler):
    model, labels, guided_kwargs = guided_setup()
    conditional = sampler.sample(model, (3, 2, 2), 20, seed=4, model_kwargs={"class_labels": labels})
    model.calls.clear()
    guided = sampler.sample(model, (3, 2, 2), 20, seed=4, guidance_scale=1.0, model_kwargs=guided_kwargs)
    torch.testing.assert_close(guided, conditional, atol=1e-5, rtol=1e-5)
    assert all(t.shape == (6,) and (t[:3] == t[3:]).all() for t in model.calls)  # [t, t] for [x, x]


def test_guidance_extrapolates_from_the_unconditional_model():
    # eps is affine in the data mean, so u + s (c - u) is the eps of mean null + s (class - null).
    model, labels, guided_kwargs = guided_setup()
    x = DDIMSampler(SCHEDULE).sample(model, (3, 2, 2), 20, seed=4, guidance_scale=3.0, model_kwargs=guided_kwargs)
    expected = (0.5 + 3.0 * (torch.tensor([1.0, -2.0, -2.0]) - 0.5)).reshape(3, 1, 1).expand(3, 2, 2)
    torch.testing.assert_close(x, expected, atol=1e-4, rtol=0)


def test_guided_sampler_follows_the_reference_steps():
    model, labels, guided_kwargs = guided_setup()
    # With equal stds, c - u would be constant per sample, and guidance rescale would change nothing.
    model.class_stds = torch.tensor([0.3, 0.6, 1.0])
    shape, seed = (3, 2, 2), 6
    timesteps, prev = SCHEDULE.timesteps(10, "linspace")
    x = genkern.random.randn(shape, seed=seed, offset=0)
    for i, (t, p) in enumerate(zip(timesteps.tolist(), prev.tolist())):
        out = model(torch.cat([x, x]), torch.full((6,), t), **guided_kwargs)
        x, _ = ref.ddim_step(
            out, t, x, SCHEDULE, prev_t=p, eta=0.5, seed=seed, offset=i + 1, guidance_scale=2.5, guidance_rescale=0.7
        )
    got = DDIMSampler(SCHEDULE).sample(
        model,
        shape,
        10,
        eta=0.5,
        seed=seed,
        spacing="linspace",
        guidance_scale=2.5,
        guidance_rescale=0.7,
        model_kwargs=guided_kwargs,
    )
    torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-5)
    plain = DDIMSampler(SCHEDULE).sample(
        model, shape, 10, eta=0.5, seed=seed, spacing="linspace", guidance_scale=2.5, model_kwargs=guided_kwargs
    )
    assert not torch.allclose(got, plain)


def test_sampler_thresholding_options_reach_the_step():
    # A point mass at 3.0 clipped to [-1, 1] at every step lands on 1.0.
    model = GaussianDenoiser(SCHEDULE, mean=3.0)
    x = DDIMSampler(SCHEDULE, clip_sample=1.0).sample(model, (2, 3), 20, seed=0)
    torch.testing.assert_close(x, torch.ones(2, 3), atol=1e-4, rtol=0)
    x = DDPMSampler(SCHEDULE, dynamic_threshold=(0.9, 2.0)).sample(model, (2, 3), 20, seed=0)
    torch.testing.assert_close(x, torch.ones(2, 3), atol=1e-4, rtol=0)  # clamp(3, -2, 2) / 2


def test_sampler_learned_variance():
    # The variance channels at -1 give fixed_small's variance: the same run as fixed_small.
    base = GaussianDenoiser(SCHEDULE, mean=0.5, std=0.6)

    def learned(x, t):
        return torch.cat([base(x, t), -torch.ones_like(x)], dim=1)

    shape = (2, 3, 4, 4)
    a = DDPMSampler(SCHEDULE, variance_type="learned_range").sample(learned, shape, 10, seed=1)
    b = DDPMSampler(SCHEDULE).sample(base, shape, 10, seed=1)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda s, m: s.sample(m, (2, 3), 5, cuda_graph=True), ValueError, "CUDA"),
        (lambda s, m: s.sample(m, (2, 3), 5, cuda_graph=1), TypeError, "cuda_graph"),
        (lambda s, m: s.sample(m, (), 5), ValueError, "shape"),
        (lambda s, m: s.sample(m, 3, 5), TypeError, "shape"),
        (lambda s, m: s.sample(m, (2, 0), 5), ValueError, "shape"),
        (lambda s, m: s.sample(m, (2, 3), 0), ValueError, "num_steps"),
        (lambda s, m: s.sample(m, (2, 3), 5, x_T=torch.zeros(2, 4)), ValueError, "x_T"),
        (lambda s, m: s.sample(m, (2, 3), 5, eta=-1.0), ValueError, "eta"),
        (lambda s, m: s.sample(m, (2, 3), 5, eta=None), TypeError, "eta"),
        (lambda s, m: s.sample(m, (2, 3), 5, spacing="even"), ValueError, "spacing"),
        (lambda s, m: s.sample(m, (2, 3), 5, model_kwargs=[1]), TypeError, "model_kwargs"),
        (lambda s, m: s.sample(m, (2, 3), 5, guidance_rescale=0.5), ValueError, "guidance_rescale"),
        (lambda s, m: s.sample(m, (2, 3), 5, dtype=torch.int32), TypeError, "dtype"),
        (lambda s, m: s.sample(m, (2, 3), 5, seed=-1), ValueError, "seed"),
        (lambda s, m: s.sample("model", (2, 3), 5), TypeError, "model"),
    ],
)
def test_sampler_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(DDIMSampler(SCHEDULE), GaussianDenoiser(SCHEDULE))


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: DDIMSampler("linear"), TypeError, "schedule"),
        (lambda: DDIMSampler(SCHEDULE, prediction_type="eps"), ValueError, "prediction_type"),
        (lambda: DDPMSampler(SCHEDULE, variance_type="learned"), ValueError, "variance_type"),
        (lambda: DDPMSampler(SCHEDULE, clip_sample=1.0, dynamic_threshold=(0.9, 2.0)), ValueError, "at most one"),
        (lambda: DDPMSampler(SCHEDULE, clip_sample=-1.0), ValueError, "clip_sample"),
        (lambda: DDIMSampler(SCHEDULE, use_clipped_model_output=1), TypeError, "use_clipped_model_output"),
        (lambda: DDIMSampler(SCHEDULE, backend=1), TypeError, "backend"),
    ],
)
def test_sampler_constructor_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize(
    "make",
    [
        lambda: (DDIMSampler(SCHEDULE), {}),
        lambda: (DDIMSampler(SCHEDULE), {"eta": 1.0}),
        lambda: (DDPMSampler(SCHEDULE), {}),
    ],
    ids=["ddim", "ddim-eta", "ddpm"],
)
def test_cuda_graph_replay_equals_eager(make):
    sampler, kwargs = make()
    torch.manual_seed(0)
    model = perturbed(UNet(base_channels=16, num_classes=3)).cuda().eval()
    shape = (4, 1, 8, 8)

    def run(seed, labels, cuda_graph):
        return sampler.sample(
            model,
            shape,
            10,
            seed=seed,
            device="cuda",
            guidance_scale=2.0,
            cuda_graph=cuda_graph,
            model_kwargs={"class_labels": torch.cat([torch.full_like(labels, 3), labels])},
            **kwargs,
        )

    labels = torch.tensor([0, 1, 2, 0], device="cuda")
    for seed, lab in [(1, labels), (1, labels.flip(0)), (2, labels)]:  # new labels, then a new seed and x_T
        graphed = run(seed, lab, True)
        torch.testing.assert_close(graphed, run(seed, lab, False), atol=1e-5, rtol=1e-5)
    # Without per-step noise a capture serves every seed; with it, each seed needs its own.
    assert len(sampler._graphs) == (1 if sampler.kind == "ddim" and not kwargs else 2)
    sampler.clear_cuda_graphs()
    assert not sampler._graphs


# ============================================================================================ training_loss


def small_batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([3, 0, 250, 999])


def test_training_loss_is_the_fused_ops_around_the_model():
    model = perturbed(UNet(base_channels=8, num_classes=3))
    x0, t = small_batch()
    labels = torch.tensor([0, 1, 2, 3])
    loss = training_loss(
        model,
        x0,
        SCHEDULE,
        t=t,
        seed=7,
        offset=2,
        prediction_type="v_prediction",
        snr_gamma=5.0,
        model_kwargs={"class_labels": labels},
    )
    x_t = ref.q_sample(x0, t, SCHEDULE, seed=7, offset=2)
    expected = ref.diffusion_loss(
        model(x_t, t, class_labels=labels),
        x0,
        t,
        SCHEDULE,
        seed=7,
        offset=2,
        prediction_type="v_prediction",
        snr_gamma=5.0,
    )
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_training_loss_draws_timesteps_and_noise_from_torch_generator():
    model = perturbed(UNet(base_channels=8))
    x0, _ = small_batch()
    torch.manual_seed(3)
    a = training_loss(model, x0, SCHEDULE)
    torch.manual_seed(3)
    assert torch.equal(a, training_loss(model, x0, SCHEDULE))
    assert not torch.equal(a, training_loss(model, x0, SCHEDULE))


def test_training_loss_condition_dropout():
    model = perturbed(UNet(base_channels=8, num_classes=3))
    x0, t = small_batch()
    labels = torch.tensor([0, 1, 2, 0])
    dropped = training_loss(model, x0, SCHEDULE, t=t, seed=1, model_kwargs={"class_labels": labels}, cond_drop_prob=1.0)
    unconditional = training_loss(model, x0, SCHEDULE, t=t, seed=1, model_kwargs={"class_labels": torch.full((4,), 3)})
    assert torch.equal(dropped, unconditional)
    kept = training_loss(model, x0, SCHEDULE, t=t, seed=1, model_kwargs={"class_labels": labels})
    assert not torch.equal(kept, unconditional)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        training_loss(model, x0, SCHEDULE, model_kwargs={"class_labels": labels}, cond_drop_prob=1.5)
    with pytest.raises(ValueError, match="class_labels"):
        training_loss(model, x0, SCHEDULE, cond_drop_prob=0.1)
    with pytest.raises(ValueError, match="num_classes"):
        training_loss(UNet(base_channels=8), x0, SCHEDULE, model_kwargs={"class_labels": labels}, cond_drop_prob=0.1)


def test_training_loss_bad_arguments():
    model = UNet(base_channels=8)
    x0, t = small_batch()
    with pytest.raises(TypeError, match="model"):
        training_loss(None, x0, SCHEDULE)
    with pytest.raises(TypeError, match="x0"):
        training_loss(model, x0.numpy(), SCHEDULE)
    with pytest.raises(TypeError, match="schedule"):
        training_loss(model, x0, "linear")
    with pytest.raises(TypeError, match="model_kwargs"):
        training_loss(model, x0, SCHEDULE, model_kwargs=[])
    with pytest.raises(ValueError, match="prediction_type"):
        training_loss(model, x0, SCHEDULE, t=t, prediction_type="eps")


# ============================================================================================ PNG writer


def test_png_writer(tmp_path):
    import zlib

    images = torch.linspace(-1, 1, 6 * 4).reshape(6, 1, 2, 2)
    grid = image_grid(images, nrow=3, pad=1)
    assert grid.shape == (2 * 3 + 1, 3 * 3 + 1) and grid[0].eq(0).all()
    assert grid[1, 1] == 0 and grid[-2, -2] == 255
    data = encode_png(grid)
    assert data.startswith(SIGNATURE) and data[12:16] == b"IHDR"
    idat = data[data.index(b"IDAT") + 4 : data.index(b"IEND") - 8]
    rows = torch.frombuffer(bytearray(zlib.decompress(idat)), dtype=torch.uint8).reshape(7, 11)
    assert rows[:, 0].eq(0).all() and torch.equal(rows[:, 1:], grid)
    save_png(tmp_path / "grid.png", grid)
    assert (tmp_path / "grid.png").read_bytes() == data


# ============================================================================================ digits


@pytest.mark.slow
def test_train_and_sample_digits(tmp_path):
    """End to end on real data: a small U-Net trained with training_loss on scikit-learn's 8x8 digits (1797
    images), then DDIM-sampled; the samples must look like the data by their pixel statistics and nearest
    neighbours. The PNG grid of the samples is left in tmp_path.

    Measured on 2 cores (the margins below are relative to these): loss 0.54 (first 20 steps) -> 0.16-0.17
    (last 50), ratio 0.30-0.32; samples' mean -0.34 to -0.36 and std 0.74-0.75 against the data's -0.389 and
    0.752; mean distance to the nearest training image 2.8-3.3 for samples, 6.26 for noise images (and
    2.15 for training images, to their nearest other one)."""
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn (a test extra) provides the digits")
    steps, batch, ema_decay = 500, 64, 0.99
    torch.manual_seed(0)
    data = torch.tensor(datasets.load_digits().images, dtype=torch.float32)[:, None] / 8 - 1  # 0..16 -> [-1, 1]
    schedule = NoiseSchedule("cosine")  # better than linear on 8x8 images: linear destroys them too early
    model = UNet(in_channels=1, base_channels=32, channel_mults=(1, 2))
    # The weights' moving average samples better than the last (noisy) iterate at this short training.
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        loss = training_loss(model, data[torch.randint(0, len(data), (batch,))], schedule)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for average, weight in zip(ema.parameters(), model.parameters()):
            average.lerp_(weight.detach(), 1 - ema_decay)
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-50:]) / 50
    print(
        f"\ndigits: {steps} steps in {time.perf_counter() - start:.1f} s, loss {first:.3f} (first 20 steps) -> "
        f"{last:.3f} (last 50)"
    )
    assert last < 0.5 * first  # measured 0.30-0.32

    start = time.perf_counter()
    samples = DDIMSampler(schedule).sample(ema.eval(), (64, 1, 8, 8), 50, seed=0).clamp(-1, 1)
    save_png(tmp_path / "digits.png", image_grid(samples, nrow=8))
    print(
        f"digits: 64 samples in {time.perf_counter() - start:.1f} s; pixel mean {samples.mean():.3f} std "
        f"{samples.std():.3f}, data mean {data.mean():.3f} std {data.std():.3f}"
    )
    assert abs(samples.mean() - data.mean()) < 0.1  # measured 0.03-0.05
    assert abs(samples.std() - data.std()) < 0.05  # measured up to 0.016

    flat = data.reshape(len(data), -1)

    def nearest(images):
        """Mean distance from each image to its nearest training image."""
        return torch.cdist(images.reshape(len(images), -1), flat).min(dim=1).values.mean().item()

    g = torch.Generator().manual_seed(0)
    noise = (data.mean() + data.std() * torch.randn(64, 1, 8, 8, generator=g)).clamp(-1, 1)
    print(f"digits: nearest training image at {nearest(samples):.2f} for samples, {nearest(noise):.2f} for noise")
    assert nearest(samples) < 0.7 * nearest(noise)  # measured 0.44-0.53
