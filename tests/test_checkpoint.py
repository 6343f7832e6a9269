"""Checkpoint loading: strictness, clear errors, safe unpickling, pinned hub downloads."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from worldplay import checkpoint as ckpt
from worldplay.checkpoint import CheckpointError, load_dit, read_worldplay_model_pt
from worldplay.config import DIT_PRESETS
from worldplay.nn.dit import WanDiT

TINY = DIT_PRESETS["tiny"]


@pytest.fixture
def model_dir(tmp_path):
    """A diffusers-layout directory holding the tiny DiT (our own writer: config + safetensors)."""
    torch.manual_seed(3)
    model = WanDiT(TINY)
    d = tmp_path / "transformer"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY.to_dict()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, d / ckpt.SAFETENSORS_NAME)
    return d, model


def test_roundtrip(model_dir):
    d, model = model_dir
    loaded, identity = load_dit(d, device="cpu", dtype=torch.float32)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert set(identity.files) == {str(d / "config.json"), str(d / ckpt.SAFETENSORS_NAME)}
    assert all(len(h) == 64 for h in identity.files.values())


def test_truncated_safetensors_names_the_file(model_dir):
    d, _ = model_dir
    f = d / ckpt.SAFETENSORS_NAME
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: not a readable safetensors file.*truncated"):
        load_dit(d, device="cpu")


def test_missing_key_is_named(model_dir):
    d, model = model_dir
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "blocks.1.attn2.norm_k.weight"}
    save_file(state, d / ckpt.SAFETENSORS_NAME)
    with pytest.raises(CheckpointError, match=r"1 missing: blocks\.1\.attn2\.norm_k\.weight") as info:
        load_dit(d, device="cpu")
    assert str(d) in str(info.value)


def test_misshaped_and_unexpected_keys_are_named(model_dir):
    d, model = model_dir
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["proj_out.bias"] = torch.zeros(7)
    state["blocks.0.attn1.extra.weight"] = torch.zeros(2)
    save_file(state, d / ckpt.SAFETENSORS_NAME)
    with pytest.raises(CheckpointError) as info:
        load_dit(d, device="cpu")
    msg = str(info.value)
    assert "1 unexpected: blocks.0.attn1.extra.weight" in msg
    assert "1 mis-shaped: proj_out.bias: checkpoint (7,) vs model (192,)" in msg


def test_non_weights_only_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    path = tmp_path / "model.pt"
    torch.save({"generator": {"x": torch.zeros(1)}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"model\.pt: refused to load .*weights_only"):
        read_worldplay_model_pt(path)


def test_worldplay_model_pt_layout_loads_strictly(tmp_path, model_dir):
    """The distilled checkpoint layout: {'generator': {'model.<key>' / '_fsdp_wrapped_module.'}}."""
    d, _ = model_dir
    torch.manual_seed(4)
    hy = WanDiT(TINY, worldplay=True)
    for p in hy.parameters():
        torch.nn.init.normal_(p, std=0.1)
    state = {}
    for k, v in hy.state_dict().items():
        if k.startswith("blocks."):
            i, rest = k[len("blocks."):].split(".", 1)
            state[f"model._fsdp_wrapped_module.blocks.{i}._fsdp_wrapped_module.{rest}"] = v.to(torch.bfloat16)
        else:
            state[f"model.{k}"] = v.to(torch.bfloat16)
    torch.save({"generator": state, "generator_ema": state}, tmp_path / "model.pt")
    loaded, identity = load_dit(d, worldplay_weights=tmp_path / "model.pt", device="cpu", dtype=torch.float32)
    assert loaded.worldplay
    for k, v in hy.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16).float()), k
    assert str(tmp_path / "model.pt") in identity.files
    # Missing the generator entry: a precise error.
    torch.save({"generator_ema": state}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt: expected a dict with a 'generator' entry"):
        read_worldplay_model_pt(tmp_path / "bad.pt")


def test_hub_download_requires_pinned_revision_and_checks_digests(tmp_path, monkeypatch):
    snapshot = tmp_path / "snap"
    (snapshot / "vae").mkdir(parents=True)
    (snapshot / "vae" / "config.json").write_text("{}")
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(snapshot)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(CheckpointError, match="not a commit hash"):
        ckpt.hub_download("org/repo", "main")
    rev = "a" * 40
    root, ident = ckpt.hub_download("org/repo", rev, allow_patterns=["vae/*"])
    assert calls[-1]["revision"] == rev and calls[-1]["allow_patterns"] == ["vae/*"]
    assert ident.files == {"vae/config.json": ckpt.sha256_file(snapshot / "vae" / "config.json")}
    assert ident.repo_id == "org/repo" and ident.revision == rev
    with pytest.raises(CheckpointError, match="vae/config.json has sha256 .* expected 00"):
        ckpt.hub_download("org/repo", rev, expected_sha256={"vae/config.json": "00" * 32})


# ---------------------------------------------------------------------------------------------
# dtypes: a strict load checks the kind of number as well as the key and the shape


def _hy_model_pt(path, state):
    """HY-WorldPlay's distilled layout: {'generator': {'model.<key>': tensor}}."""
    torch.save({"generator": {f"model.{k}": v for k, v in state.items()}}, path)


