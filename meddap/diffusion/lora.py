"""USLoRA: peft LoRA on Stable Diffusion's UNet cross-attention, nothing else trainable.

The paper puts LoRA on the UNet's cross-attention layers only (diffusers names them `attn2`): the
query, key, value and output projections. The authors' public code put it on every attention
processor (self- and cross-attention); that is available as `all_attention` for comparison.

Saved in diffusers' LoRA format (`pytorch_lora_weights.safetensors`), which any diffusers user loads
with `StableDiffusionPipeline.load_lora_weights(dir)`.
"""

from __future__ import annotations

import os
import torch
from torch import nn

from meddap.config import ConfigError

__all__ = [
    "TARGET_PATTERNS",
    "LORA_WEIGHTS_NAME",
    "target_pattern",
    "add_uslora",
    "lora_parameters",
    "lora_state",
    "load_lora_state",
    "count_trainable",
    "lora_targets",
    "save_lora",
]

# Regexes peft matches (re.fullmatch) against module names such as
# "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q".
TARGET_PATTERNS = {
    "cross_attention": r".*\.attn2\.(to_q|to_k|to_v|to_out\.0)",
    "all_attention": r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
}
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
_ADAPTER = "default"


def target_pattern(targets: str) -> str:
    if targets not in TARGET_PATTERNS:
        raise ConfigError(f"config key 'diffusion.lora.targets' = {targets!r} is not allowed: expected one of "
                          f"{', '.join(repr(t) for t in TARGET_PATTERNS)}.")
    return TARGET_PATTERNS[targets]


def add_uslora(unet: nn.Module, rank: int, alpha: float | None = None, targets: str = "cross_attention") -> nn.Module:
    """Freeze `unet` and add a LoRA adapter of `rank` on the `targets` projections (in place).

    alpha None = rank (LoRA scale alpha/rank = 1). LoRA's B starts at zero, so a fresh adapter leaves
    the model's output unchanged. Returns the same module.
    """
    from peft import LoraConfig

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"config key 'diffusion.lora.rank' = {rank!r} is not allowed: expected an integer >= 1.")
    if alpha is not None and alpha <= 0:
        raise ConfigError(f"config key 'diffusion.lora.alpha' = {alpha!r} is not allowed: expected a positive number or null.")
    pattern = target_pattern(targets)
    unet.requires_grad_(False)  # base UNet frozen; add_adapter makes only the LoRA weights trainable
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank),
                                init_lora_weights=True, target_modules=pattern), adapter_name=_ADAPTER)
    return unet


def lora_targets(unet: nn.Module) -> list[str]:
    """Names of the modules carrying LoRA weights, sorted."""
    return sorted({n.rsplit(".lora_", 1)[0] for n, _ in unet.named_parameters() if ".lora_" in n})


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The trainable (LoRA) parameters, in a fixed (name) order."""
    return [p for _, p in sorted(unet.named_parameters()) if p.requires_grad]


def lora_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable weights by full parameter name, on CPU (for checkpoints)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in unet.named_parameters() if p.requires_grad}


def load_lora_state(unet: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put `lora_state` weights back (exact names; a mismatch is an error, not a silent skip)."""
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"LoRA checkpoint does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.device, p.dtype))


def count_trainable(unet: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, share): LoRA parameters, all UNet parameters (base + LoRA), trainable/total."""
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    total = sum(p.numel() for p in unet.parameters())
    return trainable, total, (trainable / total if total else 0.0)


def save_lora(unet: nn.Module, out_dir: str | os.PathLike) -> str:
    """Write the adapter as `<out_dir>/pytorch_lora_weights.safetensors` in diffusers' LoRA format."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = getattr(unet, "module", unet)  # unwrap DDP
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=_ADAPTER))
    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
    os.makedirs(out_dir, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(save_directory=str(out_dir), unet_lora_layers=layers,
                                              weight_name=LORA_WEIGHTS_NAME, safe_serialization=True)
    return os.path.join(str(out_dir), LORA_WEIGHTS_NAME)
