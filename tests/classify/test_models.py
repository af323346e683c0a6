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


# ---------------------------------------------------------------------------------------------
# ImageNet weights as torchvision publishes them (file names, key layout), loaded by build_classifier
# ---------------------------------------------------------------------------------------------
def _published_stand_in(name: str, folder, seed: int = 123) -> dict:
    """A random-weight checkpoint exactly as torchvision publishes `name`: its file name and, for the
    DenseNets, the pre-0.4 key layout of the published files (`denselayer1.norm.1.weight`).
    Returns the reference state dict in today's layout."""
    import re

    import torchvision.models as tvm

    torch.manual_seed(seed)
    reference = tvm.get_model(name, weights=None).state_dict()
    published = dict(reference)
    if name.startswith("densenet"):
        old = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))([12])\.(weight|bias|running_mean|running_var)$")
        published = {old.sub(r"\1.\2.\3", k): v for k, v in reference.items()}
        assert "features.denseblock1.denselayer1.norm.1.weight" in published  # the published layout
    torch.save(published, folder / imagenet_weights_file(name))
    return reference


def _body_equal(model, reference: dict, name: str) -> None:
    """Every weight but the replaced head(s) (the only ones whose shape changed) is the file's."""
    got = model.state_dict()
    body = [k for k in reference if k in got and got[k].shape == reference[k].shape]
    assert len(body) >= len(reference) - 4, f"{name}: only {len(body)} of {len(reference)} tensors kept"
    assert all(torch.equal(got[k], reference[k]) for k in body)


@pytest.mark.parametrize("name,file", [("resnet34", "resnet34-b627a593.pth"), ("densenet121", "densenet121-a639ec97.pth"),
                                       ("squeezenet1_1", "squeezenet1_1-b8a52dc0.pth")])
def test_published_imagenet_checkpoints_load_from_weights_dir(name, file, tmp_path):
    """The paper's three nets from files named and laid out as torchvision ships them. A strict load of
    the raw DenseNet file (what the old code did) fails on these keys: the stand-in is the real layout."""
    assert imagenet_weights_file(name) == file
    reference = _published_stand_in(name, tmp_path)
    raw = torch.load(tmp_path / file, weights_only=True)
    if name == "densenet121":
        import torchvision.models as tvm

        with pytest.raises(RuntimeError, match="norm1"):
            tvm.get_model(name, weights=None).load_state_dict(raw)
    model = build_classifier(name, 3, pretrained="imagenet", weights_dir=str(tmp_path))
    _body_equal(model, reference, name)
    with torch.no_grad():
        assert logits_of(model.eval()(torch.randn(1, 3, 64, 64))).shape == (1, 3)


def test_published_checkpoints_load_from_torch_hub_cache_and_sweep_precheck(tmp_path, monkeypatch):
    """No weights_dir: torch hub's checkpoints/ folder under $TORCH_HOME, as a download leaves it; the
    sweep's pre-check (run before any training) loads all three from there."""
    from meddap.config import load_config
    from meddap.stages.sweep import check_classifiers

    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    refs = {n: _published_stand_in(n, checkpoints, seed=i) for i, n in enumerate(["resnet34", "densenet121",
                                                                               "squeezenet1_1"])}
    cfg = load_config("paper", [f"run_dir={tmp_path / 'run'}"])
    assert cfg.classify.weights_dir is None and cfg.classify.pretrained == "imagenet"
    check_classifiers(cfg)  # raised on DenseNet's published keys before
    _body_equal(build_classifier("densenet121", 3, pretrained="imagenet"), refs["densenet121"], "densenet121")


def test_a_corrupt_published_file_is_a_clear_error(tmp_path):
    (tmp_path / "resnet34-b627a593.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(MeddapError, match=r"resnet34-b627a593.pth could not be loaded.*classify.pretrained=none"):
        build_classifier("resnet34", 3, pretrained="imagenet", weights_dir=str(tmp_path))


@pytest.mark.parametrize("name", ["densenet169", "inception_v3", "mobilenet_v3_small"])
def test_other_published_checkpoints_load(name, tmp_path):
    """Beyond the paper's three: another old-layout DenseNet, Inception (torchvision's builder sets its
    transform_input and aux head for these weights) and a MobileNet."""
    reference = _published_stand_in(name, tmp_path)
    _body_equal(build_classifier(name, 3, pretrained="imagenet", weights_dir=str(tmp_path)), reference, name)


def test_every_accepted_model_has_a_published_file_name():
    """classify.models accepts any torchvision classification model: each has default ImageNet weights
    whose file name build_classifier looks for, and a builder that loads them itself."""
    import torchvision.models as tvm

    from meddap.classify.models import classifier_names

    for name in classifier_names():
        file = imagenet_weights_file(name)
        assert file.endswith((".pth", ".pt")) and "-" in file, (name, file)
        assert tvm.get_model_weights(name).DEFAULT.url.endswith(file)
