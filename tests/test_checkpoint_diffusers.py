"""What a diffusers user brings (issue 17): sharded and variant directories written by diffusers'
own save_pretrained, config keys of a newer diffusers, wrapper prefixes from DDP/torch.compile."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

from worldplay import checkpoint as ckpt
from worldplay.checkpoint import CheckpointError, load_dit, load_vae
from worldplay.config import DIT_PRESETS, VAE_PRESETS, ConfigError, ConfigWarning, DiTConfig, VAEConfig
from worldplay.nn.dit import WanDiT

TINY_VAE = dict(base_dim=8, decoder_base_dim=16, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True], dropout=0.0, is_residual=True, in_channels=12,
                out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                latents_mean=list(VAE_PRESETS["wan5b"].latents_mean),
                latents_std=list(VAE_PRESETS["wan5b"].latents_std))


@pytest.fixture(scope="module")
def reference_vae():
    torch.manual_seed(5)
    return AutoencoderKLWan(**TINY_VAE).eval()


def _assert_same_weights(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    theirs = ref.state_dict()
    mine = ours.state_dict()
    assert set(mine) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(mine[key], value.to(mine[key].dtype)), key


def test_load_vae_reads_a_sharded_directory_written_by_diffusers(tmp_path, reference_vae):
    reference_vae.save_pretrained(tmp_path / "vae", max_shard_size="200KB")
    shards = sorted((tmp_path / "vae").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "vae" / ckpt.SAFETENSORS_INDEX).is_file()  # really sharded
    vae, identity = load_vae(tmp_path / "vae", dtype=torch.float32)
    _assert_same_weights(vae, reference_vae)
    assert set(identity.files) == {str(tmp_path / "vae" / "config.json"), *map(str, shards)}


def test_load_vae_reads_a_sharded_variant_directory(tmp_path, reference_vae):
    reference_vae.to(torch.float16).save_pretrained(tmp_path / "vae", max_shard_size="200KB", variant="fp16")
    reference_vae.float()
    names = sorted(p.name for p in (tmp_path / "vae").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in names
    assert "diffusion_pytorch_model.fp16-00001-of-" in names[1]  # diffusers' own variant shard names
    vae, _ = load_vae(tmp_path / "vae", dtype=torch.float32)
    for key, value in reference_vae.state_dict().items():
        assert torch.equal(vae.state_dict()[key], value.half().float()), key


def test_two_variant_indexes_are_refused_by_name(tmp_path, reference_vae):
    for variant in ("fp16", "bf16"):
        reference_vae.save_pretrained(tmp_path / "vae", max_shard_size="200KB", variant=variant)
    with pytest.raises(CheckpointError, match=r"several variant indexes.*bf16.*fp16"):
        load_vae(tmp_path / "vae")


def test_an_unknown_config_key_warns_and_the_weights_stay_strict(tmp_path, reference_vae):
    reference_vae.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config | {"future_option": 1}))
    with pytest.warns(ConfigWarning, match="future_option"):
        vae, _ = load_vae(tmp_path / "vae", dtype=torch.float32)
    _assert_same_weights(vae, reference_vae)
    with pytest.warns(ConfigWarning, match="num_layerz"):
        assert DiTConfig.from_dict(DIT_PRESETS["tiny"].to_dict() | {"num_layerz": 3}) == DIT_PRESETS["tiny"]
    # a key that changes the model still stops the load: its weights do not fit
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config | {"base_dim": 16}))
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_vae(tmp_path / "vae")


def test_cross_attn_norm_false_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'cross_attn_norm' must be true"):
        DiTConfig.from_dict(DIT_PRESETS["tiny"].to_dict() | {"cross_attn_norm": False})
    d = tmp_path / "transformer"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(DIT_PRESETS["tiny"].to_dict() | {"cross_attn_norm": False}))
    with pytest.raises(CheckpointError, match="cross_attn_norm"):
        load_dit(d)


@pytest.mark.parametrize("rename", [lambda k: f"module.{k}", lambda k: f"_orig_mod.{k}",
                                    lambda k: f"module._orig_mod.{k}",
                                    lambda k: k.replace("blocks.0.", "blocks.0._orig_mod.")])
def test_ddp_and_compile_prefixes_are_stripped_with_a_note(tmp_path, caplog, rename):
    torch.manual_seed(2)
    model = WanDiT(DIT_PRESETS["tiny"])
    d = tmp_path / "transformer"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(DIT_PRESETS["tiny"].to_dict()))
    save_file({rename(k): v.contiguous() for k, v in model.state_dict().items()}, d / ckpt.SAFETENSORS_NAME)
    with caplog.at_level(logging.WARNING, logger="worldplay.checkpoint"):
        loaded, _ = load_dit(d, dtype=torch.float32)
    assert "module. / _orig_mod." in caplog.text
    _assert_same_weights(loaded, model)


def test_prefixes_do_not_hide_a_missing_key(tmp_path):
    model = WanDiT(DIT_PRESETS["tiny"])
    d = tmp_path / "transformer"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(DIT_PRESETS["tiny"].to_dict()))
    state = {f"module.{k}": v.contiguous() for k, v in model.state_dict().items() if k != "proj_out.bias"}
    save_file(state, d / ckpt.SAFETENSORS_NAME)
    with pytest.raises(CheckpointError, match=r"1 missing: proj_out\.bias"):
        load_dit(d)


def test_vae_config_error_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="patch_size"):
        VAEConfig.from_dict(TINY_VAE | {"patch_size": 1})
