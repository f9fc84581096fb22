"""Decoder finetuning under DDP: 2 gloo ranks on CPU (one spawn, several checks)."""

import os

import numpy as np
import torch
import torch.multiprocessing as mp

from tests.dist_utils import free_port
from tests.test_decoder_fixtures import decoder_assets  # noqa: F401


def _worker(rank, world, port, assets, out):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from finetune_decoder import main

    summary = main(["--preset", "tiny", "--emu-load", assets["emu"], "--pretrained-sd", assets["sd"],
                    "--data-path", "7", assets["coco"], "2", assets["aesthetics"], "--micro-batch-size", "1",
                    "--global-batch-size", "4", "--resolution", "64", "--train-iters", "2", "--lr", "1e-3",
                    "--lr-warmup-iters", "1", "--num-workers", "0", "--device", "cpu", "--save", out,
                    "--precompute-conditions", "--cache-dir", os.path.join(out, "cache")])
    weights = torch.cat([p.detach().flatten() for p in summary.unet.parameters()])
    # A file, not a queue: a multi-MB put would block until the parent reads, after join.
    torch.save((weights, summary.history), os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_ranks_stay_identical_and_share_the_condition_cache(decoder_assets, tmp_path):
    port = free_port()
    mp.start_processes(_worker, args=(2, port, decoder_assets, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    w0, h0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    w1, h1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert torch.equal(w0, w1)  # gradients were all-reduced: replicas agree bit for bit
    assert [s for s, _ in h0] == [1, 2] and h0 != h1  # each rank trained on its own slots
    state = torch.load(tmp_path / "iter_0000002" / "state.pt", weights_only=False)
    assert len(state["generators"]) == 2
    saved = torch.cat([t.flatten() for t in state["unet"].values()])
    assert torch.equal(saved, w0)  # state_dict order = parameters order (no buffers in the UNet)
    # Both ranks wrote their rows of the shared cache: no row was left unwritten.
    rows = np.load(tmp_path / "cache" / "coco.conditions.npy")
    assert rows.shape[0] == 10 and (np.abs(rows).reshape(10, -1).max(axis=1) > 0).all()
