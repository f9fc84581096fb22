"""--vision-tensor-parallel: the image encoders' TP placement (parallel/image_split.py).

Loss and gradient parity of every placement against the single process is in
tests/test_parallel_parity.py (TP2, TP2+SP mixed, TP2 x DP2 FSDP2); here: that the images
really are split (each rank encodes its share, padding included) and gathered back in
order, and how `auto` chooses."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_emu.config import ParallelConfig, get_preset
from megatron_emu.model.emu import build_emu
from megatron_emu.parallel.image_split import choose_placement
from megatron_emu.parallel.mesh import ParallelDims, build_mesh
from megatron_emu.parallel.tensor_parallel import apply_tensor_parallel
from tests.dist_utils import spawn


def test_placement_choices():
    tiny, paper = get_preset("tiny"), get_preset("emu-14b")
    assert choose_placement("images", tiny, 1, 8) == {"visual": "heads", "causal_former": "heads"}  # no TP
    assert choose_placement("heads", tiny, 8, 8) == {"visual": "replicated", "causal_former": "replicated"}
    assert choose_placement("auto", tiny, 8, 8) == {"visual": "images", "causal_former": "images"}  # never replicate
    assert choose_placement("images", tiny, 2, 8) == {"visual": "images", "causal_former": "images"}
    # The paper's ViT (1.0B parameters, 257 tokens x 1408 per image, 40 blocks) at TP4: its heads'
    # activation all-reduces outgrow one gradient all-reduce of the whole ViT at ~90 images per step.
    assert choose_placement("auto", paper, 4, 8)["visual"] == "heads"
    assert choose_placement("auto", paper, 4, 88)["visual"] == "images"
    assert choose_placement("auto", paper, 4, 88)["causal_former"] == "heads"
    assert choose_placement("auto", paper, 8, 8)["causal_former"] == "images"  # 12 heads: TP8 would replicate
    with pytest.raises(ValueError, match="--vision-tensor-parallel must be one of"):
        choose_placement("rows", tiny, 2, 8)


def _split(rank: int, world: int, placement: dict, images: torch.Tensor, expected: torch.Tensor) -> None:
    config = get_preset("tiny")
    dims = ParallelDims.from_config(ParallelConfig(tensor_model_parallel_size=world), world, config)
    model = build_emu(config, seed=0)
    apply_tensor_parallel(model, build_mesh(dims, torch.device("cpu")).tp_mesh, config, False, placement)
    seen = []  # images each encoder receives, after the split's own hooks
    model.visual.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    model.causal_former.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    with torch.no_grad():
        out = model.encode_images(images)
    share = math.ceil(len(images) / world)
    visual_n = share if placement["visual"] == "images" else len(images)
    former_n = share if placement["causal_former"] == "images" else len(images)  # else gathered after the ViT
    assert seen == [visual_n, former_n], (placement, seen)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("placement", [dict(visual="images", causal_former="images"),
                                       dict(visual="heads", causal_former="images"),
                                       dict(visual="images", causal_former="heads")])
def test_each_rank_encodes_its_share_and_the_gather_keeps_order(placement):
    config = get_preset("tiny")
    images = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = build_emu(config, seed=0).encode_images(images)  # single process: all 3 images
    spawn(2, _split, placement, images, expected)  # rank 0 encodes images 0-1, rank 1 image 2 + a padding copy
