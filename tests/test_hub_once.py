"""A run with hf:// weights resolves each location once and reads each weights file at most once
(issue 17); LFS blobs of the Hugging Face cache are named by their sha256 and not read at all."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from worldplay import checkpoint as ckpt
from worldplay import models
from worldplay.cli import main
from worldplay.config import DIT_PRESETS, VAE_PRESETS
from worldplay.nn.dit import WanDiT
from worldplay.nn.text import (
    DEFAULT_MAX_LENGTH,
    PromptEmbeddingCache,
    clean_prompt,
    encoder_identity_from_dir,
)
from worldplay.nn.vae import WanVAE

CKPT_REV, BASE_REV = "a" * 40, "b" * 40
PROMPT = "a walk through a tiny world"


def _hf_repo(cache: Path, files: dict[str, bytes], lfs: set[str]) -> Path:
    """A Hugging Face cache layout: snapshots/<rev>/<path> links to blobs/<name>, where an LFS
    file's blob is named by its sha256 (the others by a git-style sha1)."""
    blobs = cache / "blobs"
    snapshot = cache / "snapshots" / "rev"
    blobs.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        name = hashlib.sha256(data).hexdigest() if rel in lfs else hashlib.sha1(data).hexdigest()
        (blobs / name).write_bytes(data)
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(blobs / name, snapshot / rel)
    return snapshot


def _bytes_of(state: dict, path: Path) -> bytes:
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path.read_bytes()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Two synthetic pinned repos behind a counting snapshot_download, and a counting hasher."""
    torch.manual_seed(0)
    dit = WanDiT(DIT_PRESETS["tiny"], worldplay=True)
    model_pt = tmp_path / "model.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in dit.state_dict().items()}}, model_pt)
    vae = WanVAE(VAE_PRESETS["tiny"])
    ckpt_files = {"wan_transformer/config.json": json.dumps(DIT_PRESETS["tiny"].to_dict()).encode(),
                  "wan_distilled_model/model.pt": model_pt.read_bytes()}
    base_files = {"vae/config.json": json.dumps(VAE_PRESETS["tiny"].to_dict()).encode(),
                  "vae/diffusion_pytorch_model.safetensors": _bytes_of(vae.state_dict(), tmp_path / "v.st"),
                  "text_encoder/config.json": b'{"model_type": "umt5"}',
                  "tokenizer/tokenizer.json": b'{"version": "1.0"}'}
    # model.pt is left out of the LFS set so that it has to be hashed (once); the VAE is an LFS blob
    roots = {"org/ckpt": _hf_repo(tmp_path / "hf" / "ckpt", ckpt_files, lfs=set()),
             "org/base": _hf_repo(tmp_path / "hf" / "base", base_files, lfs={"vae/diffusion_pytorch_model.safetensors"})}
    downloads = Counter()

    def snapshot_download(*, repo_id, revision, allow_patterns, cache_dir):
        downloads[repo_id] += 1
        return str(roots[repo_id])

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(models, "_RESOLVED", {})
    monkeypatch.setattr(ckpt, "_DIGESTS", {})
    reads = Counter()
    real_hash = ckpt._hash_file

    def counting_hash(path, chunk):
        reads[Path(path).name] += 1
        return real_hash(path, chunk)

    monkeypatch.setattr(ckpt, "_hash_file", counting_hash)
    # the prompt is in the cache: the run must not need the encoder, but still names --base once
    text_cache = tmp_path / "prompts"
    identity = encoder_identity_from_dir(roots["org/base"])
    cache = PromptEmbeddingCache(text_cache)
    key = cache.key(clean_prompt(PROMPT), identity, torch.bfloat16, DEFAULT_MAX_LENGTH, encoder_dtype=torch.bfloat16)
    states = torch.zeros(1, DEFAULT_MAX_LENGTH, DIT_PRESETS["tiny"].text_dim, dtype=torch.bfloat16)
    states[:, :5] = torch.randn(1, 5, DIT_PRESETS["tiny"].text_dim).bfloat16()
    cache.put(key, states, 5, {"prompt": clean_prompt(PROMPT)})
    return {"downloads": downloads, "reads": reads, "text_cache": text_cache, "model_pt": model_pt,
            "vae_blob": hashlib.sha256(base_files["vae/diffusion_pytorch_model.safetensors"]).hexdigest()}


def test_a_hub_run_resolves_once_and_hashes_each_file_once(tmp_path, hub):
    image = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "v.mp4"
    code = main(["run", "--image", str(image), "--pose", "w-3", "--num-chunk", "1", "--preset", "tiny",
                 "--device", "cpu", "--checkpoint", f"hf://org/ckpt@{CKPT_REV}", "--base", f"hf://org/base@{BASE_REV}",
                 "--text-cache", str(hub["text_cache"]), "--prompt", PROMPT, "--out", str(out), "--no-progress"])
    assert code == 0
    assert hub["downloads"] == {"org/ckpt": 1, "org/base": 1}
    model_blob = hashlib.sha1(hub["model_pt"].read_bytes()).hexdigest()  # files are read through their blobs
    assert hub["reads"][model_blob] == 1  # the hub identity and the DiT's own share one read
    assert max(hub["reads"].values()) == 1
    assert hub["vae_blob"] not in hub["reads"]  # the LFS blob is named by its sha256: never read
    stats = json.loads(out.with_suffix(".json").read_text())
    files = stats["weights"]["dit"]["files"]
    assert files["wan_distilled_model/model.pt"] == hashlib.sha256(hub["model_pt"].read_bytes()).hexdigest()
    assert stats["weights"]["vae"]["files"]["vae/diffusion_pytorch_model.safetensors"] == hub["vae_blob"]


def test_the_digest_is_recomputed_when_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "_DIGESTS", {})
    f = tmp_path / "w.bin"
    f.write_bytes(b"one")
    assert ckpt.sha256_file(f) == hashlib.sha256(b"one").hexdigest()
    f.write_bytes(b"three")  # another size: another file version
    assert ckpt.sha256_file(f) == hashlib.sha256(b"three").hexdigest()


def test_hub_identity_covers_only_the_selected_files(tmp_path, monkeypatch):
    root = _hf_repo(tmp_path / "hf", {"vae/config.json": b"{}", "transformer/big.safetensors": b"x" * 10}, lfs=set())
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: str(root))
    _, identity = ckpt.hub_download("org/base", BASE_REV, allow_patterns=["vae/*"])
    assert set(identity.files) == {"vae/config.json"}  # an earlier download's transformer/ is not this run's
