"""`python -m meddap prepare`: real datasets -> manifest, leakage audit, test split and folds.

Reads Dataset A (`data.*`) and optionally Dataset B (`data.external.*`), decodes every candidate
image once into the canonical grey form (meddap.data.decode), audits duplicates and A/B overlap
(meddap.data.audit), splits A into a held-out test split and K folds (meddap.data.splits) and writes
  run_dir/data/manifest.parquet   one row per usable image (the contract every later stage reads);
                                  `a_overlap` is true on Dataset B rows that copy a Dataset A image
                                  (matched by content, or in one B group with such a copy), else false
  run_dir/data/audit.parquet      skipped files and duplicate / overlap findings (AUDIT_COLUMNS): every
                                  A/B pair (kind ab_overlap) and every B image flagged through its group
                                  (kind ab_overlap_group)
  run_dir/data/decode_cache.parquet  hashes and sizes per (path, size, mtime): a rerun decodes only
                                  new or changed files
A rerun with the same inputs rewrites nothing (byte-identical outputs are left in place).
"""

from __future__ import annotations

import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from meddap import logs, storage
from meddap.data.audit import (DuplicatePair, assign_groups, find_duplicates, find_overlap,
                               findings_frame, pair_reason)
from meddap.data.decode import ImageDecodeError, phash_pair, pixel_sha256, read_grey, thumbnail
from meddap.data.sources import SourceListing, list_source
from meddap.data.splits import make_splits
from meddap.errors import MeddapError
from meddap.layout import RunLayout
from meddap.progress import Progress

__all__ = ["run", "MANIFEST_COLUMNS", "decode_records"]

# The contract (see docs/data.md): later stages rely on these; patient_id and phash are extras.
MANIFEST_COLUMNS = ["image_id", "path", "dataset", "class_name", "label", "split", "fold", "group_id",
                    "sha256", "width", "height", "patient_id", "phash", "a_overlap"]
_CACHE_COLUMNS = ["path", "file_size", "mtime_ns", "sha256", "phash", "phash_mirror", "thumb", "width", "height",
                  "error"]
_MAX_LISTED = 10       # skipped files / pairs printed in the summary (all of them are in audit.parquet)
_MAX_IN_ERROR = 5      # skipped files an error quotes (with their reasons)
_DECODE_THREADS = 8    # Pillow releases the GIL while decoding; more threads than cores hides file I/O


# ---------------------------------------------------------------------------------------------
# Decoding with a cache keyed by (path, size, mtime).
# ---------------------------------------------------------------------------------------------
def _decode_one(path: str) -> dict:
    row: dict = {"path": path, "file_size": -1, "mtime_ns": -1, "sha256": None, "phash": 0,
                 "phash_mirror": 0, "thumb": None, "width": -1, "height": -1, "error": None}
    try:
        st = os.stat(path)
        row["file_size"], row["mtime_ns"] = st.st_size, st.st_mtime_ns
        if st.st_size == 0:
            row["error"] = "empty file (0 bytes)"
            return row
        grey = read_grey(path)  # (H, W) uint8
    except ImageDecodeError as e:
        row["error"] = e.reason
        return row
    except FileNotFoundError:
        row["error"] = "file not found"
        return row
    except OSError as e:
        row["error"] = f"cannot access file: {e.strerror or e}"
        return row
    except Exception as e:  # a decoder bug on one odd file must not stop the other 779
        row["error"] = f"unexpected {type(e).__name__} while decoding: {e}"
        return row
    row["sha256"] = pixel_sha256(grey)
    row["phash"], row["phash_mirror"] = phash_pair(grey)
    row["thumb"] = thumbnail(grey).tobytes()  # (32, 32) uint8, for the near-duplicate check
    row["height"], row["width"] = grey.shape
    return row


def _load_cache(path: str) -> dict[tuple[str, int, int], dict]:
    if not storage.exists(path):
        return {}
    try:
        frame = storage.read_parquet(path)
    except Exception:  # a damaged cache is only a cache: decode again
        return {}
    if list(frame.columns) != _CACHE_COLUMNS:
        return {}
    return {(r["path"], int(r["file_size"]), int(r["mtime_ns"])): r for r in frame.to_dict("records")}


