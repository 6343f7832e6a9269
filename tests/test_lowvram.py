"""Low-VRAM profiles (worldplay.lowvram), their settings, the CLI flag, the allocator setting
and the out-of-memory message."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from worldplay.allocator import EXPANDABLE, configure_allocator
from worldplay.cli import main
from worldplay.lowvram import EXACT_LEVERS, PROFILES, out_of_memory_message, profile_settings
from worldplay.media import read_video
from worldplay.rollout import RolloutError, RolloutSettings

CUDA_FASTEST = {"attention_backend": "cudnn", "accel": "compile+graphs", "fast_decode": True, "fused_kernels": True}


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(path)
    return path


def _run(image, out, *extra):
    return main(["run", "--image", str(image), "--preset", "tiny", "--random-init", "0", "--device", "cpu",
                 "--out", str(out), "--no-progress", "--pose", "w-19", "--num-chunk", "5", *extra])


@pytest.mark.parametrize("name", sorted(PROFILES))
@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_every_profile_is_valid_settings(name, device_type):
    """Each profile, on top of the fastest settings of either device, is a RolloutSettings
    (the combinations it excludes, e.g. CUDA graphs with streamed blocks, are not in it)."""
    base = CUDA_FASTEST if device_type == "cuda" else {"attention_backend": "sdpa"}
    settings = RolloutSettings(num_chunk=8, **profile_settings(name, base, device_type))
    assert settings.dit_on_host and settings.decode_group == 1 and not settings.decoder_copy
    assert "graphs" not in settings.accel
    assert PROFILES[name].exact == (settings.linear_dtype == "bf16" and settings.kv_dtype == "bf16")


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_each_profile_is_predicted_to_fit_its_cap(name):
    """The design: at wan5b 704x1280 every profile's planned peak (traced transients and the
    workspace allowance included) stays under the cap its bench leg runs under, and the exact
    levers bring the fastest settings under 32 GiB; the bench checks the real figures."""
    from worldplay.lowvram import predicted_peak_gib

    settings = RolloutSettings(num_chunk=8, **profile_settings(name, CUDA_FASTEST, "cuda"))
    assert predicted_peak_gib("wan5b", 704, 1280, settings) <= PROFILES[name].cap_gib - 0.5
    lean = RolloutSettings(num_chunk=8, **{**CUDA_FASTEST, **EXACT_LEVERS})
    assert predicted_peak_gib("wan5b", 704, 1280, lean) <= 32.0


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"decode_group": 3}, "decode_group 3 unknown"),
    ({"decode_top_frames": -1}, "decode_top_frames must be an integer >= 0"),
    ({"kv_dtype": "int4"}, "kv_dtype 'int4' unknown"),
    ({"kv_dtype": "fp8", "memory_mode": "reuse"}, "needs memory_mode='reprefill'"),
    ({"streamed_blocks": 4}, "set dit_on_host=True"),
    ({"streamed_blocks": 4, "dit_on_host": True, "accel": "compile+graphs"}, "needs accel 'eager' or 'compile'"),
    ({"streamed_blocks": -1, "dit_on_host": True}, "streamed_blocks must be an integer >= 0"),
    ({"release_kv_for_decode": True, "memory_mode": "reuse"}, "needs memory_mode='reprefill'"),
])
def test_memory_settings_are_validated(overrides, needle):
    with pytest.raises(RolloutError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        RolloutSettings(num_chunk=2, **overrides)


def test_low_vram_run_equals_the_default_run_where_exact(tmp_path, image):
    """``--low-vram 24-exact`` on the CPU: the DiT from host memory with every block streamed
    (the tiny DiT has 2), the K/V released for each decode, one latent and one frame per decoder
    pass: the same video as the default run, bit for bit; the settings reach the stats."""
    assert _run(image, tmp_path / "plain.mp4") == 0
    assert _run(image, tmp_path / "lean.mp4", "--low-vram", "24-exact") == 0
    settings = json.loads((tmp_path / "lean.json").read_text())["settings"]
    assert settings["dit_on_host"] and settings["streamed_blocks"] == 28 and settings["release_kv_for_decode"]
    assert settings["decode_group"] == 1 and settings["decode_top_frames"] == 1
    assert np.array_equal(read_video(tmp_path / "plain.mp4"), read_video(tmp_path / "lean.mp4"))


def test_low_vram_fp8_profile_runs(tmp_path, image):
    assert _run(image, tmp_path / "v.mp4", "--low-vram", "16") == 0
    settings = json.loads((tmp_path / "v.json").read_text())["settings"]
    assert settings["linear_dtype"] == settings["kv_dtype"] == "fp8" and settings["streamed_blocks"] == 30
    assert read_video(tmp_path / "v.mp4").shape[0] == 16 * 5 - 3


def test_low_vram_and_two_devices_exclude_each_other(tmp_path, image, capsys):
    assert _run(image, tmp_path / "v.mp4", "--low-vram", "16", "--decode-device", "cpu") == 2
    assert "--low-vram fits one GPU" in capsys.readouterr().err


def test_the_prompt_is_embedded_before_the_models_load(tmp_path, image, monkeypatch):
    """On a prompt-cache miss the umT5 encoder is loaded and freed inside the embedding call: it
    must come before the DiT and VAE are on the device, so the three are never resident together."""
    import worldplay.cli as cli
    import worldplay.models as models

    order = []
    real_prompt, real_models = cli._prompt_states, models.random_models
    monkeypatch.setattr(cli, "_prompt_states", lambda *a: (order.append("prompt"), real_prompt(*a))[1])
    monkeypatch.setattr(models, "random_models", lambda *a, **k: (order.append("models"), real_models(*a, **k))[1])
    assert _run(image, tmp_path / "v.mp4", "--num-chunk", "1", "--pose", "w-3") == 0
    assert order == ["prompt", "models"]


def test_out_of_memory_is_one_line_with_the_need_and_nothing_is_written(tmp_path, image, capsys, monkeypatch):
    """A CUDA out-of-memory error in the middle of a run (simulated after the first chunk): exit
    3, one line naming what the run needs (from the memory plan) and a --low-vram mode, no
    traceback, and no video, stats or temporary file left behind."""
    from worldplay.rollout import WorldPlayPipeline

    real = WorldPlayPipeline.rollout

    def runs_out(self, *args, **kwargs):
        stream = real(self, *args, **kwargs)
        yield next(stream)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.85 GiB")

    monkeypatch.setattr(WorldPlayPipeline, "rollout", runs_out)
    out = tmp_path / "out" / "v.mp4"
    out.parent.mkdir()
    assert _run(image, out) == 3
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "out of GPU memory: this run needs about" in err and "GiB" in err and "--low-vram 16" in err
    assert "nothing was written" in err
    assert list(out.parent.iterdir()) == []


def test_out_of_memory_message_names_the_profile_that_fits(monkeypatch):
    """For the fastest settings at wan5b on a 24 GiB card: what they need, and the 24 GB modes."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: type("Props", (), {"total_memory": 24 * 2**30})())
    settings = RolloutSettings(num_chunk=8, **CUDA_FASTEST)
    text = out_of_memory_message("wan5b", 704, 1280, settings, "cuda", CUDA_FASTEST)
    assert text.startswith("this run needs about 49.0 GiB (memory K/V (bf16) 12.1, DiT weights (bf16) 9.9")
    assert "the GPU has 24.0 GiB" in text
    assert "--low-vram 24 (about" in text and "--low-vram 24-exact (about" in text and "exact)" in text
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: type("Props", (), {"total_memory": 8 * 2**30})())
    assert "the smallest mode, --low-vram 16, needs about" in out_of_memory_message(
        "wan5b", 704, 1280, settings, "cuda", CUDA_FASTEST)


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, EXPANDABLE),
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}, "max_split_size_mb:512"),
    ({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}, None),
    ({"PYTORCH_CUDA_ALLOC_CONF": ""}, ""),
])
def test_expandable_segments_unless_the_user_chose(environ, expected):
    env = dict(environ)
    configure_allocator(env)
    assert env.get("PYTORCH_CUDA_ALLOC_CONF") == expected
