"""Damaged outputs (issue 13 part 5), on the real generate stage: a PNG cut short, a PNG with flipped
bytes and a truncated synthetic manifest are found from the stage record (sizes and sha256 of every
output) and remade, bit for bit, instead of being read as good data."""

from __future__ import annotations

import numpy as np
from PIL import Image

from meddap import storage
from meddap.layout import RunLayout
from meddap.stages import generate as stage
from meddap.stages import pipeline, state

from .conftest import make_cfg


def test_damaged_pngs_and_manifest_are_found_and_remade(run_dir, tiny_sd_dir, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "stage_function", lambda s: (lambda c: stage.run(c, in_process=True)))
    cfg = make_cfg(run_dir, tiny_sd_dir)
    lay = RunLayout(cfg.run_dir)
    pipeline.run_stages(cfg, ("generate",))
    record = state.read_record(cfg, "generate")
    manifest = storage.read_parquet(lay.synthetic_manifest)
    assert set(record["outputs"]) >= {"synthetic/manifest.parquet"} | {
        p[len(str(run_dir)) + 1:] for p in manifest["path"]}
    cut, flipped = manifest["path"].iloc[0], manifest["path"].iloc[5]
    before = {p: np.asarray(Image.open(p)) for p in (cut, flipped)}

    data = open(cut, "rb").read()
    open(cut, "wb").write(data[: len(data) // 2])                 # a crash or full disk mid-copy
    data = bytearray(open(flipped, "rb").read())
    data[len(data) // 2] ^= 0xFF                                   # same size, other bytes
    open(flipped, "wb").write(bytes(data))
    m = open(lay.synthetic_manifest, "rb").read()
    open(lay.synthetic_manifest, "wb").write(m[:100])              # not readable as Parquet any more

    st = state.check_stage(cfg, "generate")
    assert st.state == "damaged"
    assert any(d.startswith(cut[len(str(run_dir)) + 1:] + ": ") and "bytes" in d for d in st.damaged)
    assert any(d.startswith(flipped[len(str(run_dir)) + 1:] + ": ") and "sha256" in d for d in st.damaged)
    assert any(d.startswith("synthetic/manifest.parquet: ") for d in st.damaged)
    capsys.readouterr()
    pipeline.run_stages(cfg, ("generate",))
    out = capsys.readouterr().out
    assert "generate: 3 output(s) damaged or missing since it finished" in out
    assert "to generate: 2" in out, out  # only the two damaged images; the others re-listed from provenance
    for p, pixels in before.items():
        assert np.array_equal(np.asarray(Image.open(p)), pixels), p
    assert state.check_stage(cfg, "generate").state == "done"
    again = storage.read_parquet(lay.synthetic_manifest)
    assert list(again["image_id"]) == list(manifest["image_id"])
