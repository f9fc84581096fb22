"""Decoder finetuning: conditions, CFG dropping, training, freezing, checkpoints, bad input."""

import os

import pytest
import torch

from megatron_emu.config import get_preset
from megatron_emu.decoder.arguments import DecoderConfig, parse_decoder_args
from megatron_emu.decoder.conditions import (
    drop_conditions,
    generate_embeddings,
    generation_prompt,
    image_sequence,
    right_pad,
    teacher_forced_conditions,
)
from megatron_emu.generation.loading import load_emu
from megatron_emu.decoder.unet import check_condition_dim, load_sd_components, resize_cross_attention
from megatron_emu.model.emu import build_emu
from tests.test_decoder_fixtures import SD_TEXT_DIM, decoder_assets  # noqa: F401

TINY = get_preset("tiny")
BOS = 1


def test_conditions_are_the_regressions_that_predict_the_32_slots():
    emu = build_emu(TINY, seed=0).eval()
    special = TINY.special_tokens
    captions = [[5, 6, 7], [8, 9, 10, 11, 12]]
    tokens = right_pad([image_sequence(c, BOS, special, 32) for c in captions], special.pad)  # (2, S)
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cond = teacher_forced_conditions(emu, tokens, images)  # (2, 32, H)
    assert cond.shape == (2, 32, TINY.llm.hidden)
    with torch.no_grad():
        regression = emu(tokens, images).regression  # (2, S, H)
    for b, caption in enumerate(captions):
        img = 1 + len(caption)  # index of [IMG]
        torch.testing.assert_close(cond[b], regression[b, img : img + 32], rtol=0, atol=0)
    # The first slot depends on the caption alone: it is what generation regresses first.
    prompt = torch.tensor([generation_prompt(captions[1], BOS, special)])
    generated = generate_embeddings(emu, prompt)  # (1, 32, H)
    torch.testing.assert_close(generated[0, 0], cond[1, 0], rtol=1e-5, atol=1e-5)


def test_cond_drop_rate_close_to_ten_percent():
    conditions = torch.randn(20000, 2, 3)
    null = torch.full((2, 3), 7.0)
    out, dropped = drop_conditions(conditions, null, 0.1, torch.Generator().manual_seed(0))
    rate = dropped.float().mean().item()
    assert abs(rate - 0.1) < 0.0105  # 5 binomial standard deviations
    assert torch.equal(out[dropped], null.expand(int(dropped.sum()), 2, 3))
    assert torch.equal(out[~dropped], conditions[~dropped])
    with pytest.raises(ValueError, match="cond-drop-prob"):
        drop_conditions(conditions, null, 1.5, torch.Generator())


def test_resize_keeps_pretrained_weights_and_reinitialises_kv(decoder_assets):
    original = load_sd_components(decoder_assets["sd"]).unet
    unet = load_sd_components(decoder_assets["sd"]).unet
    replaced = resize_cross_attention(unet, TINY.llm.hidden)
    assert replaced and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in replaced)
    before, after = original.state_dict(), unet.state_dict()
    for name, tensor in after.items():
        if name.rsplit(".", 1)[0] in replaced:
            assert tensor.shape[1] == TINY.llm.hidden and before[name].shape[1] == SD_TEXT_DIM
        else:
            assert torch.equal(tensor, before[name]), name
    check_condition_dim(unet, TINY.llm.hidden, "test")


def test_bad_inputs_fail_with_one_line(decoder_assets, tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "scheduler").mkdir()
    with pytest.raises(ValueError, match="no unet/ subfolder"):
        load_sd_components(str(tmp_path))
    unet = load_sd_components(decoder_assets["sd"]).unet  # reads 32-wide conditions
    with pytest.raises(ValueError, match="cross-attention dim is 32 but the Emu hidden size is 128"):
        check_condition_dim(unet, TINY.llm.hidden, decoder_assets["sd"])
    wider = get_preset("tiny")
    wider.llm.hidden = 256
    from safetensors.torch import save_file

    path = str(tmp_path / "wide_emu.safetensors")
    save_file({k: v.contiguous() for k, v in build_emu(wider, seed=0).state_dict().items()}, path)
    with pytest.raises(ValueError, match="Emu hidden size 256 but the preset's is 128") as err:
        load_emu(TINY, path)
    assert path in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="--data-path is required"):
        parse_decoder_args(["--preset", "1b"])


def test_bare_command_line_is_the_tiny_cpu_recipe_and_other_presets_the_papers():
    tiny = parse_decoder_args([])
    assert (tiny.preset, tiny.data_path, tiny.save) == ("tiny", [], "runs/decoder_tiny")
    assert (tiny.micro_batch_size, tiny.global_batch_size, tiny.resolution, tiny.train_iters) == (4, 4, 64, 60)
    paper = parse_decoder_args(["--preset", "emu-14b", "--data-path", "7", "a", "2", "b"])
    default = DecoderConfig()
    for name in ("micro_batch_size", "global_batch_size", "resolution", "train_iters", "lr", "lr_step_iters", "save"):
        assert getattr(paper, name) == getattr(default, name), name
    assert (paper.global_batch_size, paper.resolution) == (1600, 512)
    assert parse_decoder_args(["--train-iters", "7", "--save", ""]).train_iters == 7  # flags win over the recipe


