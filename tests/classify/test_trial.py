"""The plain trial core: fresh seeded model per trial, exact resume, best epoch, recomputable metrics."""

import dataclasses

import numpy as np
import pytest
import torch

from _classify_helpers import CLASSES
from meddap.classify.data import TrialSpec, load_sweep_images, trial_tensors
from meddap.classify.metrics import classification_metrics
from meddap.classify.trial import build_trial_model, train_trial, trial_seed
from meddap.config import ClassifierSettings, ClassifyConfig

SPEC_A = TrialSpec("squeezenet1_1", 0, "dark", 1.0)
SPEC_B = TrialSpec("squeezenet1_1", 0, "", 1.0)


@pytest.fixture(scope="module")
def tensors(tiny_run):
    images = load_sweep_images(tiny_run["manifest"], tiny_run["synthetic"], [SPEC_A, SPEC_B], CLASSES, 32)
    return {s: trial_tensors(images, s) for s in (SPEC_A, SPEC_B)}


def _cfg(**kw):
    base = dict(models=["squeezenet1_1"], pretrained="none", epochs=2, batch_size=8, checkpoint_seconds=0, seed=0)
    base.update(kw)
    return ClassifyConfig(**base)


def _state_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_common_random_numbers_same_init_across_adjectives_other_fold_or_repeat_other_init():
    """Every adjective/ratio (and the real-only baseline) of one (classifier, fold, repeat) starts from the
    same weights and data-order seed; another fold or repeat draws anew."""
    real = TrialSpec("squeezenet1_1", 0)
    other_fold, other_repeat = TrialSpec("squeezenet1_1", 1, "dark", 1.0), TrialSpec("squeezenet1_1", 0, "dark", 1.0, 1)
    seed_a = trial_seed(0, SPEC_A)
    assert trial_seed(0, SPEC_B) == trial_seed(0, real) == seed_a
    assert len({seed_a, trial_seed(0, other_fold), trial_seed(0, other_repeat), trial_seed(1, SPEC_A)}) == 4
    a1 = build_trial_model(SPEC_A, 3, seed_a).state_dict()
    torch.manual_seed(999)  # whatever ran before must not matter
    b = build_trial_model(SPEC_B, 3, trial_seed(0, SPEC_B)).state_dict()
    r = build_trial_model(real, 3, trial_seed(0, real)).state_dict()
    assert _state_equal(a1, b) and _state_equal(a1, r)
    assert not _state_equal(a1, build_trial_model(other_repeat, 3, trial_seed(0, other_repeat)).state_dict())
    # Trial ids: repeat 0 keeps the id earlier sweeps wrote; later repeats are told apart.
    assert SPEC_A.trial_id == "squeezenet1_1__dark__r1__f0"
    assert other_repeat.trial_id == "squeezenet1_1__dark__r1__f0__rep1"
    assert TrialSpec.from_dict(other_repeat.to_dict()) == other_repeat


def test_crn_trials_record_the_same_seed(tensors):
    """train_trial itself uses the shared seed: the recorded seeds of two adjectives' trials agree."""
    cfg = _cfg(epochs=1)
    assert train_trial(SPEC_A, tensors[SPEC_A], cfg, CLASSES).seed == \
        train_trial(SPEC_B, tensors[SPEC_B], cfg, CLASSES).seed == trial_seed(0, SPEC_A)


def test_fresh_model_per_trial_no_carry_over(tensors):
    """The authors' script kept training one network across adjectives; here a trial run after
    another gives exactly what it gives alone."""
    cfg = _cfg()
    first = train_trial(SPEC_A, tensors[SPEC_A], cfg, CLASSES)
    train_trial(SPEC_B, tensors[SPEC_B], cfg, CLASSES)
    again = train_trial(SPEC_A, tensors[SPEC_A], cfg, CLASSES)
    assert _state_equal(first.state_dict, again.state_dict)
    assert first.metrics["test"]["accuracy"] == again.metrics["test"]["accuracy"]


def test_resume_from_checkpoint_equals_uninterrupted(tensors):
    cfg = _cfg(epochs=3, checkpoint_seconds=0)
    states, epochs = {}, []

    def report(epoch, metrics, state):
        epochs.append(epoch)
        if state is not None:
            states[epoch] = state

    full = train_trial(SPEC_A, tensors[SPEC_A], cfg, CLASSES, report=report)
    assert epochs == [1, 2, 3] and sorted(states) == [1, 2]  # no checkpoint after the last epoch
    resumed = train_trial(SPEC_A, tensors[SPEC_A], cfg, CLASSES, checkpoint=states[1])
    assert resumed.resumed_from_epoch == 1 and full.resumed_from_epoch == 0
    assert _state_equal(full.state_dict, resumed.state_dict)
    assert resumed.best_epoch == full.best_epoch
    assert [h["val_accuracy"] for h in resumed.history] == [h["val_accuracy"] for h in full.history]


