"""`python -m meddap bench classify [--size S] [--images N] [--models a,b] [--loader-workers W]`.

Training throughput (images/s) per classifier for two input paths, in the same run:
  in-memory: images decoded once into a (N, 1, S, S) uint8 tensor, batches flipped, expanded to 3
             channels and normalised on the device (what `meddap.classify.trial` does);
  file DataLoader: every epoch opens and decodes each PNG, resizes, flips and normalises it per
             image (torchvision ImageFolder-style transforms, what the authors' script does).
Both run the same training step (Adam, cross-entropy) on the same model; the ratio is in-memory /
file. Images are breast-ultrasound phantoms written at --source-size (BUSI's PNGs are ~500 px).
On a CUDA machine it also reports in-memory images/s at 224 px with autocast + channels_last
(target on an H100: ~7,000 images/s for ResNet34, i.e. ~20 % of the bf16 FLOP limit).
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import tempfile
import time

import torch

__all__ = ["main"]


def _parse(argv: list[str], cfg) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m meddap bench classify",
                                description="classifier training images/s: in-memory tensors vs file DataLoader")
    p.add_argument("--size", type=int, default=cfg.classify_image_size, help="training side in pixels")
    p.add_argument("--images", type=int, default=192, help="images per timed epoch")
    p.add_argument("--models", default=",".join(cfg.classify.models), help="comma-separated torchvision names")
    p.add_argument("--batch-size", type=int, default=cfg.classify.batch_size)
    p.add_argument("--source-size", type=int, default=500, help="side of the PNG files decoded (BUSI ~500)")
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader worker processes for the file path")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--gpu-size", type=int, default=224, help="image side for the GPU figures")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed epochs per path, interleaved; the best is kept (shared machines are noisy)")
    return p.parse_args(argv)


class _FileDataset(torch.utils.data.Dataset):
    """Decode + resize + flip + normalise per image, every epoch (ImageFolder with torchvision transforms)."""

    def __init__(self, paths: list[str], labels: list[int], size: int):
        from torchvision import transforms as T

        from meddap.classify.data import IMAGENET_MEAN, IMAGENET_STD

        self.paths, self.labels = paths, labels
        self.transform = T.Compose([T.Resize((size, size)), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            x = self.transform(img.convert("RGB"))                                   # (3, S, S)
        return x, self.labels[i]


def _images(folder: str, n: int, source_size: int) -> tuple[list[str], list[int]]:
    """n phantom PNGs at source_size px. The phantom is rendered at <= 128 px (rendering 500 px
    phantoms takes ~1 s each) and upscaled, so the files cost what BUSI-sized PNGs cost to decode."""
    from PIL import Image

    from meddap.data.phantom import write_phantom

    classes = ("benign", "malignant", "normal")
    render = os.path.join(folder, "render")
    write_phantom(render, per_class=math.ceil(n / len(classes)), size=min(source_size, 128), seed=0, classes=classes)
    paths, labels = [], []
    for label, c in enumerate(classes):
        found = sorted(p for p in glob.glob(os.path.join(render, c, "*.png")) if "_mask" not in os.path.basename(p))
        for src in found:
            dst = os.path.join(folder, f"{c}-{os.path.basename(src)}")
            with Image.open(src) as img:
                img.convert("RGB").resize((source_size, source_size), Image.Resampling.BICUBIC).save(dst)
            paths.append(dst)
            labels.append(label)
    order = sorted(range(len(paths)), key=lambda i: (i % math.ceil(n / len(classes)), labels[i]))[:n]
    return [paths[i] for i in order], [labels[i] for i in order]


def _in_memory_rate(model, images_u8, labels, batch, device, amp, channels_last) -> float:
    """Training images/s over one epoch of the resident uint8 tensor (after one warm-up batch)."""
    from meddap.classify.data import model_input
    from meddap.classify.trial import train_step

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    gen = torch.Generator(device=device).manual_seed(0)
    x_all, y_all = images_u8.to(device), labels.to(device)                        # (N, 1, S, S) uint8
    model.train()
    warm = x_all[:batch]
    train_step(model, opt, scaler, model_input(warm, flip=True, generator=gen, channels_last=channels_last),
               y_all[:batch], amp)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, seen = time.perf_counter(), 0
    order = torch.randperm(x_all.shape[0], device=device, generator=gen)
    for i in range(0, x_all.shape[0] - 1, batch):
        idx = order[i:i + batch]
        x = model_input(x_all[idx], flip=True, generator=gen, channels_last=channels_last)  # (B, 3, S, S)
        train_step(model, opt, scaler, x, y_all[idx], amp)
        seen += idx.numel()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - t0)


def _file_rate(model, paths, labels, size, batch, workers) -> float:
    from meddap.classify.trial import train_step

    loader = torch.utils.data.DataLoader(_FileDataset(paths, labels, size), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.train()
    t0, seen = time.perf_counter(), 0
    for x, y in loader:                       # decoding happens here, inside the timed epoch
        train_step(model, opt, scaler, x, y, None)
        seen += x.shape[0]
    return seen / (time.perf_counter() - t0)


def main(cfg, argv: list[str]) -> dict:
    from meddap.classify.data import decode_images
    from meddap.classify.models import build_classifier
    from meddap.classify.trial import autocast_dtype

    args = _parse(argv, cfg)
    torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    cpu = torch.device("cpu")
    results = {}
    with tempfile.TemporaryDirectory(prefix="meddap-bench-classify-") as folder:
        paths, labels = _images(folder, args.images, args.source_size)
        t0 = time.perf_counter()
        images = torch.from_numpy(decode_images(paths, args.size, what="decode once"))    # (N, 1, S, S) uint8
        decode_s = time.perf_counter() - t0
        y = torch.tensor(labels)
        print(f"[bench classify] CPU, {args.threads} threads, {len(paths)} phantom PNGs of {args.source_size} px -> "
              f"{args.size} px, batch {args.batch_size}, file loader workers {args.loader_workers}; "
              f"decoding them once took {decode_s:.2f}s ({len(paths) / decode_s:.0f} images/s)")
        print(f"{'classifier':<16}{'in-memory img/s':>17}{'file-loader img/s':>19}{'ratio':>8}")
        for name in models:
            mem_rates, file_rates = [], []
            for _ in range(args.repeats):  # interleaved, so a burst of load hits both paths alike
                torch.manual_seed(0)
                mem_rates.append(_in_memory_rate(build_classifier(name, 3), images, y, args.batch_size, cpu, None,
                                                 False))
                torch.manual_seed(0)
                file_rates.append(_file_rate(build_classifier(name, 3), paths, labels, args.size, args.batch_size,
                                             args.loader_workers))
            mem, files = max(mem_rates), max(file_rates)
            results[name] = {"in_memory": mem, "file_loader": files, "ratio": mem / files}
            print(f"{name:<16}{mem:>17.1f}{files:>19.1f}{mem / files:>7.2f}x", flush=True)
        print(f"[bench classify] best of {args.repeats} epochs per path; load average now "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

        if torch.cuda.is_available():
            dev = torch.device("cuda")
            amp = autocast_dtype(cfg.classify.mixed_precision, dev)
            gpu_images = torch.from_numpy(decode_images(paths, args.gpu_size, what="decode for GPU"))
            print(f"[bench classify] GPU {torch.cuda.get_device_name(dev)}, {args.gpu_size} px, autocast {amp}, "
                  f"channels_last, batch {args.batch_size}")
            for name in models:
                torch.manual_seed(0)
                model = build_classifier(name, 3).to(dev).to(memory_format=torch.channels_last)
                rate = _in_memory_rate(model, gpu_images, y, args.batch_size, dev, amp, True)
                results[name]["gpu"] = rate
                print(f"{name:<16}{rate:>17.1f} img/s on GPU", flush=True)
        else:
            print("[bench classify] GPU figures: no CUDA device on this machine; pending a GPU run "
                  "(target on an H100: ~7,000 images/s for resnet34 at 224 px).")
    return results
