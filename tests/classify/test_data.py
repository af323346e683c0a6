"""A trial's training set holds exactly the right real and synthetic images, and nothing else."""

import numpy as np
import pandas as pd
import pytest
import torch

from _classify_helpers import CLASSES, write_tiny_run
from meddap.classify.data import (IMAGENET_MEAN, IMAGENET_STD, TrialSpec, load_sweep_images, model_input,
                                  select_training_rows, trial_tensors)
from meddap.errors import MeddapError


@pytest.fixture(scope="module")
def images(tiny_run):
    specs = [TrialSpec("squeezenet1_1", f, a, r) for f in (0, 1) for a in ("", "dark") for r in (0.5, 1.0)]
    specs += [TrialSpec("squeezenet1_1", f) for f in (0, 1)]
    return load_sweep_images(tiny_run["manifest"], tiny_run["synthetic"], specs, CLASSES, 32)


@pytest.mark.parametrize("fold,adjective,ratio", [(0, "dark", 0.5), (1, "", 1.0), (1, "dark", 0.5)])
def test_training_set_is_exactly_fold_real_plus_first_synthetic(tiny_run, images, fold, adjective, ratio):
    man, syn = tiny_run["manifest"], tiny_run["synthetic"]
    spec = TrialSpec("squeezenet1_1", fold, adjective, ratio)
    real_train = man[(man.split == "train") & (man.fold != fold)]
    expected = set(real_train.image_id)
    for label in range(3):
        n = int(round(ratio * (real_train.label == label).sum()))
        pool = syn[(syn.fold == fold) & (syn.adjective == adjective) & (syn.label == label)].sort_values("index")
        expected |= set(pool.image_id.iloc[:n])
    real, synthetic = select_training_rows(man, syn, spec, CLASSES)
    assert set(real.image_id) | set(synthetic.image_id) == expected
    t = trial_tensors(images, spec)
    assert sorted(t.train_image_ids) == sorted(expected) and len(t.train_image_ids) == len(expected)
    assert t.n_real == len(real_train) and t.n_synthetic == len(expected) - len(real_train)
    # Nothing from validation, test, external or another fold's / adjective's synthetic set.
    forbidden = set(man[(man.split != "train") | (man.fold == fold)].image_id)
    forbidden |= set(syn[(syn.fold != fold) | (syn.adjective != adjective)].image_id)
    assert not forbidden & set(t.train_image_ids)
    # Labels and pixels travel with their ids.
    by_id = dict(zip(pd.concat([man, syn]).image_id, pd.concat([man, syn]).label))
    assert t.train_labels.tolist() == [by_id[i] for i in t.train_image_ids]
    assert t.train_images.dtype == torch.uint8 and t.train_images.shape[1:] == (1, 32, 32)
    assert set(t.evals["val"].image_ids) == set(man[(man.split == "train") & (man.fold == fold)].image_id)
    assert set(t.evals["external"].image_ids) == set(man[man.split == "external"].image_id)
    assert not t.synthetic_evals


def test_real_only_trial_has_no_synthetic_but_scores_each_adjective(images, tiny_run):
    t = trial_tensors(images, TrialSpec("resnet18", 1))
    assert t.n_synthetic == 0
    assert sorted(t.synthetic_evals) == ["", "dark"]
    syn = tiny_run["synthetic"]
    assert set(t.synthetic_evals["dark"].image_ids) == set(syn[(syn.fold == 1) & (syn.adjective == "dark")].image_id)


def test_pixels_match_decoded_files(images, tiny_run):
    from meddap.data.decode import read_grey

    t = trial_tensors(images, TrialSpec("squeezenet1_1", 0, "dark", 1.0))
    paths = dict(zip(pd.concat([tiny_run["manifest"], tiny_run["synthetic"]]).image_id,
                     pd.concat([tiny_run["manifest"], tiny_run["synthetic"]]).path))
    for i in (0, len(t.train_image_ids) - 1):
        np.testing.assert_array_equal(t.train_images[i, 0].numpy(), read_grey(paths[t.train_image_ids[i]], 32))


def test_shared_adapter_images_serve_every_fold(tmp_path):
    run = write_tiny_run(tmp_path, train_per_class=4, test_per_class=1, external_per_class=1, adjectives=("dark",),
                         shared_adapter=True, size=24)
    for fold in (0, 1):
        real, syn = select_training_rows(run["manifest"], run["synthetic"], TrialSpec("resnet18", fold, "dark", 1.0),
                                         CLASSES)
        assert (syn.fold == -1).all() and len(syn) == len(real)


def test_missing_fold_adjective_is_a_clear_error(tiny_run):
    syn = tiny_run["synthetic"]
    lacking = syn[~((syn.fold == 1) & (syn.adjective == "dark"))]
    with pytest.raises(MeddapError) as e:
        load_sweep_images(tiny_run["manifest"], lacking, [TrialSpec("resnet18", 1, "dark", 0.5)], CLASSES, 32)
    assert "fold 1" in str(e.value) and "'dark'" in str(e.value) and "generate" in str(e.value)


def test_too_few_synthetic_images_is_a_clear_error(tiny_run):
    with pytest.raises(MeddapError) as e:
        select_training_rows(tiny_run["manifest"], tiny_run["synthetic"], TrialSpec("resnet18", 0, "dark", 2.0),
                             CLASSES)
    assert "needs the first 8" in str(e.value) and "has 4" in str(e.value)