def test_a_classifiers_own_settings_apply_to_its_trials_only(tensors):
    """classify.per_model.<name>: epochs / lr / batch_size of that classifier's trials."""
    cfg = _cfg(epochs=1, models=["squeezenet1_1", "resnet18"],
               per_model={"squeezenet1_1": ClassifierSettings(epochs=3, lr=1e-4)})
    own = train_trial(SPEC_A, tensors[SPEC_A], cfg, CLASSES)
    assert own.epochs == 3 and len(own.history) == 3
    shared = train_trial(dataclasses.replace(SPEC_A, classifier="resnet18"), tensors[SPEC_A], cfg, CLASSES)
    assert shared.epochs == 1 and len(shared.history) == 1
    # the lr reaches the optimizer: the same trial at the shared lr (1e-3) ends with other weights
    at_shared_lr = train_trial(SPEC_A, tensors[SPEC_A], _cfg(epochs=3), CLASSES)
    assert not _state_equal(own.state_dict, at_shared_lr.state_dict)


def test_best_epoch_weights_and_recomputable_metrics(tensors):
    cfg = _cfg(epochs=6, models=["resnet18"], checkpoint_seconds=1e9)
    spec = dataclasses.replace(SPEC_A, classifier="resnet18")
    r = train_trial(spec, tensors[SPEC_A], cfg, CLASSES)
    vals = [h["val_accuracy"] for h in r.history]
    assert r.best_epoch == int(np.argmax(vals)) + 1 and r.best_val_accuracy == max(vals)
    assert r.metrics["val"]["accuracy"] == pytest.approx(max(vals))  # evaluated with the best epoch's weights
    assert r.best_val_accuracy > 0.5  # shapes are learnable: well above chance (1/3)
    p = r.predictions
    assert set(p.eval_set) == {"val", "test", "external"}
    probs = p[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert (probs.argmax(1) == p.pred.to_numpy()).all()
    for name, part in p.groupby("eval_set"):
        m = classification_metrics(part.label, part.pred, CLASSES)
        assert m["accuracy"] == r.metrics[name]["accuracy"] and m["f1"] == r.metrics[name]["f1"]
    assert r.n_real == 12 and r.n_synthetic == 12 and r.images_per_second > 0 and r.train_seconds > 0


def test_bench_compares_both_paths(capsys):
    from meddap.bench.classify import main
    from meddap.config import load_config

    out = main(load_config("demo"), ["--images", "9", "--models", "squeezenet1_1", "--size", "32",
                                      "--source-size", "48", "--batch-size", "4", "--repeats", "1", "--threads", "1"])
    r = out["squeezenet1_1"]
    assert r["in_memory"] > 0 and r["file_loader"] > 0 and r["ratio"] == pytest.approx(r["in_memory"] / r["file_loader"])
    printed = capsys.readouterr().out
    assert "squeezenet1_1" in printed and ("GPU figures" in printed or "GPU " in printed)


def test_checkpoints_by_time_not_epochs(tensors, monkeypatch):
    """classify.checkpoint_seconds: a state goes to `report` once that much training time has passed
    (checked at each epoch's end), never after the last epoch. A fake clock moves 25 s per reading."""
    import meddap.classify.trial as trial

    clock = {"t": 0.0}

    def monotonic():
        clock["t"] += 25.0
        return clock["t"]

    monkeypatch.setattr(trial.time, "monotonic", monotonic)
    got = []
    train_trial(SPEC_A, tensors[SPEC_A], _cfg(epochs=5, checkpoint_seconds=60), CLASSES,
                report=lambda e, m, s: got.append(e) if s is not None else None)
    assert got == [3]   # 25, 50, 75 s after the start: due at epoch 3; then 25 s since it, and epoch 5 is the last
    none = []
    train_trial(SPEC_A, tensors[SPEC_A], _cfg(epochs=3, checkpoint_seconds=1e9), CLASSES,
                report=lambda e, m, s: none.append(s))
    assert none == [None, None, None]


def test_a_trial_builds_its_constants_once_and_reads_the_device_once_per_epoch(tensors, monkeypatch):
    """Normalisation constants are made once per trial (not per batch), validation images stay on the
    device, and an epoch's loss and validation accuracy come back in one read."""
    import meddap.classify.data as data
    import meddap.classify.trial as trial

    made, build = [], data.imagenet_stats
    monkeypatch.setattr(trial, "imagenet_stats", lambda device: made.append(device) or build(device))
    monkeypatch.setattr(data, "imagenet_stats", lambda device: pytest.fail("stats built per batch"))
    reads = {"item": 0, "tolist": 0}
    for name in reads:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            import sys

            if "torch/optim/" not in sys._getframe(1).f_code.co_filename.replace("\\", "/"):  # CPU Adam's step counter
                reads[_name] += 1
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    result = train_trial(SPEC_A, tensors[SPEC_A], _cfg(epochs=3), CLASSES)
    monkeypatch.undo()
    assert len(made) == 1
    assert reads == {"item": 0, "tolist": 3}
    assert len(result.history) == 3


def test_precise_bn_recomputes_running_stats_from_the_training_images_and_trains_alike(tensors):
    """classify.precise_bn: the best epoch's BatchNorm running statistics are those of the training images
    under its final weights (PyTorch's running averages lag them: from scratch eval-mode outputs
    collapsed to one class in the demo), and the weights are exactly those trained without it."""
    from meddap.classify.data import imagenet_stats, model_input

    spec = dataclasses.replace(SPEC_A, classifier="resnet18")
    plain = train_trial(spec, tensors[SPEC_A], _cfg(epochs=1, models=["resnet18"]), CLASSES)
    precise = train_trial(spec, tensors[SPEC_A], _cfg(epochs=1, models=["resnet18"], precise_bn=True), CLASSES)
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    weights = [k for k in plain.state_dict if not k.endswith(buffers)]
    assert all(torch.equal(plain.state_dict[k], precise.state_dict[k]) for k in weights)
    model = build_trial_model(spec, len(CLASSES), 0)
    model.load_state_dict(precise.state_dict)
    with torch.no_grad():  # bn1's input is conv1's output: its mean over the training images (3 chunks of 8)
        target = model.conv1(model_input(tensors[SPEC_A].train_images, stats=imagenet_stats("cpu"))).mean((0, 2, 3))
    torch.testing.assert_close(precise.state_dict["bn1.running_mean"], target, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain.state_dict["bn1.running_mean"], target, rtol=1e-2, atol=1e-3)


def test_precise_bn_images_takes_its_statistics_from_that_many_images_spread_over_the_set(tensors):
    """classify.precise_bn_images: the statistics of 8 of the 24 training images, evenly spaced (so a
    training set of real then synthetic images contributes both), not of the first 8 or of all."""
    from meddap.classify.data import imagenet_stats, model_input

    spec = dataclasses.replace(SPEC_A, classifier="resnet18")
    res = train_trial(spec, tensors[SPEC_A], _cfg(epochs=1, models=["resnet18"], precise_bn=True,
                                                  precise_bn_images=8), CLASSES)
    model = build_trial_model(spec, len(CLASSES), 0)
    model.load_state_dict(res.state_dict)
    images = tensors[SPEC_A].train_images
    assert images.shape[0] == 24

    def conv1_mean(x):
        with torch.no_grad():
            return model.conv1(model_input(x, stats=imagenet_stats("cpu"))).mean((0, 2, 3))

    spread = torch.linspace(0, 23, 8).round().long()     # 0, 3, 7, ..., 23
    torch.testing.assert_close(res.state_dict["bn1.running_mean"], conv1_mean(images[spread]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(res.state_dict["bn1.running_mean"], conv1_mean(images[:8]), rtol=1e-3, atol=1e-4)
    assert not torch.allclose(res.state_dict["bn1.running_mean"], conv1_mean(images), rtol=1e-3, atol=1e-4)


def test_precise_bn_draws_no_random_numbers_and_restores_the_model():
    from meddap.classify.trial import precise_bn

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.3), torch.nn.Dropout(0.5),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    rng = torch.get_rng_state()
    assert precise_bn(model, images, batch_size=2) == 1   # chunks of 3 and 2 images: no lone last one
    assert torch.equal(torch.get_rng_state(), rng)        # dropout stayed off
    assert model.training and model[1].momentum == 0.3 and model[2].training
    assert precise_bn(build_trial_model(SPEC_A, 3, 0), images, batch_size=2) == 0  # SqueezeNet: no BatchNorm
