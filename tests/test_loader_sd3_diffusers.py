"""SD3 LoRA files spelled with diffusers' names, through the T-LoRA Loader on ComfyUI's real SD3.

The file is made here from one the pack writes for the tiny SD3 (its own ``lora_unet_<ComfyUI
path>`` pairs, one per module) by renaming every module to its diffusers name, written out by
hand below from diffusers' SD3 transformer: a fused ``qkv`` pair is split into its q, k and v
rows (``transformer_blocks.N.attn.to_q`` ...; the text attention's ``add_q_proj`` ...; SD3.5's
second image attention ``attn2``), each keeping only the columns its rows use. The last block's
text queries have no adapter (the pack does not train them), so that file has no ``add_q_proj``
for it. Checked on each runtime, in diffusers / PEFT (``transformer.``, ``lora_A`` / ``lora_B``,
the LoraConfig in ``lora_adapter_metadata``) and OneTrainer (``lora_transformer_``, flattened)
spelling:

(a) the Loader puts the same adapters on the same modules and rows as for the pack's own file,
    and its patched model equals the one from the pack's own file at every model call of a
    sampling run (an ordinary LoRA is never masked, so the own file is an unmasked Ortho-LoRA);
(b) ComfyUI's stock loader reads the renamed file with no "lora key not loaded" and gives the
    same model calls (so the renaming agrees with ComfyUI's own key map);
(c) a key with no SD3 module is named, with the file, in the warning; a file of only such keys
    is refused with an error naming both (and "FLUX, SD3 or Qwen-Image" as what it looks made for);
(d) a LyCORIS ``tlora`` file, flattened diffusers names, lands on the same rows and rebuilds its
    frozen factors from those rows of the base weight.
"""

from __future__ import annotations

import importlib
import json
import logging

import loader_fixtures as lf
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

pytestmark = pytest.mark.comfy

RANK = 4
REL_TOL = 2e-5          # as test_loader_patch.py: merged weight vs forward-pass adapter, float32
STOCK_WARNINGS = ("lora key not loaded", "NOT LOADED")
# ComfyUI module inside joint_blocks.N -> its diffusers names inside transformer_blocks.N, with the
# third of the fused q | k | v rows each covers (None: the whole module).
DIFFUSERS = {
    "x_block.attn.qkv": [("attn.to_q", 0), ("attn.to_k", 1), ("attn.to_v", 2)],
    "context_block.attn.qkv": [("attn.add_q_proj", 0), ("attn.add_k_proj", 1), ("attn.add_v_proj", 2)],
    "x_block.attn2.qkv": [("attn2.to_q", 0), ("attn2.to_k", 1), ("attn2.to_v", 2)],
    "x_block.attn.proj": [("attn.to_out.0", None)],
    "context_block.attn.proj": [("attn.to_add_out", None)],
    "x_block.attn2.proj": [("attn2.to_out.0", None)],
    "x_block.mlp.fc1": [("ff.net.0.proj", None)],
    "x_block.mlp.fc2": [("ff.net.2", None)],
    "context_block.mlp.fc1": [("ff_context.net.0.proj", None)],
    "context_block.mlp.fc2": [("ff_context.net.2", None)],
}
# (layer key of a diffusers name, down suffix, up suffix) of each file style
STYLES = {
    "peft": (lambda name: f"transformer.{name}", ".lora_A.weight", ".lora_B.weight"),
    "onetrainer": (lambda name: "lora_transformer_" + name.replace(".", "_"), ".lora_down.weight",
                   ".lora_up.weight"),
}


@pytest.fixture(scope="module")
def core(pack):
    return importlib.import_module(f"{pack.__name__}.tlora_core")


def own_weights(core, base):
    """An unmasked Ortho-LoRA (T-LoRA's layout: ``[A; A_init]`` / ``[B S | -B_init S_init]``) on
    every attention and feed-forward target of the tiny SD3, random factors."""
    adapter, families, inventory = (importlib.import_module(f"{core.__name__}.{m}")
                                    for m in ("adapter", "families", "inventory"))
    inv = inventory.inventory_from_module(base.model.diffusion_model)
    gen = torch.Generator().manual_seed(11)
    rank_index = torch.arange(RANK).repeat(2)
    adapters: dict[str, list] = {}
    for t in families.get("sd3").targets(inv, "attention+ff"):
        down = torch.randn(2 * RANK, t.in_features, generator=gen) / t.in_features ** 0.5
        up = 0.3 * torch.randn(t.rows, 2 * RANK, generator=gen) / RANK ** 0.5
        adapters.setdefault(t.module, []).append(
            adapter.LowRankAdapter(down, up, rank_index, None, 2, t.out_rows))
    weights = importlib.import_module(f"{core.__name__}.weights").TLoRAWeights(
        adapters, "sd3", "ortho", None, "test")
    return weights, inv


