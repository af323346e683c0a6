"""The four dataset sources: which files are images of which class. Nothing is decoded here.

  busi         root/<class>/*               BUSI as it ships (masks `*_mask.png`, `*_mask_1.png` ignored)
  imagefolder  root/<class>/*  or  root/<split>/<class>/*  (Kaggle Dataset B: root/{train,val}/{benign,malignant}/)
  manifest     a CSV or Parquet file with columns path, class_name [, patient_id, split]
  phantom      the embedded generator, written to run_dir/data/phantom/{A,B}/, then read as busi

Class folders (and manifest class names) are matched to `data.classes` by name, ignoring case; the
label is the position in `data.classes`. Folders of other classes are reported, not read. Dataset A
must hold every configured class; Dataset B (external) may hold a subset.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from meddap import storage
from meddap.errors import MeddapError

__all__ = [
    "ImageRecord",
    "Finding",
    "SourceListing",
    "list_source",
    "list_busi",
    "list_imagefolder",
    "list_manifest",
    "write_phantom_dataset",
    "is_mask",
    "SPLIT_VALUES",
]

# Stems like "benign (12)_mask", "benign (12)_mask_1", "x-mask", "x_Mask2".
_MASK_RE = re.compile(r"[_\- ]mask(?:[_\- ]?\d+)?$", re.IGNORECASE)
# Operating-system litter: reported as ignored, never decoded and never an error under data.strict.
_SYSTEM_FILES = {"thumbs.db", "desktop.ini", ".ds_store"}
_MANIFEST_EXTS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
SPLIT_VALUES = ("train", "test")


@dataclass
class ImageRecord:
    """One candidate image file of a dataset."""

    path: str                           # absolute local path
    class_name: str                     # as in cfg.data.classes
    dataset: str                        # "A" | "B"
    rel_path: str                       # path relative to the source root (used in image_id and group keys)
    patient_id: Optional[str] = None
    source_split: Optional[str] = None  # a manifest's own split column ("train" | "test"), if any


@dataclass
class Finding:
    """A file the source did not turn into an image record, and why."""

    kind: str      # "unknown_class" | "ignored" | "skipped"
    path: str
    dataset: str
    reason: str
    class_name: Optional[str] = None


@dataclass
class SourceListing:
    dataset: str
    source: str
    root: str
    records: list[ImageRecord] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    masks: int = 0
    notes: list[str] = field(default_factory=list)
    class_dirs: dict[str, str] = field(default_factory=dict)  # class -> folder read (for error messages)


def is_mask(path: str | Path) -> bool:
    """True for segmentation masks stored next to images (BUSI: `name_mask.png`, `name_mask_1.png`)."""
    return bool(_MASK_RE.search(Path(path).stem))


def _is_system_file(p: Path, folder: Path | None = None) -> bool:
    """Dotfiles, files in dot-folders below `folder` (.ipynb_checkpoints/), and OS litter."""
    parts = p.relative_to(folder).parts if folder is not None else (p.name,)
    return any(part.startswith(".") for part in parts) or p.name.lower() in _SYSTEM_FILES


def _match_classes(folders: list[Path], classes: list[str], where: str) -> tuple[dict[str, Path], list[Path]]:
    """Class name -> folder (case-insensitive match), plus folders that match no class."""
    by_lower = {c.lower(): c for c in classes}
    found: dict[str, Path] = {}
    unknown: list[Path] = []
    for d in folders:
        cls = by_lower.get(d.name.lower())
        if cls is None:
            unknown.append(d)
            continue
        if cls in found:
            raise MeddapError(f"{where}: two folders match class '{cls}': {found[cls]} and {d}. "
                              f"Keep one (class folders are matched by name, ignoring case).")
        found[cls] = d
    return found, unknown


def _subdirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _read_class_folders(listing: SourceListing, class_root: Path, classes: list[str],
                        require_all: bool, own_files: frozenset[str] = frozenset()) -> None:
    """Fill `listing` from class_root/<class>/** (masks and system files set aside). Loose files in
    class_root are reported as ignored, except `own_files` (e.g. the phantom's phantom.json)."""
    dataset = listing.dataset
    for p in sorted(class_root.iterdir()):
        if p.is_file() and p.name not in own_files and p.name.lower() not in _SYSTEM_FILES:
            listing.findings.append(Finding("ignored", str(p.absolute()), dataset,
                                            "not inside a class folder"))
    found, unknown = _match_classes(_subdirs(class_root), classes, f"Dataset {dataset} at {class_root}")
    if not found:
        present = [d.name for d in _subdirs(class_root)]
        raise MeddapError(
            f"Dataset {dataset}: no class folder under {class_root} matches data.classes {classes} "
            f"(found folders: {present or 'none'}). Expected {class_root}/<class>/ image folders"
            + ("; for root/<split>/<class>/ set the split key (data.split or data.external.split)." if present else "."))
    missing = [c for c in classes if c not in found]
    if missing and require_all:
        raise MeddapError(
            f"Dataset {dataset}: class folder(s) {missing} missing under {class_root} "
            f"(found: {sorted(d.name for d in _subdirs(class_root))}). Every class in data.classes needs "
            f"a folder, or remove the class from data.classes.")
    if missing:
        listing.notes.append(f"Dataset {dataset} holds no {', '.join(missing)} images (classes it lacks)")
    for d in unknown:
        for p in _files_under(d):
            if not is_mask(p) and not _is_system_file(p):
                listing.findings.append(Finding(
                    "unknown_class", str(p.absolute()), dataset,
                    f"class folder '{d.name}' is not in data.classes {classes}", class_name=d.name))
    for cls in classes:
        if cls not in found:
            continue
        folder = found[cls]
        listing.class_dirs[cls] = str(folder.absolute())
        n_images = n_masks = 0
        for p in _files_under(folder):
            if _is_system_file(p, folder):
                listing.findings.append(Finding("ignored", str(p.absolute()), dataset,
                                                "hidden or operating-system file", cls))
            elif is_mask(p):
                n_masks += 1
            else:
                n_images += 1
                listing.records.append(ImageRecord(
                    str(p.absolute()), cls, dataset, p.relative_to(class_root).as_posix()))
        listing.masks += n_masks
        if n_images == 0:
            raise MeddapError(f"Dataset {dataset}: class folder {folder} holds no image files"
                              + (f" (only {n_masks} masks)" if n_masks else "")
                              + ". Put the class's images there, or remove the class from data.classes"
                              + (" (Dataset B may hold a subset)." if dataset == "B" else "."))


def _existing_dir(root: str | None, dataset: str, key: str) -> Path:
    if not root:
        raise MeddapError(f"Dataset {dataset}: {key} is not set; give the dataset folder ({key}=/path).")
    p = Path(root).expanduser()
    if not p.exists():
        raise MeddapError(f"Dataset {dataset}: {key} {p} does not exist. Check the path ({key}=...).")
    if not p.is_dir():
        raise MeddapError(f"Dataset {dataset}: {key} {p} is a file, not a folder of class folders.")
    return p.absolute()


def list_busi(root: str, classes: list[str], dataset: str = "A", key: str = "data.root",
              require_all: bool = True, own_files: frozenset[str] = frozenset()) -> SourceListing:
    """root/<class>/* as BUSI ships it; masks set aside."""
    r = _existing_dir(root, dataset, key)
    listing = SourceListing(dataset, "busi", str(r))
    _read_class_folders(listing, r, classes, require_all, own_files)
    return listing


def list_imagefolder(root: str, classes: list[str], split: str | None = None, dataset: str = "A",
                     key: str = "data.root", split_key: str = "data.split",
                     require_all: bool = True) -> SourceListing:
    """root/<class>/* or, with `split`, root/<split>/<class>/*."""
    r = _existing_dir(root, dataset, key)
    lower_classes = {c.lower() for c in classes}
    direct = any(d.name.lower() in lower_classes for d in _subdirs(r))
    listing = SourceListing(dataset, "imagefolder", str(r))
    if split:
        class_root = r / split
        if not class_root.is_dir():
            if direct:
                # The external default split ('val') should not break a plain root/<class>/ layout.
                listing.notes.append(f"Dataset {dataset}: {r} has no '{split}' folder but holds class "
                                     f"folders directly; read root/<class>/ ({split_key} ignored)")
                class_root = r
            else:
                raise MeddapError(
                    f"Dataset {dataset}: split folder {class_root} does not exist ({split_key}={split!r}); "
                    f"folders under {r}: {[d.name for d in _subdirs(r)] or 'none'}. Set {split_key} to one of them.")
    else:
        class_root = r
        if not direct:
            splits = [d.name for d in _subdirs(r)
                      if any(s.name.lower() in lower_classes for s in _subdirs(d))]
            if splits:
                raise MeddapError(
                    f"Dataset {dataset}: {r} is laid out as root/<split>/<class>/ with splits {splits}; "
                    f"choose one with {split_key}=<split> (the Kaggle Dataset B test images are 'val').")
    listing.root = str(class_root)
    _read_class_folders(listing, class_root, classes, require_all)
    return listing


def _read_table(path: Path) -> pd.DataFrame:
    kind = _MANIFEST_EXTS.get(path.suffix.lower())
    if kind is None:
        raise MeddapError(f"manifest {path}: unknown file type '{path.suffix}'; use .csv or .parquet.")
    try:
        if kind == "csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        return pd.read_parquet(path)
    except Exception as e:  # pandas/pyarrow raise many types for a damaged table
        raise MeddapError(f"manifest {path} cannot be read as {kind}: {e}") from None


def _clean(value) -> Optional[str]:
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NA:
        return None
    text = str(value).strip()
    return text or None


def _confine(raw: str, base: Path, images_root: Path | None) -> tuple[Path | None, str]:
    """(absolute path, '') of a manifest row's path, or (None, why) when it leaves its root: with
    `images_root`, every path must lie in it; without, relative paths must stay in the manifest's
    folder (`base`). Checked on the path as written (.. resolved, links not followed), so a dataset
    folder made of symlinks still works."""
    p = Path(raw).expanduser()
    root = images_root or base
    if p.is_absolute() and images_root is None:
        return Path(os.path.normpath(p)), ""
    full = Path(os.path.normpath(p if p.is_absolute() else root / p))
    if full != root and root not in full.parents:
        what = "absolute path" if p.is_absolute() else "relative path"
        return None, f"{what} {raw!r} leaves {root}"
    return full, ""


def list_manifest(path: str, classes: list[str], split: str | None = None, dataset: str = "A",
                  key: str = "data.root", split_key: str = "data.split",
                  require_all: bool = True, images_root: str | None = None,
                  images_root_key: str = "data.images_root") -> SourceListing:
    """Rows of a CSV/Parquet manifest: `path` (absolute, or relative to the manifest's folder or to
    `images_root`), `class_name`, optional `patient_id` and `split`. With `split` set, only rows of that
    split. Paths that leave their root (see _confine) are refused: a manifest from elsewhere cannot make
    the run read (or list in its outputs) files outside the dataset."""
    if not path:
        raise MeddapError(f"Dataset {dataset}: {key} is not set; give the manifest file ({key}=/path/x.csv).")
    mpath = Path(path).expanduser()
    if not mpath.is_file():
        raise MeddapError(f"Dataset {dataset}: manifest {mpath} does not exist or is not a file ({key}=...).")
    mpath = mpath.absolute()
    table = _read_table(mpath)
    missing = [c for c in ("path", "class_name") if c not in table.columns]
    if missing:
        raise MeddapError(f"manifest {mpath} lacks column(s) {missing}; it has {list(table.columns)}. "
                          f"Needed: path, class_name; optional: patient_id, split.")
    listing = SourceListing(dataset, "manifest", str(mpath))
    has_split = "split" in table.columns
    if split:
        if not has_split:
            raise MeddapError(f"manifest {mpath} has no 'split' column but {split_key}={split!r} asks for one; "
                              f"add the column or set {split_key}=null.")
        values = table["split"].map(_clean)
        if not (values == split).any():
            raise MeddapError(f"manifest {mpath}: no rows with split {split!r} ({split_key}); "
                              f"values present: {sorted(set(v for v in values if v))}.")
        table = table[values == split]
    by_lower = {c.lower(): c for c in classes}
    base = Path(os.path.normpath(mpath.parent))
    confine = None
    if images_root:
        confine = Path(os.path.normpath(Path(images_root).expanduser().absolute()))
        if not confine.is_dir():
            raise MeddapError(f"Dataset {dataset}: {images_root_key} {confine} does not exist or is not a folder.")
    escaping = []
    for i, row in enumerate(table.itertuples(index=False)):
        row = row._asdict()
        raw_path = _clean(row["path"])
        cls_raw = _clean(row["class_name"])
        if raw_path is None:
            listing.findings.append(Finding("skipped", f"{mpath}#row{i}", dataset, "empty path in manifest row"))
            continue
        p, why = _confine(raw_path, base, confine)
        if p is None:
            escaping.append(f"row {i}: {why}")
            continue
        cls = by_lower.get((cls_raw or "").lower())
        if cls is None:
            listing.findings.append(Finding("unknown_class", str(p), dataset,
                                            f"class_name {cls_raw!r} is not in data.classes {classes}",
                                            class_name=cls_raw or ""))
            continue
        if is_mask(p):
            listing.masks += 1
            continue
        src_split = _clean(row.get("split")) if has_split and not split else None
        if src_split is not None and src_split not in SPLIT_VALUES:
            raise MeddapError(f"manifest {mpath}: split value {src_split!r} (row {i}) is not one of "
                              f"{list(SPLIT_VALUES)}; the test split comes from it, folds are made from 'train'.")
        try:
            rel = p.relative_to(confine or base).as_posix()
        except ValueError:
            rel = p.as_posix()
        listing.records.append(ImageRecord(str(p), cls, dataset, rel,
                                           patient_id=_clean(row.get("patient_id")), source_split=src_split))
    if escaping:
        root = confine or base
        raise MeddapError(
            f"manifest {mpath}: {len(escaping)} path(s) leave {'the images root' if confine else 'its folder'} "
            f"{root} ({'; '.join(escaping[:3])}{' ...' if len(escaping) > 3 else ''}). Refused: a manifest may "
            f"only list images inside its root. Fix the paths, or set {images_root_key} to the folder that holds "
            f"every image (relative paths are then read from it).")
    present = {r.class_name for r in listing.records}
    missing_cls = [c for c in classes if c not in present]
    if not present:
        raise MeddapError(f"Dataset {dataset}: manifest {mpath} lists no images of the classes {classes}.")
    if missing_cls and require_all:
        raise MeddapError(f"Dataset {dataset}: manifest {mpath} lists no images of class(es) {missing_cls}; "
                          f"add them or remove the class(es) from data.classes.")
    if missing_cls:
        listing.notes.append(f"Dataset {dataset} holds no {', '.join(missing_cls)} images (classes it lacks)")
    return listing


def _phantom_dir(run_dir: str, dataset: str) -> Path:
    if storage.is_uri(run_dir):
        # Images are read by local path; with an object-store run_dir they live in a local cache.
        tag = hashlib.sha256(run_dir.encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir(), "meddap-phantom", tag, dataset)
    return Path(storage.join(run_dir, "data", "phantom", dataset)).expanduser().absolute()


def write_phantom_dataset(run_dir: str, dataset: str, phantom_cfg, classes: list[str]) -> Path:
    """Write the phantom in the BUSI layout under run_dir/data/phantom/<dataset>. write_phantom keeps
    files already written with the same settings and removes surplus ones, so a rerun costs a few stats."""
    from meddap.data.phantom import write_phantom

    out = _phantom_dir(run_dir, dataset)
    write_phantom(str(out), per_class=phantom_cfg.per_class, variant=phantom_cfg.variant, size=phantom_cfg.size,
                  seed=phantom_cfg.seed, classes=tuple(classes), say=False)  # prepare's summary reports the images
    return out


def _external_phantom_classes(classes: list[str]) -> list[str]:
    """Like Kaggle's Dataset B: the lesion classes only (no 'normal'), when that leaves two or more."""
    lesions = [c for c in classes if c.lower() != "normal"]
    return lesions if len(lesions) >= 2 else list(classes)


def list_source(cfg, dataset: str) -> SourceListing:
    """The listing of Dataset A (`dataset="A"`, cfg.data) or B (`"B"`, cfg.data.external)."""
    data = cfg.data
    classes = list(data.classes)
    if dataset == "A":
        sec, prefix, require_all = data, "data", True
    else:
        sec, prefix, require_all = data.external, "data.external", False
    key, split_key = f"{prefix}.root", f"{prefix}.split"
    if sec.source == "busi":
        return list_busi(sec.root, classes, dataset, key, require_all)
    if sec.source == "imagefolder":
        return list_imagefolder(sec.root, classes, sec.split, dataset, key, split_key, require_all)
    if sec.source == "manifest":
        return list_manifest(sec.root, classes, sec.split, dataset, key, split_key, require_all,
                             images_root=sec.images_root, images_root_key=f"{prefix}.images_root")
    if sec.source == "phantom":
        ph_classes = classes if dataset == "A" else _external_phantom_classes(classes)
        folder = write_phantom_dataset(cfg.run_dir, dataset, sec.phantom, ph_classes)
        listing = list_busi(str(folder), classes, dataset, f"{prefix}.phantom", require_all,
                            own_files=frozenset({"phantom.json"}))
        listing.source = "phantom"
        return listing
    raise MeddapError(f"{prefix}.source {sec.source!r} is not a known source (busi, imagefolder, manifest, phantom).")
