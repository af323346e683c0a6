"""Class words: the token embeddings an adapter learns beside its LoRA (`diffusion.lora.class_words`).

A base model whose text encoder never saw the class words (builtin:phantom was pretrained on captions
without them) gives them untrained embeddings that a UNet-only LoRA cannot tie to the classes. With
the option on, the trainer also learns the input-embedding rows of the tokens that differ between
the class prompts, as textual inversion does for existing tokens. The adapter folder then holds
`class_words.safetensors`: one (D,) fp32 vector per token, keyed by the token as the tokenizer spells
it ("benign</w>"), which the generator writes into its text encoder while that adapter is active.
"""

from __future__ import annotations

import torch

from meddap.errors import MeddapError

__all__ = ["CLASS_WORDS_NAME", "varying_token_ids", "class_words_bytes", "read_class_words"]

CLASS_WORDS_NAME = "class_words.safetensors"


def varying_token_ids(tokens: torch.Tensor) -> list[int]:
    """Token ids that occur in some but not all rows of (P, L) prompt token ids, sorted: the words
    that tell the class prompts apart."""
    present = [set(row.tolist()) for row in tokens]
    return sorted(set().union(*present) - set.intersection(*present)) if present else []


def class_words_bytes(words: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of {token: (D,) fp32 vector}."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in words.items()},
                metadata={"format": "pt", "content": "meddap class-word token embeddings"})


def read_class_words(path: str, tokenizer, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (K,) long, rows (K, D) fp32) of a class_words.safetensors file, each token looked up in
    `tokenizer`. A token the tokenizer does not know, or a vector of another width than the text
    encoder's embeddings, is an error naming the file: the adapter was made on another base model."""
    from safetensors.torch import load_file

    try:
        words = load_file(path)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: say which
        raise MeddapError(f"{path} is not a readable class-words file ({type(e).__name__}: {e}); retrain the "
                          "adapter (delete its folder and run `python -m meddap finetune` again).") from None
    vocab = tokenizer.get_vocab()
    unknown = sorted(t for t in words if t not in vocab)
    if unknown:
        raise MeddapError(f"{path}: tokens {unknown} are not in this base model's tokenizer: the adapter was trained "
                          "on another base model. Use the adapter's own base model (adapter.json's base_model) or "
                          "retrain it on this one.")
    wrong = sorted(t for t, v in words.items() if tuple(v.shape) != (dim,))
    if wrong:
        raise MeddapError(f"{path}: vectors of {wrong} have shape {tuple(words[wrong[0]].shape)}, not ({dim},) as "
                          "this base model's text encoder: the adapter was trained on another base model.")
    names = sorted(words, key=lambda t: vocab[t])
    ids = torch.tensor([vocab[t] for t in names], dtype=torch.long)
    rows = torch.stack([words[t].float() for t in names]) if names else torch.zeros(0, dim)
    return ids, rows
