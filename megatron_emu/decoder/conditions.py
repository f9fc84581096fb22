"""The UNet's condition: Emu's 32 regressed visual embeddings of an image (spec section 7).

Which positions. In `[IMG] <image>_1 .. <image>_32 [/IMG]` the regression head at
position p predicts the input embedding at p+1 (loss.regression_mask). So the 32
embeddings that *describe the image* are the outputs at [IMG], <image>_1 .. <image>_31
(predicting <image>_1 .. <image>_32); the output at <image>_32 predicts [/IMG] and is not
part of the image. At generation time the same 32 outputs come out one at a time:
the output at [IMG] is fed back as the input at the next position, and so on
(`generate_embeddings`). Training and sampling therefore condition on the same slots.

Two ways to get them for a training pair (caption, image), `--condition-mode`:
- "teacher-forced" (default): one forward pass over `<s> caption [IMG] <image>x32 [/IMG]`
  with the image's Causal-Former embeddings in the slots; output k is Emu's regression of
  embedding k+1 given the caption and the true embeddings 1..k. One pass per batch; the
  condition carries the image's content, which is what the decoder must reconstruct.
- "generated" (paper section 3.3): `<s> caption [IMG]`, then 32 autoregressive steps;
  the image never enters Emu. Exactly the sampling-time distribution, 32x the compute,
  and the target image is only tied to the condition through its caption.
Both are deterministic functions of the frozen Emu, so `--precompute-conditions`
caches them (cache.py).

The null condition for classifier-free guidance is what Emu generates for an empty
prompt: `<s> [IMG]` followed by 32 autoregressive steps.
"""

from __future__ import annotations

import torch

from megatron_emu.config import SpecialTokens
from megatron_emu.decoder.arguments import CONDITION_MODES
from megatron_emu.model.emu import Emu
from megatron_emu.model.kv_cache import KVCache
from megatron_emu.model.loss import regression_mask

def image_sequence(caption: list[int], bos_id: int, special: SpecialTokens, per_image: int) -> list[int]:
    """`<s> caption [IMG] <image> x per_image [/IMG]` (teacher-forced input for one pair)."""
    return [bos_id] + list(caption) + [special.img_start] + [special.image] * per_image + [special.img_end]


def right_pad(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """(B, S_max) ids. Right padding is invisible to earlier positions under causal attention."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


@torch.no_grad()
def teacher_forced_conditions(emu: Emu, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """tokens (B, S) holding N complete images, images uint8 (N, 3, 224, 224) -> (N, 32, H)."""
    special = emu.config.special_tokens
    per_image = emu.config.causal_former.num_query_tokens
    out = emu(tokens, images)
    mask = regression_mask(tokens, special)  # (B, S-1): [IMG] and every <image>, 33 per image
    n = images.shape[0]
    if int(mask.sum()) != n * (per_image + 1):
        raise ValueError(f"tokens hold {int(mask.sum())} predicting positions, expected {n} x {per_image + 1}")
    regressed = out.regression[:, :-1][mask]  # (N * 33, H), row-major = image order
    # Per image: [IMG], <image>_1.._31 predict the 32 slots; <image>_32 predicts [/IMG].
    return regressed.view(n, per_image + 1, -1)[:, :per_image]  # (N, 32, H)


@torch.no_grad()
def generate_embeddings(emu: Emu, tokens: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
    """Prompts of equal length ending in [IMG], (B, S) -> (B, 32, H) regressed autoregressively.

    Each regressed embedding is appended as the next input embedding (Emu's sampling). The
    prompt runs once; each later step runs the one new position against the KV cache.
    """
    special = emu.config.special_tokens
    if not bool((tokens[:, -1] == special.img_start).all()):
        raise ValueError("every generation prompt must end with the [IMG] token")
    cache = KVCache()
    inputs = emu.embed(tokens, images)  # (B, S, H): the prompt, then one embedding per step
    outputs = []
    for _ in range(emu.config.causal_former.num_query_tokens):
        hidden = emu.llm.norm(emu.llm.forward_layers(inputs, cache=cache))  # (B, S or 1, H)
        step = emu.regression_head(hidden[:, -1:])  # (B, 1, H)
        outputs.append(step)
        inputs = step.to(inputs.dtype)
    return torch.cat(outputs, dim=1)  # (B, 32, H)


def generate_for_prompts(emu: Emu, prompts: list[list[int]], images: list[torch.Tensor]) -> torch.Tensor:
    """Prompts of any lengths (each ending in [IMG]) with their context images (uint8 (n_i, 3, 224, 224))
    -> (B, 32, H). Batched per prompt length, since the LLM takes no padding mask."""
    device = next(emu.parameters()).device
    result: list[torch.Tensor | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for group in by_length.values():
        tokens = torch.tensor([prompts[i] for i in group], dtype=torch.long, device=device)  # (b, S)
        parts = [images[i] for i in group if len(images[i])]  # in prompt order = order of appearance
        group_images = torch.cat(parts).to(device) if parts else None
        for i, row in zip(group, generate_embeddings(emu, tokens, group_images)):
            result[i] = row
    return torch.stack(result)  # (B, 32, H)


def generation_prompt(prefix: list[int], bos_id: int, special: SpecialTokens) -> list[int]:
    """`<s> prefix [IMG]`: ask Emu for an image after `prefix` (text and context image blocks)."""
    return [bos_id] + list(prefix) + [special.img_start]


@torch.no_grad()
def null_condition(emu: Emu, bos_id: int) -> torch.Tensor:
    """(32, H): Emu's embeddings for the empty prompt `<s> [IMG]`."""
    prompt = generation_prompt([], bos_id, emu.config.special_tokens)
    return generate_for_prompts(emu, [prompt], [torch.empty(0, 3, 1, 1, dtype=torch.uint8)])[0]


@torch.no_grad()
def pair_conditions(emu: Emu, captions: list[list[int]], images: torch.Tensor, bos_id: int, mode: str) -> torch.Tensor:
    """A batch of (caption ids, uint8 224 image) pairs -> (B, 32, H) conditions."""
    special = emu.config.special_tokens
    per_image = emu.config.causal_former.num_query_tokens
    device = next(emu.parameters()).device
    if mode == "teacher-forced":
        tokens = right_pad([image_sequence(c, bos_id, special, per_image) for c in captions], special.pad)
        return teacher_forced_conditions(emu, tokens.to(device), images.to(device))
    if mode == "generated":
        prompts = [generation_prompt(c, bos_id, special) for c in captions]
        empty = [torch.empty(0, *images.shape[1:], dtype=torch.uint8)] * len(prompts)
        return generate_for_prompts(emu, prompts, empty)
    raise ValueError(f"--condition-mode must be one of {CONDITION_MODES}, got {mode!r}")


def drop_conditions(conditions: torch.Tensor, null: torch.Tensor, prob: float, generator: torch.Generator):
    """Replace each sample's condition by the null one with probability `prob` (CFG training).

    conditions (B, 32, H), null (32, H) -> ((B, 32, H), dropped bool (B,)). The draw uses
    its own generator, so the drop pattern is reproducible and survives a resume.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"--cond-drop-prob must be in [0, 1], got {prob}")
    dropped = torch.rand(conditions.shape[0], generator=generator) < prob  # (B,)
    mask = dropped.to(conditions.device).view(-1, 1, 1)
    return torch.where(mask, null.to(conditions.dtype).expand_as(conditions), conditions), dropped