def decode_records(paths: list[str], cache_path: Optional[str] = None) -> pd.DataFrame:
    """Decode `paths` (reusing cache entries whose size and mtime still match) -> one row per path
    with _CACHE_COLUMNS; `error` holds the reason a file was unusable (else null)."""
    cache = _load_cache(cache_path) if cache_path else {}
    rows: dict[str, dict] = {}
    todo: list[str] = []
    for p in paths:
        try:
            st = os.stat(p)
            hit = cache.get((p, st.st_size, st.st_mtime_ns))
        except OSError:
            hit = None
        if hit is not None:
            rows[p] = hit
        else:
            todo.append(p)
    if todo:
        progress = Progress(len(todo), "prepare: decode", "images")
        with ThreadPoolExecutor(max_workers=min(_DECODE_THREADS, len(todo))) as pool:
            for row in pool.map(_decode_one, todo):
                rows[row["path"]] = row
                progress.update(1)
    frame = pd.DataFrame([rows[p] for p in paths], columns=_CACHE_COLUMNS)
    frame["phash"] = np.asarray([int(v) for v in frame["phash"]], dtype=np.uint64)
    frame["phash_mirror"] = np.asarray([int(v) for v in frame["phash_mirror"]], dtype=np.uint64)
    if cache_path and todo:
        _write_if_changed(cache_path, frame)
    return frame


# ---------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------
def _natural_key(text: str) -> list:
    """'benign (2)' before 'benign (10)'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
    return sink.getvalue()


def _write_if_changed(path: str, frame: pd.DataFrame) -> bool:
    """Write atomically unless the file already holds exactly these bytes (idempotent reruns)."""
    data = _parquet_bytes(frame)
    if storage.exists(path) and storage.read_bytes(path) == data:
        return False
    storage.write_bytes(path, data)
    return True


def _listing_frame(listing: SourceListing) -> pd.DataFrame:
    recs = sorted(listing.records, key=lambda r: (r.class_name, _natural_key(r.rel_path)))
    return pd.DataFrame({
        "path": [r.path for r in recs], "class_name": [r.class_name for r in recs],
        "dataset": [r.dataset for r in recs], "rel_path": [r.rel_path for r in recs],
        "patient_id": [r.patient_id for r in recs], "source_split": [r.source_split for r in recs],
    })


def _relative_note(listing: SourceListing) -> str:
    """How a manifest's relative paths were resolved (the usual cause of 'file not found')."""
    if listing.source != "manifest":
        return ""
    return (f"Relative paths in a manifest are resolved against the manifest's own folder, "
            f"{os.path.dirname(listing.root)}: write them relative to that folder, or absolute.")


def _check_classes_usable(frame: pd.DataFrame, listing: SourceListing, audit_rows: list[dict]) -> None:
    """Every class the source holds must keep at least one decodable image."""
    listed = sorted(set(r.class_name for r in listing.records))
    usable = set(frame["class_name"])
    for cls in listed:
        if cls not in usable:
            where = (f"manifest {listing.root}" if listing.source == "manifest"
                     else listing.class_dirs.get(cls, listing.root))
            bad = [r for r in audit_rows if r["kind"] == "skipped" and r["dataset"] == listing.dataset
                   and r["class_name"] == cls]
            shown = "\n".join(f"  {r['path']}: {r['reason']}" for r in bad[:_MAX_IN_ERROR])
            more = f"\n  ... and {len(bad) - _MAX_IN_ERROR} more" if len(bad) > _MAX_IN_ERROR else ""
            note = _relative_note(listing)
            raise MeddapError(f"Dataset {listing.dataset}: no image of class '{cls}' in {where} could be "
                              f"decoded; all {len(bad)} were skipped:\n{shown}{more}\n"
                              + (f"{note}\n" if note else "") + "Fix or replace the files.")


