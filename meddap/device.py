"""Which torch device and precision a piece of work runs with: plain PyTorch, no Ray.

Ray decides WHERE work runs (a worker that asked for a GPU lands on a GPU node); this module decides
what the work then computes on:

- `compute_device(gpu, what)`: CUDA when the work was given a GPU, the CPU when not. A worker that
  was given a GPU but sees no CUDA device is an error, never a silent CPU run.
- `MEDDAP_DEVICE=cpu` (an environment variable, for tests): compute on the CPU even where Ray gave
  the work a GPU. Ray's resource requests stay as they are, so a CPU machine whose Ray declares
  logical GPUs (`ray start --num-gpus`, the autoscaler's fake multi-node provider) runs the whole
  GPU scheduling path. Unset (or `auto`): the rule above.
- `native_bf16(device)`: bf16 only where the GPU has it in hardware (Ampere and newer). Turing
  (RTX 2080 Ti) reports bf16 as supported through emulation, which is slower than fp16; the
  precision rules use fp16 with loss scaling there.

Nothing here imports Ray, so `python -m meddap bench gpu` runs on a machine without it.
"""

from __future__ import annotations

import os

import torch

from meddap.errors import MeddapError

__all__ = ["DEVICE_ENV", "forced_cpu", "compute_device", "native_bf16", "describe"]

DEVICE_ENV = "MEDDAP_DEVICE"
_CHOICES = ("auto", "cpu")


def forced_cpu() -> bool:
    """True when MEDDAP_DEVICE=cpu asks for CPU compute whatever Ray assigned."""
    value = os.environ.get(DEVICE_ENV, "").strip().lower()
    if value in ("", "auto"):
        return False
    if value not in _CHOICES:
        raise MeddapError(f"environment variable {DEVICE_ENV}={value!r} is not understood: expected one of "
                          f"{', '.join(_CHOICES)} (cpu: compute on the CPU where Ray gave a GPU; for tests).")
    return True


def compute_device(gpu: bool, what: str) -> torch.device:
    """The device `what` (e.g. "fine-tuning worker") computes on, given whether Ray gave it a GPU."""
    if forced_cpu():
        return torch.device("cpu")
    if not gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise MeddapError(
            f"the {what} was scheduled with a GPU, but torch sees no CUDA device here "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}). Install a CUDA build of "
            f"torch on the GPU nodes, or declare no GPUs for this work (diffusion.train.use_gpu=false, "
            f"generate.use_gpu=false, classify.gpus_per_trial=0). {DEVICE_ENV}=cpu computes on the CPU "
            f"while keeping the GPU requests (meant for tests on machines without GPUs).")
    return torch.device("cuda", torch.cuda.current_device())


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware on this CUDA device (not emulated); False on the CPU."""
    if device.type != "cuda":
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no including_emulation: compute capability 8.0+ has bf16 units
        return torch.cuda.get_device_capability(device)[0] >= 8


def describe(device: torch.device) -> str:
    """One line naming the device, e.g. 'cuda:0 (NVIDIA H100 80GB HBM3, bf16 native)'."""
    if device.type != "cuda":
        forced = f", {DEVICE_ENV}=cpu" if forced_cpu() else ""
        return f"cpu ({torch.get_num_threads()} threads{forced})"
    name = torch.cuda.get_device_name(device)
    return f"{device} ({name}, bf16 {'native' if native_bf16(device) else 'not native: fp16 + loss scaling'})"
