"""Grad-CAM (Selvaraju et al.): where a classifier looked for its answer.

The heat map of class c at a layer with activations A_k (K maps of h x w) is
    ReLU( sum_k alpha_k A_k ),   alpha_k = mean over (h, w) of d logit_c / d A_k,
upsampled (bilinear) to the input size and scaled to [0, 1] per image. The layer is the last
convolutional block of the architecture (`target_layer`): ResNet `layer4`, DenseNet `features` (its
output after norm5; DenseNet's forward applies the final ReLU in place, so the saved activations are
post-ReLU), SqueezeNet `features[-1]` (the last Fire module), otherwise the last Conv2d in the network.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["target_layer", "grad_cam", "overlay"]


def target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional block of `model` (see the module docstring)."""
    import torchvision.models as tvm

    if isinstance(model, tvm.ResNet):
        return model.layer4
    if isinstance(model, tvm.DenseNet):
        return model.features
    if isinstance(model, tvm.SqueezeNet):
        return model.features[-1]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer: Grad-CAM needs a convolutional network")
    return convs[-1]


def grad_cam(model: nn.Module, images: torch.Tensor, target: Optional[int | Sequence[int] | torch.Tensor] = None,
             layer: Optional[nn.Module] = None) -> np.ndarray:
    """(B, H, W) float heat maps in [0, 1] for (B, C, H, W) model inputs.

    `target`: the class to explain, one for all images or one per image; None = each image's
    predicted class. The model is put in eval mode and its parameters' gradients are left untouched.
    """
    layer = layer if layer is not None else target_layer(model)
    saved: dict[str, torch.Tensor] = {}

    def forward_hook(_module, _inputs, output):
        saved["act"] = output
        # A tensor hook (not a module backward hook): robust to in-place ops after the layer.
        output.register_hook(lambda g: saved.__setitem__("grad", g))

    was_training = model.training
    model.eval()
    handle = layer.register_forward_hook(forward_hook)
    try:
        x = images.detach().requires_grad_(True)   # gradients must flow even when params are frozen
        with torch.enable_grad():
            logits = model(x)
            logits = logits.logits if hasattr(logits, "logits") else logits          # (B, classes)
            if target is None:
                idx = logits.argmax(1)
            else:
                idx = torch.as_tensor(target, device=logits.device).long().expand(logits.shape[0])
            chosen = logits.gather(1, idx[:, None]).sum()
            grad_params = [p.grad for p in model.parameters()]
            chosen.backward()
        for p, g in zip(model.parameters(), grad_params):  # leave any training state as it was
            p.grad = g
    finally:
        handle.remove()
        model.train(was_training)
    act, grad = saved["act"].detach(), saved["grad"].detach()                     # (B, K, h, w)
    weights = grad.mean(dim=(2, 3), keepdim=True)                                  # (B, K, 1, 1)
    cam = F.relu((weights * act).sum(dim=1, keepdim=True))                          # (B, 1, h, w)
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)
    peak = cam.flatten(1).max(dim=1).values.clamp_min(torch.finfo(cam.dtype).tiny)  # all-zero maps stay 0
    return (cam / peak[:, None, None]).clamp(0, 1).cpu().numpy()


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """(H, W) or (H, W, 3) image (uint8, or float in [0, 1]) with an (H, W) [0, 1] heat map blended
    on top through `cmap` -> (H, W, 3) uint8."""
    from matplotlib import colormaps

    img = np.asarray(image)
    img = img / 255.0 if np.issubdtype(img.dtype, np.integer) else img.astype(np.float64)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    colour = colormaps[cmap](np.clip(heat, 0, 1))[..., :3]                         # (H, W, 3)
    out = (1 - alpha) * img + alpha * colour
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)