def _pair_rows(kind: str, dataset: str, pairs: list[DuplicatePair], left: pd.DataFrame, right: pd.DataFrame,
               near_bits: int, other_dataset: Optional[str] = None) -> list[dict]:
    rows = []
    for p in pairs:
        a, b = left.iloc[p.i], right.iloc[p.j]
        k = kind if kind == "ab_overlap" else ("exact_duplicate" if p.exact else "near_duplicate")
        rows.append({"kind": k, "dataset": dataset, "path": a["path"], "other_path": b["path"],
                     "class_name": a["class_name"], "other_class": b["class_name"], "distance": p.distance,
                     "reason": pair_reason(p, near_bits, other_dataset), "other_split": None})
    return rows


# ---------------------------------------------------------------------------------------------
# The stage.
# ---------------------------------------------------------------------------------------------
def run(cfg) -> dict:
    layout = RunLayout(cfg.run_dir)
    data = cfg.data
    storage.makedirs(layout.path("data"))

    listings = [list_source(cfg, "A")]
    if data.external.source:
        listings.append(list_source(cfg, "B"))
    audit_rows = [{"kind": f.kind, "dataset": f.dataset, "path": f.path, "class_name": f.class_name,
                   "reason": f.reason} for lst in listings for f in lst.findings]
    usable = _decode_usable(listings, layout, data.strict, audit_rows)

    a = usable[0]
    a_pairs = _audit_and_split_a(a, cfg, listings[0], audit_rows)
    parts, overlap = [a], []
    if len(usable) > 1:
        b = usable[1]
        overlap = _audit_external(b, a, cfg, audit_rows)
        parts.append(b)

    manifest = _manifest_frame(parts)
    audit = findings_frame(audit_rows)
    wrote_manifest = _write_if_changed(layout.manifest, manifest)
    wrote_audit = _write_if_changed(layout.audit, audit)

    summary = _summary(cfg, listings, manifest, audit, a_pairs, overlap, layout)
    summary.update({"manifest": layout.manifest, "audit": layout.audit,
                    "written": wrote_manifest or wrote_audit})
    return summary


def _decode_usable(listings: list[SourceListing], layout: RunLayout, strict: bool,
                   audit_rows: list[dict]) -> list[pd.DataFrame]:
    """Decode every listed file once; unusable ones become `skipped` findings (an error under strict).
    Returns per dataset the usable rows with their hashes and sizes."""
    frames = [_listing_frame(lst) for lst in listings]
    all_paths = [p for f in frames for p in f["path"]]
    seen: set[str] = set()
    for p in all_paths:
        if p in seen:
            raise MeddapError(f"file {p} is listed more than once (in Dataset A and B, or twice in a manifest); "
                              f"each image may belong to one dataset once.")
        seen.add(p)
    decoded = decode_records(all_paths, layout.path("data", "decode_cache.parquet")).set_index("path")
    usable: list[pd.DataFrame] = []
    for lst, frame in zip(listings, frames):
        info = decoded.loc[frame["path"]].reset_index(drop=True)
        frame = pd.concat([frame.reset_index(drop=True), info], axis=1)
        for r in frame[frame["error"].notna()].itertuples():
            audit_rows.append({"kind": "skipped", "dataset": lst.dataset, "path": r.path,
                               "class_name": r.class_name, "reason": r.error})
        usable.append(frame[frame["error"].isna()].reset_index(drop=True))
    skipped = [r for r in audit_rows if r["kind"] == "skipped"]
    if skipped and strict:
        listed = "\n".join(f"  {r['path']}: {r['reason']}" for r in skipped[:20])
        more = f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        raise MeddapError(f"{len(skipped)} file(s) cannot be used and data.strict=true:\n{listed}{more}\n"
                          f"Remove or repair them, or set data.strict=false to skip them (they are then "
                          f"listed in {layout.audit}).")
    for lst, frame in zip(listings, usable):
        _check_classes_usable(frame, lst, audit_rows)
    return usable