def renamed(own_path, style: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The pack's own file in diffusers names (see the module docstring): (tensors, metadata)."""
    spell, down_suffix, up_suffix = STYLES[style]
    sd, ranks = {}, set()
    with safe_open(str(own_path), "pt") as f:
        keys = sorted({k.rsplit(".", 2)[0] for k in f.keys() if k.endswith(".lora_down.weight")})
        for stem in keys:
            down, up = f.get_tensor(f"{stem}.lora_down.weight"), f.get_tensor(f"{stem}.lora_up.weight")
            assert float(f.get_tensor(f"{stem}.alpha")) == down.shape[0]     # stock scale 1
            block, _, rest = stem.removeprefix("lora_unet_joint_blocks_").partition("_")
            module = next(m for m in DIFFUSERS if m.replace(".", "_") == rest)
            third = up.shape[0] // 3
            for name, part in DIFFUSERS[module]:
                rows = up if part is None else up[part * third:(part + 1) * third]
                cols = rows.abs().sum(0) != 0          # the columns of this projection's adapter
                if not cols.any():
                    continue                           # no adapter on these rows
                key = spell(f"transformer_blocks.{block}.{name}")
                sd[key + down_suffix], sd[key + up_suffix] = down[cols].clone(), rows[:, cols].clone()
                if style == "onetrainer":
                    sd[f"{key}.alpha"] = torch.tensor(float(cols.sum()))
                ranks.add(int(cols.sum()))
    assert ranks == {2 * RANK}
    metadata = {"lora_adapter_metadata": json.dumps({"r": 2 * RANK, "lora_alpha": 2 * RANK})} \
        if style == "peft" else {}
    return sd, metadata


def run(model, record_into: list) -> None:
    clone = model.clone()
    lf.install_recorder(clone, record_into)
    lf.comfy_runtime.sample(clone, "sd3", steps=4, cfg=2.0, size=16)


@pytest.mark.parametrize("style", STYLES)
def test_diffusers_named_sd3_file_gives_the_own_files_model(comfy, pack, core, loras_dir, style,
                                                           caplog):
    import comfy.sd as comfy_sd

    loader = importlib.import_module(f"{pack.__name__}.nodes.loader")
    save = importlib.import_module(f"{core.__name__}.files.write").save_tlora
    base = comfy.build_model("sd3")
    weights, inv = own_weights(core, base)
    save(loras_dir / "own.safetensors", weights, inventory=inv)
    sd, metadata = renamed(loras_dir / "own.safetensors", style)
    last = max(int(p.split(".")[1]) for p in inv if p.startswith("joint_blocks."))
    spell = STYLES[style][0]
    assert spell(f"transformer_blocks.{last}.attn.add_k_proj") + STYLES[style][1] in sd
    assert spell(f"transformer_blocks.{last}.attn.add_q_proj") + STYLES[style][1] not in sd
    assert spell("transformer_blocks.0.attn2.to_v") + STYLES[style][1] in sd
    save_file(sd, str(loras_dir / "diffusers.safetensors"), metadata)

    with caplog.at_level(logging.WARNING):
        own = loader.TLoRALoader.execute(base, "own.safetensors", 1.0, -1, 0.0, False).result[0]
        ours = loader.TLoRALoader.execute(base, "diffusers.safetensors", 1.0, -1, 0.0, False).result[0]
        stock = comfy_sd.load_lora_for_models(base, None, sd, 1.0, 0)[0]
    assert [r.getMessage() for r in caplog.records] == []     # no key lost, no scale assumed

    def rows(adapters):
        return {m: sorted(a.out_rows or (0, inv[m][0]) for a in g) for m, g in adapters.items()}

    loaded = [rows(next(iter(m.attachments.values())).weights.adapters) for m in (ours, own)]
    assert loaded == [rows(weights.adapters)] * 2
    assert set(stock.patches) == {f"diffusion_model.{m}.weight" for m in weights.adapters}

    got, want, from_stock, plain = [], [], [], []
    for model, record in ((ours, got), (own, want), (stock, from_stock), (base, plain)):
        run(model, record)
    assert len(got) == len(want) == len(from_stock) > 0
    scale = max(out.abs().max().item() for _, out in want)
    for (s_got, a), (s_want, b), (_, c) in zip(got, want, from_stock, strict=True):
        assert torch.equal(s_got, s_want)
        torch.testing.assert_close(a, b, rtol=0, atol=REL_TOL * scale)
        torch.testing.assert_close(a, c, rtol=0, atol=REL_TOL * scale)
    effect = max((a - b).abs().max().item() for (_, a), (_, b) in zip(got, plain, strict=True))
    assert effect > 20 * REL_TOL * scale                 # the LoRA really changes every output


def test_unknown_sd3_diffusers_key_is_named_with_the_file(comfy, pack, core, loras_dir, caplog):
    loader = importlib.import_module(f"{pack.__name__}.nodes.loader")
    errors = importlib.import_module(f"{core.__name__}.files.check")
    base = comfy.build_model("sd3")
    hidden = base.model.diffusion_model.joint_blocks[0].x_block.attn.proj.in_features
    gen = torch.Generator().manual_seed(4)
    pair = {".lora_A.weight": torch.randn(2, hidden, generator=gen),
            ".lora_B.weight": torch.randn(hidden, 2, generator=gen)}
    unknown = {f"transformer.transformer_blocks.0.attn.to_qq{s}": t.clone() for s, t in pair.items()}
    known = {f"transformer.transformer_blocks.0.attn.to_q{s}": t for s, t in pair.items()}

    save_file({**known, **unknown}, str(loras_dir / "partly.safetensors"))
    with caplog.at_level(logging.WARNING):
        out = loader.TLoRALoader.execute(base, "partly.safetensors", 1.0, -1, 0.0, False).result[0]
    (holder,) = out.attachments.values()
    assert [a.out_rows for a in holder.weights.adapters["joint_blocks.0.x_block.attn.qkv"]] == [(0, hidden)]
    assert any("partly.safetensors" in r.getMessage() and "transformer.transformer_blocks.0.attn.to_qq"
               in r.getMessage() for r in caplog.records)

    save_file(unknown, str(loras_dir / "unknown.safetensors"))
    # diffusers' joint-block names alone do not say FLUX, SD3 or Qwen-Image; the message says so
    with pytest.raises(errors.TLoRAFileError, match=r"^unknown\.safetensors: none of its layers.*made for "
                       r"FLUX, SD3 or Qwen-Image.*model is SD3.*transformer\.transformer_blocks\.0\.attn\.to_qq"):
        loader.TLoRALoader.execute(base, "unknown.safetensors", 1.0, -1, 0.0, False)



def test_lycoris_sd3_tlora_rebuilds_its_base_from_the_named_rows(comfy, pack, loras_dir):
    """A LyCORIS ``tlora`` file (SimpleTuner's SD3 T-LoRA) names its layers in diffusers' spelling,
    flattened: each lands on its module and rows, and its frozen factors are rebuilt from those
    rows of the base weight (LyCORIS's top-r SVD), so the full-rank delta is
    ``alpha / r * (P diag(lambda) Q - P0 diag(lambda0) Q0)``."""
    import reference_files as rf

    loader = importlib.import_module(f"{pack.__name__}.nodes.loader")
    base = comfy.build_model("sd3")
    dm = base.model.diffusion_model
    h = dm.joint_blocks[0].x_block.attn.proj.in_features
    where = {"transformer_blocks.0.attn.to_k": ("joint_blocks.0.x_block.attn.qkv", (h, 2 * h)),
             "transformer_blocks.0.attn2.to_v": ("joint_blocks.0.x_block.attn2.qkv", (2 * h, 3 * h)),
             "transformer_blocks.1.attn.add_v_proj": ("joint_blocks.1.context_block.attn.qkv", (2 * h, 3 * h)),
             "transformer_blocks.0.ff_context.net.2": ("joint_blocks.0.context_block.mlp.fc2", None)}
    gen, rank, alpha = torch.Generator().manual_seed(8), 4, 2.0

    def named_weight(module, rows):
        w = dm.get_submodule(module).weight.detach().float()
        return w if rows is None else w[rows[0]:rows[1]]

    layers = {n: rf.trained_lycoris(named_weight(*where[n]), rank, alpha, gen) for n in where}
    save_file(rf.lycoris_state_dict(layers), str(loras_dir / "lycoris_sd3.safetensors"))
    out = loader.TLoRALoader.execute(base, "lycoris_sd3.safetensors", 1.0, 2, 0.0, False).result[0]
    (holder,) = out.attachments.values()
    adapters = holder.weights.adapters
    assert {m: [a.out_rows for a in g] for m, g in adapters.items()} == {m: [r] for m, r in where.values()}
    for name, (module, rows) in where.items():
        f, (a,) = layers[name], adapters[module]
        u, s, vh = torch.linalg.svd(named_weight(module, rows).double(), full_matrices=False)
        frozen = (u[:, :rank] * s[:rank]) @ vh[:rank]
        want = alpha / rank * ((f.p.double() * f.lam.double()) @ f.q.double() - frozen)
        torch.testing.assert_close(a.up.double() @ a.down.double(), want, rtol=0, atol=1e-5, msg=name)
