"""The CPU-speed forms of the networks' layers compute what the plain layers compute
(:func:`pipeline.nets.blocks.pointwise`, the refiner's padded first convolution)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.nets.blocks import PointwiseConv2d, PointwiseConv3d, conv, pointwise
from pipeline.segmentation.model import ShallowRefiner

GEN = torch.Generator().manual_seed(3)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["first", "last"])
def test_pointwise_equals_a_one_voxel_convolution(dims, bias, layout):
    shape = (2, 5, 6, 7) if dims == 2 else (2, 5, 6, 7, 4)
    x = torch.randn(shape, generator=GEN)
    if layout == "last":
        x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    w = torch.randn((3, 5) + (1,) * dims, generator=GEN)
    b = torch.randn(3, generator=GEN) if bias else None
    expected = (F.conv2d if dims == 2 else F.conv3d)(x, w, b)
    got = pointwise(x, w, b)
    assert got is not None and got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)


def test_a_strided_input_falls_back_to_the_convolution():
    x = torch.randn(1, 4, 8, 8, 8, generator=GEN)[:, :, ::2]
    layer = conv(3, 4, 2, 1)
    assert isinstance(layer, PointwiseConv3d) and isinstance(conv(2, 4, 2, 1), PointwiseConv2d)
    assert pointwise(x, layer.weight, layer.bias) is None
    with torch.no_grad():
        assert torch.allclose(layer(x), F.conv3d(x, layer.weight, layer.bias), atol=1e-6)


def test_pointwise_layers_train():
    layer = conv(3, 4, 2, 1)
    x = torch.randn(2, 4, 3, 3, 3, generator=GEN)
    layer(x).square().mean().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_refiner_gives_the_same_logits_with_its_cpu_first_convolution(channels_last):
    model = ShallowRefiner(width=8, extra_dilations=(4,)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=GEN) * 0.1)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 2, 12, 16, 20, generator=GEN)
    x[:, 1] = torch.rand(1, 12, 16, 20, generator=GEN)
    with torch.enable_grad():                      # autograd on: the plain c1
        plain = model(x).detach()
    with torch.no_grad():                          # inference: input padded to 4 channels
        fast = model(x)
    assert torch.allclose(fast, plain, atol=1e-5)
    prior = x[:, 1:2].clamp(1e-3, 1 - 1e-3)
    with torch.no_grad():
        model.out.weight.zero_()
        model.out.bias.zero_()
        assert torch.allclose(model(x), torch.log(prior / (1 - prior)), atol=1e-5)