@pytest.mark.parametrize("bad_dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_float_weights_in_a_safetensors_dir_are_refused(model_dir, bad_dtype):
    d, model = model_dir
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["proj_out.weight"] = state["proj_out.weight"].to(bad_dtype)
    save_file(state, d / ckpt.SAFETENSORS_NAME)
    name = str(bad_dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError) as info:
        load_dit(d, device="cpu")
    msg = str(info.value)
    assert msg.startswith(str(d / ckpt.SAFETENSORS_NAME))  # the file ...
    assert f"1 wrong dtype: proj_out.weight: checkpoint {name} vs model floating point" in msg  # ... and the key


def test_non_float_weights_in_a_worldplay_model_pt_are_refused(tmp_path, model_dir):
    d, _ = model_dir
    hy = WanDiT(TINY, worldplay=True)
    state = {k: v.to(torch.bfloat16) for k, v in hy.state_dict().items()}
    state["patch_embedding.weight"] = state["patch_embedding.weight"].to(torch.int64)
    state["blocks.0.norm2.weight"] = state["blocks.0.norm2.weight"] > 0
    _hy_model_pt(tmp_path / "model.pt", state)
    with pytest.raises(CheckpointError) as info:
        load_dit(d, worldplay_weights=tmp_path / "model.pt", device="cpu")
    msg = str(info.value)
    assert msg.startswith(str(tmp_path / "model.pt"))
    assert "2 wrong dtype: blocks.0.norm2.weight: checkpoint bool vs model floating point, " \
           "patch_embedding.weight: checkpoint int64 vs model floating point" in msg


def test_an_integer_vae_is_refused_and_a_float8_one_loads(tmp_path):
    from worldplay.checkpoint import load_vae
    from worldplay.config import VAE_PRESETS
    from worldplay.nn.vae import WanVAE

    cfg = VAE_PRESETS["tiny"]
    d = tmp_path / "vae"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    state = {k: v.contiguous() for k, v in WanVAE(cfg).state_dict().items()}
    save_file({k: (v * 100).to(torch.int32) for k, v in state.items()}, d / ckpt.SAFETENSORS_NAME)
    weights = re.escape(str(d / ckpt.SAFETENSORS_NAME))
    with pytest.raises(CheckpointError, match=rf"^{weights}: .* \d+ wrong dtype: .*int32 vs model floating point"):
        load_vae(d, device="cpu")
    # Narrower floating point is still floating point: loading casts it to the run's dtype.
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in state.items()}, d / ckpt.SAFETENSORS_NAME)
    vae, _ = load_vae(d, device="cpu", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in vae.parameters())


def test_buffers_keep_the_dtype_family_the_module_declares():
    class WithCounter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(2))
            self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    module = WithCounter()
    ckpt.check_state_dict(module, {"weight": torch.ones(2, dtype=torch.bfloat16),
                                   "steps": torch.tensor(3, dtype=torch.int32)}, "ok.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt: .*1 wrong dtype: steps: checkpoint float32 vs model integer"):
        ckpt.check_state_dict(module, {"weight": torch.ones(2), "steps": torch.tensor(3.0)}, "bad.pt")


# ---------------------------------------------------------------------------------------------
# hub locations: checked before any download, failures as one line naming repo and commit


def test_hub_spec_needs_a_repo_id():
    from worldplay.models import HubLocation, parse_location

    with pytest.raises(CheckpointError, match=r"^hf://@a{40}: '' is not a Hugging Face repo id"):
        parse_location("hf://@" + "a" * 40)
    assert parse_location("hf://tencent/HY-WorldPlay@" + "b" * 40) == HubLocation("tencent/HY-WorldPlay", "b" * 40)


def test_offline_hub_miss_names_repo_commit_and_the_settings(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    rev = "c" * 40
    with pytest.raises(CheckpointError) as info:
        ckpt.hub_download("tencent/HY-WorldPlay", rev, cache_dir=tmp_path)  # the real library, an empty cache
    msg = str(info.value)
    assert msg.startswith(f"hf://tencent/HY-WorldPlay@{rev}: not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE" in msg and "HF_TOKEN" in msg and "\n" not in msg


def test_unreachable_hub_is_one_line(monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import LocalEntryNotFoundError

    def no_network(**kwargs):
        try:
            raise ConnectionError("[Errno -2] Name or service not known")
        except ConnectionError as exc:
            raise LocalEntryNotFoundError("Got: ConnectError: ...\nAn error happened ...") from exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(CheckpointError, match=r"^hf://org/repo@d{40}: not in the local Hugging Face cache and the Hub "
                                              r"cannot be reached \(ConnectionError\); .*HF_TOKEN"):
        ckpt.hub_download("org/repo", "d" * 40)