def test_lr_schedule_is_the_papers():
    c = DecoderConfig(data_path=["x"])
    assert c.lr_at(0) == pytest.approx(1e-4 / 5000)
    assert c.lr_at(4999) == pytest.approx(1e-4)
    assert c.lr_at(9999) == pytest.approx(1e-4)
    assert c.lr_at(10000) == pytest.approx(5e-5)
    assert c.lr_at(14000) == pytest.approx(1e-5)


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_finetune_steps_lower_loss_on_a_fixed_batch_and_keep_frozen_params(decoder_assets):
    """The loop's own train_step, with the same noise and timesteps every step."""
    from diffusers import DDPMScheduler

    from megatron_emu.decoder.conditions import null_condition
    from megatron_emu.decoder.data import DecoderMicroBatches
    from megatron_emu.decoder.train import Frozen, Summary, build_sd, train_step

    config = DecoderConfig(preset="tiny", emu_load=decoder_assets["emu"], pretrained_sd=decoder_assets["sd"],
                           data_path=[decoder_assets["coco"]], micro_batch_size=2, global_batch_size=4,
                           resolution=64, cond_drop_prob=0.0, lr=1e-3, clip_grad=1.0)
    emu = load_emu(TINY, config.emu_load)
    unet, vae, schedule = build_sd(config, TINY.llm.hidden)
    frozen = Frozen(emu, vae, null_condition(emu, BOS), BOS)
    data = DecoderMicroBatches(config.data_path, 2, 2, 0, 1, 0, 150)
    batches = [data[0], data[1]]  # one fixed global batch
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    frozen_before = {"emu": _snapshot(emu), "vae": _snapshot(vae)}
    losses = []
    for _ in range(6):
        gens = {"noise": torch.Generator().manual_seed(5), "drop": torch.Generator().manual_seed(6)}
        loss, grad_norm = train_step(unet.train(), optimizer, batches, frozen, config, DDPMScheduler.from_config(schedule),
                                     gens, torch.device("cpu"), Summary())
        losses.append(loss)
    assert losses[-1] < 0.7 * losses[0], losses
    for name, module in (("emu", emu), ("vae", vae)):
        for pname, p in module.named_parameters():
            assert not p.requires_grad and p.grad is None, f"{name}.{pname}"
            assert torch.equal(p, frozen_before[name][pname]), f"{name}.{pname} changed"


def _run(assets, out, iters, *extra):
    from finetune_decoder import main

    argv = ["--preset", "tiny", "--emu-load", assets["emu"], "--pretrained-sd", assets["sd"],
            "--data-path", "7", assets["coco"], "2", assets["aesthetics"], "--micro-batch-size", "2",
            "--global-batch-size", "2", "--resolution", "64", "--train-iters", str(iters), "--lr", "1e-3",
            "--lr-warmup-iters", "2", "--save", str(out), "--save-interval", "2", "--num-workers", "0",
            "--log-interval", "1", "--ema-decay", "0.9", *extra]
    return main(argv)


def test_end_to_end_resume_and_diffusers_output(decoder_assets, tmp_path):
    from diffusers import UNet2DConditionModel

    cache = ["--precompute-conditions", "--precompute-latents", "--cache-dir", str(tmp_path / "cache")]
    straight = _run(decoder_assets, tmp_path / "a", 4, *cache)
    assert os.path.exists(tmp_path / "cache" / "coco.conditions.json")
    _run(decoder_assets, tmp_path / "b", 2, *cache)
    resumed = _run(decoder_assets, tmp_path / "b", 4, "--load", str(tmp_path / "b"), *cache)
    assert [s for s, _ in resumed.history] == [3, 4]
    assert resumed.history == straight.history[2:]  # same data, noise and drops after the resume

    state = torch.load(tmp_path / "a" / "iter_0000004" / "state.pt", weights_only=False)
    reloaded = UNet2DConditionModel.from_pretrained(str(tmp_path / "a" / "decoder" / "unet_trained")).eval()
    b_unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "b" / "decoder" / "unet_trained")).eval()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, state["unet"][name]), name
        assert torch.equal(tensor, b_unet.state_dict()[name]), name
    ema = UNet2DConditionModel.from_pretrained(str(tmp_path / "a" / "decoder" / "unet")).eval()
    assert ema.config.cross_attention_dim == TINY.llm.hidden
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(1, 32, TINY.llm.hidden, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out1 = reloaded(x, 10, encoder_hidden_states=cond).sample
        out2 = b_unet(x, 10, encoder_hidden_states=cond).sample
    assert torch.equal(out1, out2)


def test_emu_load_reads_our_pretraining_checkpoint(tmp_path):
    """--emu-load DIR: the DCP checkpoint written by pretraining, read back bit-identically."""
    from megatron_emu.config import CheckpointConfig, TrainConfig
    from megatron_emu.training.checkpoint import Checkpointer
    from megatron_emu.training.optim import LRScheduler, build_optimizer

    config = TrainConfig(preset="tiny", model=get_preset("tiny"))
    config.checkpoint = CheckpointConfig(save=str(tmp_path))
    model = build_emu(config.model, seed=7)
    optimizer = build_optimizer(model, config.optimizer)

    class NoLoader:
        def state_dict(self):
            return {}

    scheduler = LRScheduler(optimizer, config.optimizer, config.train_iters)
    Checkpointer(config.checkpoint, config).save(3, model, optimizer, scheduler, NoLoader(), consumed_samples=0)
    loaded = load_emu(config.model, str(tmp_path))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not any(p.requires_grad for p in loaded.parameters())
