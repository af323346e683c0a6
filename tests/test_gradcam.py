"""Grad-CAM finds the region a model's answer depends on, and picks each architecture's last conv block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from meddap.classify.gradcam import grad_cam, overlay, target_layer

torch.set_num_threads(1)
SIZE = 32


class _ColourNet(nn.Module):
    """Hand-built: channel 0 of `conv` detects red, channel 1 green; logit 0 = mean of the red map,
    logit 1 = mean of the green map. So class 0's answer depends only on where red is."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0, 1, 1] = 1.0      # red channel, centre tap
            self.conv.weight[1, 1, 1, 1] = 1.0      # green channel, centre tap

    def forward(self, x):                            # (B, 3, H, W)
        a = torch.relu(self.conv(x))                 # (B, 2, H, W)
        return a.mean(dim=(2, 3))                    # (B, 2) logits


def _image() -> torch.Tensor:
    """Red square in the top-left quadrant, green square in the bottom-right quadrant."""
    x = torch.zeros(1, 3, SIZE, SIZE)
    q = SIZE // 2
    x[0, 0, 4:q - 4, 4:q - 4] = 1.0
    x[0, 1, q + 4:SIZE - 4, q + 4:SIZE - 4] = 1.0
    return x


def _quadrant_share(heat: np.ndarray) -> dict[str, float]:
    q = heat.shape[0] // 2
    total = heat.sum()
    return {"tl": heat[:q, :q].sum() / total, "br": heat[q:, q:].sum() / total,
            "tr": heat[:q, q:].sum() / total, "bl": heat[q:, :q].sum() / total}


def test_heat_map_concentrates_where_the_answer_depends():
    model = _ColourNet()
    heat = grad_cam(model, _image(), target=0)
    assert heat.shape == (1, SIZE, SIZE) and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    share = _quadrant_share(heat[0])
    assert share["tl"] > 0.95, share
    # Same image, the other class: its answer depends only on the green square (bottom right).
    # Plain activation maps would light up both squares for both classes; the gradients choose.
    share = _quadrant_share(grad_cam(model, _image(), target=1)[0])
    assert share["br"] > 0.95, share
    # Default target = predicted class; make red win and check the map follows it.
    x = _image()
    x[0, 1] *= 0.5
    assert _quadrant_share(grad_cam(model, x)[0])["tl"] > 0.95


@pytest.mark.parametrize("name,expected", [("resnet18", "layer4"), ("densenet121", "features"),
                                           ("squeezenet1_1", "features.12")])
def test_torchvision_target_layers_and_maps(name, expected):
    import torchvision.models as tvm

    torch.manual_seed(0)
    model = tvm.get_model(name, weights=None, num_classes=3)
    layer = target_layer(model)
    assert layer is model.get_submodule(expected)
    x = torch.rand(2, 3, 64, 64)
    heat = grad_cam(model, x)
    assert heat.shape == (2, 64, 64) and np.isfinite(heat).all()
    assert heat.min() >= 0 and heat.max() <= 1
    assert all(p.grad is None for p in model.parameters())   # no gradients left behind
    assert model.training                                       # mode restored


def test_overlay_shapes_and_blend():
    img = np.full((8, 8), 255, np.uint8)
    heat = np.zeros((8, 8))
    out = overlay(img, heat, alpha=0.0)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8 and (out == 255).all()
    hot = overlay(np.zeros((8, 8)), np.ones((8, 8)), alpha=1.0)
    assert (hot[..., 0] > 100).all() and (hot[..., 2] < 50).all()   # jet's top is red
