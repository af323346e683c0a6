"""Classifier builders: any torchvision classification model with its head sized for our classes.

`build_classifier("resnet34", 3)` returns a randomly initialised network; `pretrained="imagenet"`
builds it the way torchvision does with its default ImageNet weights (`get_model(name, weights=...)`:
torchvision's own loader, which also renames the pre-0.4 key layout of its published DenseNet files,
`denselayerN.norm.1.weight`, and sets the architecture options the weights were trained with) from
the file exactly as torchvision publishes it (`densenet121-a639ec97.pth`, ...) in `weights_dir`, else
torch hub's cache (`$TORCH_HOME/hub/checkpoints/`), else a download into that cache; then it replaces
the head, so the new head is the only randomly initialised part.
The head is found generically: every Linear / Conv2d whose output size is ImageNet's class count
(ResNet `fc`, DenseNet `classifier`, SqueezeNet's final 1x1 Conv2d, VGG/EfficientNet/MobileNet
`classifier[-1]`, ViT `heads.head`, Inception/GoogLeNet auxiliary heads too) is replaced by the
same kind of layer with `num_classes` outputs.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from meddap.errors import MeddapError

__all__ = ["build_classifier", "check_classifier_name", "classifier_names", "imagenet_weights_file", "logits_of"]

# torchvision's classification models are all built for ImageNet-1k; the head is what outputs this.
_IMAGENET_CLASSES = 1000


def classifier_names() -> list[str]:
    """Every torchvision classification model name (detection/segmentation/video models excluded)."""
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def check_classifier_name(name: str, key: str = "classify.models") -> None:
    """MeddapError naming `key` and the closest torchvision names when `name` is no classifier."""
    names = classifier_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise MeddapError(
            f"unknown classifier '{name}' in {key}.{hint} Any torchvision classification model "
            f"works, e.g. resnet34, densenet121, squeezenet1_1, efficientnet_b0, vit_b_16 "
            f"(all {len(names)}: torchvision.models.list_models(module=torchvision.models)).")


def imagenet_weights_file(name: str) -> str:
    """File name of torchvision's default ImageNet weights for `name` (e.g. resnet34-b627a593.pth)."""
    import torchvision.models as tvm

    check_classifier_name(name)
    return os.path.basename(tvm.get_model_weights(name).DEFAULT.url)


@contextlib.contextmanager
def _hub_checkpoints(folder: str):
    """torch hub's checkpoint folder pointed at `folder` for the block (torchvision's loaders look in
    `<hub dir>/checkpoints`, and take no folder argument through `get_model`)."""
    tmp = tempfile.mkdtemp(prefix="meddap-hub-")
    previous = torch.hub._hub_dir  # None: derived from $TORCH_HOME at each call; put back exactly that
    try:
        os.symlink(os.path.abspath(folder), os.path.join(tmp, "checkpoints"))
        torch.hub.set_dir(tmp)
        yield
    finally:
        torch.hub._hub_dir = previous
        shutil.rmtree(tmp, ignore_errors=True)


def _imagenet_model(name: str, weights_dir: Optional[str]) -> nn.Module:
    """torchvision's `get_model(name, weights=DEFAULT)`, reading the published file from `weights_dir`
    or torch hub's cache (downloading into the cache only when no weights_dir is given)."""
    import torchvision.models as tvm

    weights = tvm.get_model_weights(name).DEFAULT
    filename = os.path.basename(weights.url)
    hub_dir = Path(torch.hub.get_dir(), "checkpoints")
    where = (f"put it in classify.weights_dir ({weights_dir})" if weights_dir else
             f"put it in $TORCH_HOME/hub/checkpoints (here: {hub_dir}) or in a folder named by classify.weights_dir")
    path = Path(os.path.expanduser(weights_dir), filename) if weights_dir else hub_dir / filename
    if weights_dir and not path.is_file():
        # An explicit folder is a promise: never fall back to a download that would hide a typo.
        raise MeddapError(
            f"ImageNet weights for '{name}' not found: expected {path} (torchvision's file name). Download "
            f"{weights.url} and {where}, or set classify.pretrained=none to train from random initialisation.")
    try:
        with _hub_checkpoints(str(path.parent)) if weights_dir else contextlib.nullcontext():
            return tvm.get_model(name, weights=weights, progress=False)
    except Exception as e:
        if path.is_file():  # truncated, another network's weights, not a checkpoint at all
            raise MeddapError(
                f"{path} could not be loaded as torchvision's ImageNet weights for '{name}' "
                f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}). Replace it with {weights.url} "
                f"(file {filename}, as published), or set classify.pretrained=none.") from None
        # offline machines: URLError, timeouts, proxies
        raise MeddapError(
            f"ImageNet weights for '{name}' could not be fetched ({type(e).__name__}: {e}). Download "
            f"{weights.url} (file {filename}) and {where}, or set classify.pretrained=none.") from None


def _replace_heads(model: nn.Module, num_classes: int) -> int:
    """Swap every ImageNet-sized output layer for one with `num_classes` outputs; returns how many."""
    targets = []
    for qualname, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == _IMAGENET_CLASSES:
            targets.append((qualname, nn.Linear(module.in_features, num_classes, bias=module.bias is not None)))
        elif isinstance(module, nn.Conv2d) and module.out_channels == _IMAGENET_CLASSES:
            # SqueezeNet's head is a 1x1 conv; the authors hard-coded 3 outputs there, we use the class list.
            targets.append((qualname, nn.Conv2d(module.in_channels, num_classes, module.kernel_size,
                                                module.stride, module.padding, bias=module.bias is not None)))
    for qualname, new in targets:
        parent_name, _, attr = qualname.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
    return len(targets)


def build_classifier(name: str, num_classes: int, pretrained: str = "none",
                     weights_dir: Optional[str] = None) -> nn.Module:
    """A torchvision classifier with `num_classes` outputs. Seed torch's RNG first for a
    reproducible initialisation (the trial does so from its own seed)."""
    import torchvision.models as tvm

    check_classifier_name(name)
    if num_classes < 2:
        raise MeddapError(f"build_classifier('{name}'): num_classes must be >= 2, got {num_classes}.")
    if pretrained not in ("none", "imagenet"):
        raise MeddapError(f"classify.pretrained = {pretrained!r}: expected 'imagenet' or 'none'.")
    if pretrained == "imagenet":
        model = _imagenet_model(name, weights_dir)
    else:
        model = tvm.get_model(name, weights=None)
    if _replace_heads(model, num_classes) == 0:
        raise MeddapError(f"classifier '{name}': no {_IMAGENET_CLASSES}-output head layer found to replace.")
    return model


def logits_of(output) -> torch.Tensor:
    """Main logits of a forward pass (Inception/GoogLeNet return named tuples with aux logits in training)."""
    return output.logits if hasattr(output, "logits") else output
