"""The mixed objective (spec section 4): CE on the next text token + lambda * l2 on
the next visual embedding."""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from megatron_emu.config import SpecialTokens


class EmuLoss(NamedTuple):
    total: torch.Tensor
    lm: torch.Tensor  # cross-entropy, mean over trained text tokens
    l2: torch.Tensor  # mean squared error over predicting positions x hidden


def document_ends(document_ids: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) -> (B, S-1): True where token t+1 opens another document (packed rows).

    A document's last token has no next in its document: the next token belongs to
    another sample, which it must not be trained to predict. Unpacked rows: None.
    """
    if document_ids is None:
        return None
    return document_ids[:, 1:] != document_ids[:, :-1]


def text_labels(tokens: torch.Tensor, special: SpecialTokens, document_ids: torch.Tensor | None = None,
                answer_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S) -> (B, S-1) next-token labels, -100 where the label is [PAD]/<image>/[IMG]/[/IMG]
    or the first token of the next packed document; with an answer mask (B, S) (instruction
    tuning), also wherever the label is not an answer token."""
    labels = tokens[:, 1:].clone()
    ignored = torch.isin(labels, torch.tensor(special.ignored_in_ce, device=tokens.device))
    ends = document_ends(document_ids)
    if ends is not None:
        ignored = ignored | ends
    if answer_mask is not None:
        ignored = ignored | (answer_mask[:, 1:] == 0)
    return labels.masked_fill(ignored, -100)


def regression_mask(tokens: torch.Tensor, special: SpecialTokens, document_ids: torch.Tensor | None = None,
                    answer_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S) -> (B, S-1) bool: positions whose next input embedding is regressed.

    Per image these are the 33 positions [IMG], <image>_1 .. <image>_32; their targets
    are <image>_1 .. <image>_32 and [/IMG]. The last position has no next, so it is dropped.
    (An image is never cut, so its targets are in its own document; the check is cheap.)
    With an answer mask, only images inside answers are regressed.
    """
    current = tokens[:, :-1]
    mask = (current == special.img_start) | (current == special.image)
    ends = document_ends(document_ids)
    if ends is not None:
        mask = mask & ~ends
    return mask if answer_mask is None else mask & (answer_mask[:, 1:] != 0)


def cross_entropy_loss(logits: torch.Tensor, tokens: torch.Tensor, special: SpecialTokens,
                       vocab_size: int | None = None, document_ids: torch.Tensor | None = None,
                       answer_mask: torch.Tensor | None = None) -> torch.Tensor:
    """vocab_size: the real vocabulary; padded LM-head columns beyond it are dropped.

    The last position has no next token: rather than slicing it off the logits (a copy of
    (B, S-1, V) logits, and a zero-filled (B, S, V) gradient in backward), its label is
    -100, so cross-entropy reads the logits in place, as transformers' loss does."""
    labels = F.pad(text_labels(tokens, special, document_ids, answer_mask), (0, 1), value=-100)  # (B, S)
    if vocab_size is not None and logits.shape[-1] > vocab_size:
        logits = logits[..., :vocab_size]
    logits = logits.float()  # (B, S, V); a no-op in fp32
    if not (labels != -100).any():
        return logits.sum() * 0.0  # keeps the graph; no text to train on
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def l2_regression_loss(regression: torch.Tensor, inputs: torch.Tensor, tokens: torch.Tensor, special,
                       document_ids: torch.Tensor | None = None, answer_mask: torch.Tensor | None = None) -> torch.Tensor:
    mask = regression_mask(tokens, special, document_ids, answer_mask)  # (B, S-1)
    predicted = regression[:, :-1][mask].float()  # (M, H)
    target = inputs[:, 1:][mask].detach().float()  # (M, H): no gradient into the target side
    if predicted.numel() == 0:
        return regression.sum() * 0.0  # no image in this micro-batch
    return F.mse_loss(predicted, target)


def emu_loss(logits, regression, inputs, tokens, special: SpecialTokens, l2_weight: float = 1.0,
             vocab_size: int | None = None, document_ids: torch.Tensor | None = None,
             answer_mask: torch.Tensor | None = None) -> EmuLoss:
    """document_ids (B, S): packed rows; no target crosses a document boundary.
    answer_mask (B, S): instruction tuning; only answer tokens are targets."""
    lm = cross_entropy_loss(logits, tokens, special, vocab_size, document_ids, answer_mask)
    l2 = l2_regression_loss(regression, inputs, tokens, special, document_ids, answer_mask)
    return EmuLoss(lm + l2_weight * l2, lm, l2)
