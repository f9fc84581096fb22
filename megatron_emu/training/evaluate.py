"""Does the model look at the images? Text CE with the true images vs shuffled ones."""

import torch

from megatron_emu.config import SpecialTokens
from megatron_emu.model.emu import Emu
from megatron_emu.model.loss import cross_entropy_loss


@torch.no_grad()
def image_grounding(model: Emu, batches: list[dict], special: SpecialTokens) -> tuple[float, float]:
    """Mean text CE over `batches` with each sample's own images, and with every
    micro-batch's images rolled by one (each caption then sees another image).

    Only a model that reads the images does better with the true ones: the synthetic
    captions describe colour, shape, count and position of what is drawn.
    """
    was_training = model.training
    model.eval()
    true_ce, shuffled_ce = [], []
    vocab = model.config.llm.vocab_size  # padded LM-head rows are never predicted
    for batch in batches:
        tokens, images, documents = batch["tokens"], batch["images"], batch.get("document_ids")
        # Every micro-batch runs both passes, counted or not: under data parallelism (FSDP2)
        # every rank must run the same number of forwards, whatever its images.
        for seen, ce in ((images, true_ce), (images.roll(1, dims=0), shuffled_ce)):
            logits = model(tokens, seen, documents).logits
            if images.shape[0] >= 2:  # one image rolled onto itself compares nothing
                ce.append(cross_entropy_loss(logits, tokens, special, vocab, documents))
    model.train(was_training)
    if not true_ce:
        raise ValueError("image_grounding needs micro-batches with at least two images")
    return torch.stack(true_ce).mean().item(), torch.stack(shuffled_ce).mean().item()
