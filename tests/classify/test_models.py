"""Classifier builders: heads sized for the class list, clear errors for names and missing weights."""

import urllib.error

import pytest
import torch
from torch import nn

from meddap.classify.models import build_classifier, imagenet_weights_file, logits_of
from meddap.errors import MeddapError


@pytest.mark.parametrize("name,head,num_classes", [
    ("resnet34", "fc", 3), ("densenet121", "classifier", 2), ("squeezenet1_1", "classifier.1", 2),
    ("squeezenet1_1", "classifier.1", 5), ("mobilenet_v3_small", "classifier.3", 4),
])
def test_head_matches_class_count(name, head, num_classes):
    """SqueezeNet's head is a Conv2d: the authors hard-coded 3 outputs there."""
    torch.manual_seed(0)
    model = build_classifier(name, num_classes).eval()
    layer = model.get_submodule(head)
    out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    assert out == num_classes
    with torch.no_grad():
        assert logits_of(model(torch.randn(2, 3, 32, 32))).shape == (2, num_classes)


def test_unknown_classifier_lists_close_names():
    with pytest.raises(MeddapError) as e:
        build_classifier("resnet43", 3)
    assert "resnet34" in str(e.value) and "classify.models" in str(e.value)


def test_missing_imagenet_weights_in_weights_dir_names_file(tmp_path):
    with pytest.raises(MeddapError) as e:
        build_classifier("resnet34", 3, pretrained="imagenet", weights_dir=str(tmp_path))
    msg = str(e.value)
    assert "resnet34-b627a593.pth" in msg and str(tmp_path) in msg and "classify.pretrained=none" in msg


def test_unfetchable_imagenet_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torchvision.models._api as api

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(MeddapError) as e:
        build_classifier("squeezenet1_1", 3, pretrained="imagenet")
    msg = str(e.value)
    assert imagenet_weights_file("squeezenet1_1") in msg and "$TORCH_HOME/hub/checkpoints" in msg
    assert "classify.weights_dir" in msg


def test_imagenet_weights_load_from_weights_dir(tmp_path):
    import torchvision.models as tvm

    torch.manual_seed(123)
    reference = tvm.get_model("squeezenet1_1", weights=None)
    torch.save(reference.state_dict(), tmp_path / imagenet_weights_file("squeezenet1_1"))
    torch.manual_seed(7)
    model = build_classifier("squeezenet1_1", 2, pretrained="imagenet", weights_dir=str(tmp_path))
    ref = reference.state_dict()
    body = [k for k in ref if not k.startswith("classifier.1")]
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in body)
    assert model.classifier[1].out_channels == 2
