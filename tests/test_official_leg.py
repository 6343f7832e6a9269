"""The official-leg harness, on CPU and without the official checkout: weight export in the
published layouts, the sageattention stub, the launcher checks and lazy imports."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from worldplay.checkpoint import (
    check_state_dict,
    load_dit,
    load_vae,
    random_init_,
    read_model_dir,
    strip_wrapper_prefixes,
)
from worldplay.config import DIT_PRESETS, VAE_PRESETS, VAEConfig
from worldplay.nn.dit import WanDiT
from worldplay.nn.vae import WanVAE
from worldplay.official import (
    LAUNCH_HINT,
    STUB_DIR,
    OfficialLeg,
    OfficialLegError,
    export_weights,
    official_sys_path,
    read_official_commit,
    set_compile,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "official_rollout.py"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    dcfg, vcfg = DIT_PRESETS["tiny"], VAE_PRESETS["tiny"]
    dit = WanDiT(dcfg, worldplay=True).eval()
    random_init_(dit, 11)
    vae = WanVAE(vcfg).eval()
    random_init_(vae, 12)
    out = tmp_path_factory.mktemp("weights")
    paths = export_weights(dit.state_dict(), dcfg.to_dict(), vae, vcfg.to_dict(), out)
    return out, paths, dit, vae


def test_export_layout(exported):
    out, paths, dit, _ = exported
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "wan_distilled_model/model.pt",
        "wan_transformer/config.json",
    ]
    config = json.loads(paths["dit_config"].read_text())
    assert config == DIT_PRESETS["tiny"].to_dict() and config["_class_name"] == "WanTransformer3DModel"
    assert json.loads(paths["vae_config"].read_text())["_class_name"] == "AutoencoderKLWan"

    blob = torch.load(paths["model_pt"], map_location="cpu", weights_only=True)
    assert set(blob) == {"generator", "generator_ema"}
    assert blob["generator_ema"] is blob["generator"]  # one dict, pickled once
    gen = blob["generator"]
    assert all(k.startswith("model.") for k in gen)
    assert all(v.dtype == torch.bfloat16 for v in gen.values())
    assert {k[len("model.") :] for k in gen} == set(dit.state_dict())
    assert any(".to_out_prope." in k for k in gen) and any(".action_embedder." in k for k in gen)

    # The official loader's stripping (leading 'model.' then leading '_fsdp_wrapped_module.'),
    # then a strict load into a fresh model.
    state = {(k.replace("model.", "") if k.startswith("model.") else k): v for k, v in gen.items()}
    fresh = WanDiT(DIT_PRESETS["tiny"], worldplay=True)
    fresh.load_state_dict(state, strict=True)


def test_export_roundtrip_through_our_loaders(exported):
    out, _, dit, vae = exported
    loaded, identity = load_dit(
        out / "wan_transformer",
        worldplay_weights=out / "wan_distilled_model" / "model.pt",
        dtype=torch.float32,
    )
    for k, v in dit.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16).float()), k
    assert str(out / "wan_distilled_model" / "model.pt") in identity.files
    # The VAE folder: a strict key/shape match and the exact values (kept in their own dtype).
    config, state, files = read_model_dir(out / "vae")
    assert VAEConfig.from_dict(config) == VAE_PRESETS["tiny"]
    check_state_dict(vae, state, "exported vae")
    for k, v in vae.state_dict().items():
        assert torch.equal(state[k], v), k


def test_export_vae_loads_with_load_vae(exported):
    out, _, _, vae = exported
    vae_loaded, _ = load_vae(out / "vae", dtype=torch.float32)
    for k, v in vae.state_dict().items():
        assert torch.equal(vae_loaded.state_dict()[k], v), k
    assert torch.equal(vae_loaded.latents_inv_std, vae.latents_inv_std)


def test_export_from_state_dict_with_vae_dtype(tmp_path):
    vcfg = VAE_PRESETS["tiny"]
    vae = WanVAE(vcfg)
    dit = WanDiT(DIT_PRESETS["tiny"], worldplay=True)
    prefixed = {f"_fsdp_wrapped_module.{k}": v for k, v in dit.state_dict().items()}
    paths = export_weights(
        strip_wrapper_prefixes(prefixed), DIT_PRESETS["tiny"].to_dict(), vae.state_dict(), vcfg.to_dict(), tmp_path,
        vae_dtype=torch.bfloat16,
    )  # fmt: skip
    from safetensors.torch import load_file

    tensors = load_file(str(paths["vae_weights"]))
    assert set(tensors) == set(vae.state_dict())
    assert all(t.dtype == torch.bfloat16 for t in tensors.values() if t.is_floating_point())
    assert not list(tmp_path.rglob("*.tmp"))


def _load_stub():
    spec = importlib.util.spec_from_file_location(
        "sageattention_stub_under_test", STUB_DIR / "sageattention" / "__init__.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("is_causal", [False, True])
def test_sageattn_stub_equals_sdpa(is_causal):
    stub = _load_stub()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16, generator=g) for _ in range(3))  # [B, H, N, D]
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    assert torch.equal(stub.sageattn(q, k, v, tensor_layout="HND", is_causal=is_causal), ref)
    assert torch.equal(stub.sageattn(q, k, v, is_causal=is_causal), ref)  # HND is the default
    qn, kn, vn = (t.transpose(1, 2) for t in (q, k, v))  # [B, N, H, D]
    out = stub.sageattn(qn, kn, vn, tensor_layout="NHD", is_causal=is_causal)
    assert out.shape == qn.shape
    assert torch.equal(out, ref.transpose(1, 2))


def test_sageattn_stub_has_no_side_effects():
    stub = _load_stub()
    before = {k: v for k, v in vars(stub).items()}
    q = torch.randn(1, 2, 5, 8)
    for _ in range(3):
        stub.sageattn(q, q, q, tensor_layout="HND", is_causal=False, smooth_k=True)
    assert {k: v for k, v in vars(stub).items()} == before
    with pytest.raises(ValueError, match="tensor_layout"):
        stub.sageattn(q, q, q, tensor_layout="BHND")


def test_official_sys_path_puts_the_stub_first(tmp_path):
    entries = official_sys_path(tmp_path)
    assert entries == [str(STUB_DIR), str(tmp_path.resolve()), str(tmp_path.resolve() / "wan")]
    assert (STUB_DIR / "sageattention" / "__init__.py").is_file()


def test_read_official_commit(tmp_path):
    assert read_official_commit(tmp_path) is None
    (tmp_path / "COMMIT").write_text("abc123\n")
    assert read_official_commit(tmp_path) == "abc123"


def test_set_compile(monkeypatch):
    import torch._dynamo

    # Restored by hand: pytest's monkeypatch undo breaks torch 2.13's context-variable configs
    # (dynamo then fails in every later torch.compile of the same process).
    saved = torch._dynamo.config.disable
    monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)
    try:
        set_compile(False)
        assert torch._dynamo.config.disable is True and os.environ["TORCH_COMPILE_DISABLE"] == "1"
        set_compile(True)
        assert torch._dynamo.config.disable is False and "TORCH_COMPILE_DISABLE" not in os.environ
    finally:
        torch._dynamo.config.disable = saved


def test_leg_needs_world_size(monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(OfficialLegError, match="torch.distributed.run"):
        OfficialLeg(tmp_path, tmp_path, device="cpu")
    assert "--nproc_per_node=1" in LAUNCH_HINT


def test_leg_checks_weights_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(OfficialLegError, match="export_weights"):
        OfficialLeg(tmp_path, tmp_path / "nothing", device="cpu")


def _minimal_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)}


def test_script_without_world_size_exits_2_with_hint(tmp_path):
    argv = [sys.executable, str(SCRIPT), "--official", str(tmp_path), "--weights", str(tmp_path),
            "--image", "x.png", "--pose", "w-3", "--num-chunk", "1", "--random-text", "0", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(argv, env=_minimal_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "-m torch.distributed.run --nproc_per_node=1 scripts/official_rollout.py" in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], env=_minimal_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "WORLD_SIZE" in proc.stderr


def test_script_help_names_the_launcher():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], env=_minimal_env(), capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "torch.distributed.run --nproc_per_node=1" in proc.stdout
    assert "--no-compile" in proc.stdout and "--prompt-embeds" in proc.stdout


def test_importing_the_harness_imports_no_official_dependency():
    code = (
        "import sys, worldplay.official; "
        "bad = [m for m in ('diffusers', 'transformers', 'sageattention', 'inference', 'hyvideo') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_minimal_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