def test_model_input_flip_grey_to_rgb_and_normalisation():
    x = torch.arange(2 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4) * 7                     # (2, 1, 4, 4)
    plain = model_input(x)
    assert plain.shape == (2, 3, 4, 4) and plain.dtype == torch.float32
    for ch in range(3):
        expected = (x[:, 0].float() / 255 - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch]
        torch.testing.assert_close(plain[:, ch], expected)
    g = torch.Generator().manual_seed(0)
    flipped = model_input(x, flip=True, generator=g)
    coin = torch.rand(2, generator=torch.Generator().manual_seed(0)) < 0.5
    for i in range(2):
        torch.testing.assert_close(flipped[i], plain[i].flip(-1) if coin[i] else plain[i])


def test_a_missing_image_names_the_file_and_the_stage_that_remakes_it(tmp_path):
    import os

    run = write_tiny_run(tmp_path, train_per_class=2, test_per_class=1, external_per_class=1, adjectives=("dark",),
                         size=16)
    man, syn = run["manifest"], run["synthetic"]
    spec = [TrialSpec("squeezenet1_1", 0, "dark", 1.0)]
    gone = syn[(syn.fold == 0) & (syn.adjective == "dark")].sort_values("index").path.iloc[0]
    os.remove(gone)
    with pytest.raises(MeddapError, match="synthetic manifest: rerun `python -m meddap generate`") as e:
        load_sweep_images(man, syn, spec, CLASSES, 16)
    assert gone in str(e.value) and "file not found" in str(e.value)
    os.remove(man[man.split == "test"].path.iloc[0])
    with pytest.raises(MeddapError, match="data manifest: put it back, or rerun `python -m meddap prepare`"):
        load_sweep_images(man, syn, spec, CLASSES, 16)


def test_rgb_channels_keep_synthetic_colour_and_replicate_grey_real(tmp_path):
    """classify.channels=rgb: red-tinted synthetic images reach the trial in colour, real grey-content images
    are stored once as one channel and replicated to three; 'grey' keeps one channel throughout."""
    from meddap.data.decode import read_grey, read_rgb

    run = write_tiny_run(tmp_path, train_per_class=2, test_per_class=1, external_per_class=1, adjectives=("dark",),
                         size=16, colour_synthetic=True)
    spec = TrialSpec("squeezenet1_1", 0, "dark", 1.0)
    rgb = load_sweep_images(run["manifest"], run["synthetic"], [spec], CLASSES, 16, channels="rgb")
    assert rgb.real_images.shape[1] == 1                                    # grey content: one channel kept
    assert next(iter(rgb.synthetic_images.values())).shape[1:] == (3, 16, 16)
    t = trial_tensors(rgb, spec)
    assert t.train_images.shape[1:] == (3, 16, 16) and t.evals["test"].images.shape[1] == 1
    ids = dict(zip(run["synthetic"].image_id, run["synthetic"].path)) | dict(zip(run["manifest"].image_id,
                                                                                 run["manifest"].path))
    syn_i = t.n_real                                                         # first synthetic image
    np.testing.assert_array_equal(t.train_images[syn_i].permute(1, 2, 0).numpy(),
                                  read_rgb(ids[t.train_image_ids[syn_i]], 16))
    assert not torch.equal(t.train_images[syn_i, 0], t.train_images[syn_i, 1])   # colour survived
    real0 = t.train_images[0]
    assert torch.equal(real0[0], real0[1]) and torch.equal(real0[0], real0[2])
    np.testing.assert_array_equal(real0[0].numpy(), read_grey(ids[t.train_image_ids[0]], 16))
    assert model_input(t.train_images[:4]).shape == (4, 3, 16, 16)
    grey = trial_tensors(load_sweep_images(run["manifest"], run["synthetic"], [spec], CLASSES, 16), spec)
    assert grey.train_images.shape[1] == 1
    np.testing.assert_array_equal(grey.train_images[syn_i, 0].numpy(), read_grey(ids[t.train_image_ids[syn_i]], 16))
    with pytest.raises(MeddapError, match="classify.channels"):
        load_sweep_images(run["manifest"], run["synthetic"], [spec], CLASSES, 16, channels="rgba")


def test_external_copies_of_a_are_scored_apart_when_excluded(tmp_path):
    run = write_tiny_run(tmp_path, train_per_class=2, test_per_class=1, external_per_class=3, adjectives=("dark",),
                         size=16, overlap_external=1)
    spec = TrialSpec("squeezenet1_1", 0)
    man = run["manifest"]
    kept = trial_tensors(load_sweep_images(man, run["synthetic"], [spec], CLASSES, 16, exclude_overlap=True), spec)
    flagged = set(man.loc[man.a_overlap, "image_id"])
    assert len(flagged) == 2                                                 # one per B class
    assert set(kept.evals["external_overlap"].image_ids) == flagged
    assert not flagged & set(kept.evals["external"].image_ids) and len(kept.evals["external"].image_ids) == 4
    every = trial_tensors(load_sweep_images(man, run["synthetic"], [spec], CLASSES, 16, exclude_overlap=False), spec)
    assert "external_overlap" not in every.evals and len(every.evals["external"].image_ids) == 6
    with pytest.raises(MeddapError, match="no a_overlap column.*Rerun `python -m meddap prepare`"):
        load_sweep_images(man.drop(columns="a_overlap"), run["synthetic"], [spec], CLASSES, 16, exclude_overlap=True)