def _audit_and_split_a(a: pd.DataFrame, cfg, listing: SourceListing, audit_rows: list[dict]) -> list[DuplicatePair]:
    """Duplicates and groups of Dataset A, then its test split and folds (columns added in place)."""
    data = cfg.data
    near = data.near_duplicate_bits
    pairs = find_duplicates(a, near, data.near_duplicate_min_correlation)
    audit_rows += _pair_rows("dup", "A", pairs, a, a, near)
    a["group_id"] = assign_groups(a, pairs, "A")
    a["label"] = [data.classes.index(c) for c in a["class_name"]]
    fixed = None
    if a["source_split"].notna().any():
        # A manifest that brings its own split: keep it, and report groups it cuts (leaks we must not hide).
        fixed = a["source_split"].fillna("train").tolist()
        listing.notes.append("held-out test split taken from the manifest's split column "
                             "(data.test_fraction not used)")
        for gid, g in a.groupby("group_id"):
            if g["source_split"].fillna("train").nunique() > 1:
                t, o = g[g["source_split"] == "test"].iloc[0], g[g["source_split"] != "test"].iloc[0]
                audit_rows.append({"kind": "split_conflict", "dataset": "A", "path": t["path"],
                                   "other_path": o["path"], "class_name": t["class_name"],
                                   "other_class": o["class_name"],
                                   "reason": f"group {gid} has images in both the manifest's test and train splits"})
    sp = make_splits(a["label"], a["group_id"], len(data.classes), data.test_fraction, data.folds, data.seed,
                     fixed_split=fixed)
    a["split"], a["fold"] = sp["split"].to_numpy(), sp["fold"].to_numpy()
    return pairs


def _audit_external(b: pd.DataFrame, a: pd.DataFrame, cfg, audit_rows: list[dict]) -> list[DuplicatePair]:
    """Dataset B: its own duplicates and groups (for the record), split 'external', and its overlap with A."""
    data = cfg.data
    near, min_corr = data.near_duplicate_bits, data.near_duplicate_min_correlation
    b_pairs = find_duplicates(b, near, min_corr)
    audit_rows += _pair_rows("dup", "B", b_pairs, b, b, near)
    b["group_id"] = assign_groups(b, b_pairs, "B")
    b["label"] = [data.classes.index(c) for c in b["class_name"]]
    b["split"], b["fold"] = "external", -1
    ext = data.external
    overlap = find_overlap(b, a, near, min_corr, aligned_min_correlation=ext.match_min_correlation,
                           max_angle=ext.match_max_angle)
    rows = _pair_rows("ab_overlap", "B", overlap, b, a, near, other_dataset="A")
    for row, p in zip(rows, overlap):
        ar = a.iloc[p.j]
        row["other_split"] = ar["split"]
        row["reason"] += _a_where(ar)
    audit_rows += rows
    b["a_overlap"] = _overlap_with_groups(b, a, overlap, audit_rows)
    return overlap


def _a_where(ar) -> str:
    return f" (A image is in train, fold {int(ar['fold'])})" if ar["split"] == "train" else " (A image is in test)"


def _overlap_with_groups(b: pd.DataFrame, a: pd.DataFrame, overlap: list[DuplicatePair],
                         audit_rows: list[dict]) -> np.ndarray:
    """(n_b,) bool: B rows that copy an A image, directly or through their B group (file-name stem or a
    duplicate within B: `benign (36)-rotated2` is the same source image as a matched `benign (36)-sharpened`).
    Each B row flagged only through its group gets an `ab_overlap_group` audit row naming the match."""
    flag = np.zeros(len(b), bool)
    via: dict[str, DuplicatePair] = {}
    for p in overlap:
        flag[p.i] = True
        via.setdefault(b.iloc[p.i]["group_id"], p)
    for i, gid in enumerate(b["group_id"]):
        if flag[i] or gid not in via:
            continue
        flag[i] = True
        p = via[gid]
        sibling, ar = b.iloc[p.i], a.iloc[p.j]
        audit_rows.append({"kind": "ab_overlap_group", "dataset": "B", "path": b.iloc[i]["path"],
                           "other_path": ar["path"], "class_name": b.iloc[i]["class_name"],
                           "other_class": ar["class_name"], "other_split": ar["split"],
                           "reason": f"in B group {gid} with {sibling['path']}, which copies this A image"
                                     + _a_where(ar)})
    return flag


