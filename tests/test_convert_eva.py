"""--from eva-clip: random weights in the EVA-CLIP release's own layout, in every way the file
comes (bare ViT, EVA-CLIP's CLIP with `text.`, open_clip's CLIP with the text tower at top
level, DDP's `module.` prefix, wrapped in {"state_dict": ...}), imported and run by our ViT,
equal to a reference forward written from the release's equations
(baaivision/EVA, EVA-CLIP/rei/eva_clip/eva_vit_model.py: fused qkv with bias
(q_bias, 0, v_bias), q scaled by head_dim^-0.5, softmax, pre-LN blocks, exact-GELU MLP;
EVA01-CLIP-g has no rotary, no relative position bias, no layer scale, no sub-LN)."""

import pytest
import torch
import torch.nn.functional as F

from megatron_emu.config import get_preset
from megatron_emu.convert.imports import import_checkpoint
from megatron_emu.generation.loading import load_for_inference

CONFIG = get_preset("tiny")
V = CONFIG.vision


def release_vit(seed: int = 0) -> dict[str, torch.Tensor]:
    """An EVA ViT state dict with the release's names and shapes, random values (norm weights
    near 1, so a swapped weight / bias shows)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, mean=0.0: mean + 0.05 * torch.randn(*shape, generator=g)  # noqa: E731
    c, m, p = V.width, V.mlp_dim, V.patch_size
    state = {"patch_embed.proj.weight": rand(c, 3, p, p), "patch_embed.proj.bias": rand(c),
             "cls_token": rand(1, 1, c), "pos_embed": rand(1, V.num_tokens, c),
             "norm.weight": rand(c, mean=1.0), "norm.bias": rand(c), "head.weight": rand(16, c), "head.bias": rand(16)}
    for i in range(V.layers):
        b = f"blocks.{i}."
        state.update({
            b + "norm1.weight": rand(c, mean=1.0), b + "norm1.bias": rand(c),
            b + "attn.qkv.weight": rand(3 * c, c), b + "attn.q_bias": rand(c), b + "attn.v_bias": rand(c),
            b + "attn.proj.weight": rand(c, c), b + "attn.proj.bias": rand(c),
            b + "norm2.weight": rand(c, mean=1.0), b + "norm2.bias": rand(c),
            b + "mlp.fc1.weight": rand(m, c), b + "mlp.fc1.bias": rand(m),
            b + "mlp.fc2.weight": rand(c, m), b + "mlp.fc2.bias": rand(c),
        })
    return state


def reference_forward(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """EVAVisionTransformer.forward_features without the final norm (Emu reads the last block)."""
    x = F.conv2d(pixels, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=V.patch_size)
    x = x.flatten(2).transpose(1, 2)  # (N, P, C)
    x = torch.cat([state["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + state["pos_embed"]  # (N, T, C)
    B, N, C = x.shape
    for i in range(V.layers):
        s = {k[len(f"blocks.{i}."):]: t for k, t in state.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (C,), s["norm1.weight"], s["norm1.bias"], eps=V.norm_eps)
        bias = torch.cat((s["attn.q_bias"], torch.zeros_like(s["attn.v_bias"]), s["attn.v_bias"]))
        qkv = F.linear(h, s["attn.qkv.weight"], bias).reshape(B, N, 3, V.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, h, N, D)
        attn = ((q * (C // V.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        h = F.linear((attn @ v).transpose(1, 2).reshape(B, N, -1), s["attn.proj.weight"], s["attn.proj.bias"])
        x = x + h
        h = F.layer_norm(x, (C,), s["norm2.weight"], s["norm2.bias"], eps=V.norm_eps)
        h = F.linear(F.gelu(F.linear(h, s["mlp.fc1.weight"], s["mlp.fc1.bias"])), s["mlp.fc2.weight"], s["mlp.fc2.bias"])
        x = x + h
    return x


def text_tower(prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text tower's keys (open_clip: prefix ""; EVA-CLIP's CustomCLIP: "text.")."""
    t = {"token_embedding.weight": torch.randn(50, 32), "positional_embedding": torch.randn(8, 32),
         "transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32), "ln_final.weight": torch.ones(32),
         "text_projection": torch.randn(32, 16)}
    return {prefix + k: v for k, v in t.items()}


def layout(vit: dict, kind: str) -> dict:
    if kind.startswith("bare"):
        state = dict(vit)
    elif kind.startswith("eva-clip"):
        state = {**{f"visual.{k}": v for k, v in vit.items()}, **text_tower("text."), "logit_scale": torch.ones([])}
    else:  # open_clip
        state = {**{f"visual.{k}": v for k, v in vit.items()}, **text_tower(""), "logit_scale": torch.ones([])}
    if kind.endswith("module."):
        state = {f"module.{k}": v for k, v in state.items()}
    return state


@pytest.mark.parametrize("kind", ["bare", "bare module.", "eva-clip", "eva-clip module.", "open_clip", "open_clip module."])
def test_every_eva_clip_layout_imports_to_the_release_forward(tmp_path, kind):
    vit = release_vit()
    file = tmp_path / "eva.pt"
    torch.save({"state_dict": layout(vit, kind)}, file)
    import_checkpoint([("eva-clip", str(file))], CONFIG, str(tmp_path / "ckpt"), seed=0)
    model = load_for_inference(str(tmp_path / "ckpt"))
    pixels = torch.randn(2, 3, V.image_size, V.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = reference_forward(vit, pixels), model.visual(pixels)
    assert expected.abs().mean() > 0.1  # a real signal, not all zeros
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update({"module.visual.blocks.0.attn.extra": torch.ones(3)}),
     "module.visual.blocks.0.attn.extra (read as visual.blocks.0.attn.extra): has no place in this model"),
    (lambda s: s.update({"module.visual.pos_embed": torch.zeros(1, 5, V.width)}),
     f"module.visual.pos_embed (read as visual.pos_embed): shape (1, 5, {V.width}), the model needs (1, {V.num_tokens}, {V.width})"),
    (lambda s: s.update({"module.visual.blocks.1.attn.qkv.weight": torch.zeros(3 * 8, V.width)}),
     "module.visual.blocks.1.attn.qkv.weight (read as visual.blocks.1.attn.q_proj.weight): shape (8, 64)"),
])
def test_errors_name_the_key_as_the_file_has_it(tmp_path, change, message):
    state = layout(release_vit(), "open_clip module.")
    change(state)
    file = tmp_path / "eva.pt"
    torch.save(state, file)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        import_checkpoint([("eva-clip", str(file))], CONFIG, str(out), seed=0)
    assert str(error.value).startswith(f"{file}: {message}")
    assert not out.exists()
