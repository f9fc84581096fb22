"""Emu (spec section 3): EVA ViT -> ln_visual -> Causal Former -> LLaMA, with two heads.

An image in the token stream is `[IMG] <image> x 32 [/IMG]`; the Causal Former's 32
outputs for image i replace the input embeddings at image i's `<image>` positions.
The LM head predicts the next text token; the regression head predicts the next
input embedding (used by the l2 loss and, at inference, to generate images).

The forward pass is three pieces, `embed` -> `layers` -> `head`. A pipeline stage
(parallel/pipeline.py) is an Emu without the pieces other stages hold (TorchTitan's
stage-tolerant model): the vision side and token embedding live on the first stage,
the final norm and both heads on the last, each stage some of `llm.layers`.
"""

from typing import NamedTuple

import torch
from torch import nn

from megatron_emu.config import ModelConfig
from megatron_emu.model.causal_former import CausalFormer
from megatron_emu.model.init import init_parameters
from megatron_emu.model.llama import LLaMA
from megatron_emu.model.vision import EVAVisionTransformer, normalize_images


class EmuOutput(NamedTuple):
    logits: torch.Tensor  # (B, S, V)
    regression: torch.Tensor  # (B, S, H): regression head at every position
    inputs: torch.Tensor  # (B, S, H): input embeddings, detached (the l2 targets)


class Emu(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        width = config.vision.width
        self.visual = EVAVisionTransformer(config.vision)
        self.ln_visual = nn.LayerNorm(width, eps=config.vision.norm_eps)
        self.causal_former = CausalFormer(config.causal_former, visual_dim=width, llm_hidden=config.llm.hidden)
        self.llm = LLaMA(config.llm)
        self.regression_head = nn.Linear(config.llm.hidden, config.llm.hidden, bias=False)

    # -- the pieces of the forward pass ------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, 224, 224) -> (N, 32, H) visual embeddings for the LLM."""
        pixels = normalize_images(images, self.visual.patch_embed.proj.weight.dtype)
        visual = self.ln_visual(self.visual(pixels))  # (N, 257, width)
        return self.causal_former(visual)  # (N, 32, H)

    def embed(self, tokens: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image i's 32 embeddings spliced at image i's <image> slots."""
        self.check_inputs(tokens, images)
        inputs = self.llm.tok_embeddings(tokens)  # (B, S, H)
        if images is None or images.shape[0] == 0:
            return inputs
        visual = self.encode_images(images).to(inputs.dtype)  # (N, 32, H)
        # Boolean-mask order is row-major (sample 0 first, left to right), which is
        # the order images are listed in: image i fills slots 32*i .. 32*i+31.
        slots = (tokens == self.config.special_tokens.image).unsqueeze(-1)  # (B, S, 1)
        return inputs.masked_scatter(slots, visual)

    def layers(self, hidden: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, H) -> (B, S, H) through the LLaMA layers this model holds."""
        return self.llm.forward_layers(hidden, document_ids)

    def head(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, H) -> logits (B, S, V), regression (B, S, H).

        The regression head runs at every position (0.2% of the FLOPs of the 14B model)
        so shapes never depend on the data; the loss selects the 33 positions per image."""
        hidden = self.llm.norm(hidden)
        return self.llm.output(hidden), self.regression_head(hidden)

    def forward(self, tokens: torch.Tensor, images: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> EmuOutput:
        """document_ids (B, S): packed rows, each document attended and positioned on its own."""
        inputs = self.embed(tokens, images)  # (B, S, H)
        logits, regression = self.head(self.layers(inputs, document_ids))
        return EmuOutput(logits, regression, inputs.detach())

    # -- what this model (or pipeline stage) holds ------------------------------------
    @property
    def has_embed(self) -> bool:
        """The first pipeline stage's pieces: vision tower, Causal Former, token embedding."""
        return self.llm.tok_embeddings is not None

    @property
    def has_head(self) -> bool:
        """The last pipeline stage's pieces: final norm, LM head, regression head."""
        return self.regression_head is not None

    def transformer_stacks(self) -> dict[str, list[nn.Module]]:
        """The blocks of each transformer stack this model holds, by stack name: the one
        place that says where they are (recompute, compile, FSDP units, TP plans use it)."""
        stacks = {}
        if self.visual is not None:
            stacks["vision"] = list(self.visual.blocks)
        if self.causal_former is not None:
            stacks["causal_former"] = list(self.causal_former.blocks)
        stacks["llm"] = list(self.llm.layers.values())
        return stacks

    # -- input validation: bad batches fail here, with the reason ---------------------
    def check_inputs(self, tokens: torch.Tensor, images: torch.Tensor | None) -> None:
        vocab = self.config.llm.vocab_size
        if tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        slots = int((tokens == self.config.special_tokens.image).sum())
        per_image = self.config.causal_former.num_query_tokens
        num_images = 0 if images is None else images.shape[0]
        if slots != num_images * per_image:
            raise ValueError(
                f"the tokens hold {slots} <image> slots ({slots / per_image:g} images of {per_image}) "
                f"but {num_images} images were given"
            )
        size = self.config.vision.image_size
        if num_images and tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images must be (N, 3, {size}, {size}), got {tuple(images.shape)}")

    # -- initialisation (also after building on the meta device) ----------------------
    def init_weights(self, seed: int) -> None:
        """Every parameter from its own (seed, name) generator (model/init.py)."""
        init_parameters(self, self.config.init_std, seed)
        self.llm.init_rope()  # a buffer: garbage after to_empty


def build_emu(config: ModelConfig, device: torch.device | str = "cpu", seed: int | None = None) -> Emu:
    """Build and initialise. On "meta" nothing is allocated (parameter counting, sharding).
    seed None: one drawn from torch's global generator."""
    with torch.device(device):
        model = Emu(config)
    if str(device) != "meta":
        model.init_weights(int(torch.randint(2**62, ())) if seed is None else seed)
    return model