def _manifest_frame(parts: list[pd.DataFrame]) -> pd.DataFrame:
    manifest = pd.concat(parts, ignore_index=True)
    overlap = manifest["a_overlap"] if "a_overlap" in manifest else pd.Series(False, index=manifest.index)
    manifest["a_overlap"] = overlap.fillna(False).astype(bool)  # Dataset A rows: always false
    manifest["image_id"] = manifest["dataset"] + "/" + manifest["rel_path"]
    manifest["phash"] = [f"{int(v):016x}" for v in manifest["phash"]]
    manifest["patient_id"] = pd.array([v if isinstance(v, str) else None for v in manifest["patient_id"]],
                                      dtype="string")
    return manifest[MANIFEST_COLUMNS].astype({"label": "int64", "fold": "int64", "width": "int64",
                                              "height": "int64"})


# ---------------------------------------------------------------------------------------------
# The printed summary.
# ---------------------------------------------------------------------------------------------
def _summary(cfg, listings, manifest: pd.DataFrame, audit: pd.DataFrame, a_pairs, overlap, layout) -> dict:
    classes = list(cfg.data.classes)
    K = cfg.data.folds

    def say(line: str) -> None:
        logs.say(f"[prepare] {line}")

    for lst in listings:
        n = int((manifest["dataset"] == lst.dataset).sum())
        n_skip = int(((audit["kind"] == "skipped") & (audit["dataset"] == lst.dataset)).sum())
        say(f"Dataset {lst.dataset} ({lst.source}: {lst.root}): {n} images, {n_skip} skipped, "
            f"{lst.masks} masks set aside")
        for note in lst.notes:
            say(f"  note: {note}")

    a = manifest[manifest["dataset"] == "A"]
    header = f"  {'class':<12}{'train':>7}{'test':>7}{'external':>10}   train per fold (0..{K - 1})"
    say("images per class and split:")
    logs.say(header)
    counts: dict[str, dict] = {}
    for cls in classes:
        m = manifest[manifest["class_name"] == cls]
        tr, te, ex = (int((m["split"] == s).sum()) for s in ("train", "test", "external"))
        per_fold = [int(((m["split"] == "train") & (m["fold"] == k)).sum()) for k in range(K)]
        counts[cls] = {"train": tr, "test": te, "external": ex, "folds": per_fold}
        logs.say(f"  {cls:<12}{tr:>7}{te:>7}{ex:>10}   {'/'.join(map(str, per_fold))}")
    tot = {s: int((manifest["split"] == s).sum()) for s in ("train", "test", "external")}
    logs.say(f"  {'total':<12}{tot['train']:>7}{tot['test']:>7}{tot['external']:>10}")
    for cls, c in counts.items():
        if 0 in c["folds"] or c["test"] == 0:
            say(f"  warning: class '{cls}' is missing from "
                + ("the test split" if c["test"] == 0 else "")
                + (" and " if c["test"] == 0 and 0 in c["folds"] else "")
                + (f"fold(s) {[k for k, v in enumerate(c['folds']) if v == 0]}" if 0 in c["folds"] else "")
                + " (too few images or groups of it); its metrics there are undefined.")

    def count(kind: str) -> int:
        return int((audit["kind"] == kind).sum())

    skipped = audit[audit["kind"] == "skipped"]
    if len(skipped):
        say(f"skipped {len(skipped)} unusable file(s):")
        for r in skipped.head(_MAX_LISTED).itertuples():
            logs.say(f"  {r.path}: {r.reason}")
        if len(skipped) > _MAX_LISTED:
            logs.say(f"  ... {len(skipped) - _MAX_LISTED} more in {layout.audit}")
    for lst in listings:
        if any(r.kind == "skipped" and r.dataset == lst.dataset for r in skipped.itertuples()) and _relative_note(lst):
            say(f"  note: {_relative_note(lst)}")
    for lst in listings:
        unknown = audit[(audit["kind"] == "unknown_class") & (audit["dataset"] == lst.dataset)]
        if len(unknown):
            counts = unknown["class_name"].fillna("").value_counts()
            named = ", ".join(f"{name!r} ({n})" for name, n in counts.items())
            what = ("manifest row(s) whose class_name" if lst.source == "manifest"
                    else "file(s) in class folders whose name")
            say(f"Dataset {lst.dataset}: {len(unknown)} {what} is not in data.classes {classes}, not used: {named}. "
                f"Fix the names, or add the classes to data.classes (every such path is in {layout.audit}).")
    for kind, what in (("ignored", "file(s) ignored (hidden/system files, files outside class folders)"),
                       ("split_conflict", "group(s) straddling the manifest's own train/test split")):
        if count(kind):
            say(f"{count(kind)} {what}; e.g. {audit[audit['kind'] == kind]['path'].iloc[0]}")

    groups = a.groupby("group_id").size()
    n_exact = sum(p.exact for p in a_pairs)
    a_dups = audit[(audit["dataset"] == "A") & audit["kind"].isin(["exact_duplicate", "near_duplicate"])]
    conflicting = int((a_dups["class_name"] != a_dups["other_class"]).sum())
    say(f"duplicates within A: {n_exact} exact, {len(a_pairs) - n_exact} near pair(s)"
        + (f", {conflicting} of them filed under different classes" if conflicting else "")
        + f"; {len(groups)} leakage-safe groups (largest: {int(groups.max()) if len(groups) else 0} images)")
    b_dups = audit[(audit["dataset"] == "B") & audit["kind"].isin(["exact_duplicate", "near_duplicate"])]
    if len(listings) > 1:
        ov = audit[audit["kind"] == "ab_overlap"]
        n_b = ov["path"].nunique()
        n_train = ov[ov["other_split"] == "train"]["path"].nunique()
        n_exact_ov = int(ov["reason"].str.startswith("identical").sum())
        n_aligned = int(ov["reason"].str.startswith("aligned").sum())
        n_flagged = int(manifest["a_overlap"].sum())
        say(f"duplicates within B: {int((b_dups['kind'] == 'exact_duplicate').sum())} exact, "
            f"{int((b_dups['kind'] == 'near_duplicate').sum())} near pair(s); "
            f"A/B overlap: {len(ov)} pair(s) ({n_exact_ov} exact, {len(ov) - n_exact_ov - n_aligned} near, "
            f"{n_aligned} rotated/mirrored/rescaled copies); "
            f"{n_b} of {int((manifest['dataset'] == 'B').sum())} B images match an A image, "
            f"{n_train} match an A training image; {n_flagged} B images flagged a_overlap "
            f"(with their B group mates)")
        for r in ov.head(5).itertuples():
            how = f"d={r.distance}" if pd.notna(r.distance) else r.reason.split("(")[-1].rstrip(")")
            logs.say(f"  {r.path} ~ {r.other_path} ({how}, A {r.other_split})")
        if cfg.data.external.exclude_overlap and n_flagged:
            say(f"data.external.exclude_overlap=true: the {n_flagged} flagged B images are left out of the "
                f"external evaluation and Table 3 (the report also gives Table 3 on all B images)")
    say(f"manifest: {layout.manifest} ({len(manifest)} rows); audit: {layout.audit} ({len(audit)} findings)")
    return {
        "images": len(manifest), "counts": counts, "skipped": len(skipped),
        "exact_pairs_a": n_exact, "near_pairs_a": len(a_pairs) - n_exact, "groups_a": len(groups),
        "ab_overlap_pairs": int((audit["kind"] == "ab_overlap").sum()),
        "b_overlap_images": int(manifest["a_overlap"].sum()),
    }
