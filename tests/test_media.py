"""Tests for worldplay.media: official-parity image loading, uint8 conversion, atomic MP4/JSON."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from worldplay.media import (
    MediaError,
    MediaExistsError,
    VideoWriter,
    atomic_write_json,
    atomic_write_text,
    frames_to_uint8,
    load_image,
    read_video,
    video_info,
)

TW, TH = 1280, 704


def _pattern_image(w, h, seed=0):
    """A deterministic image with gradients and noise so resize/crop mistakes show up."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack(
        [(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), rng.integers(0, 256, (h, w))], -1
    )
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _reference(img, tw, th):
    """Independent straightforward version of the official preprocessing."""
    w, h = img.size
    s = max(tw / w, th / h)
    nw, nh = int(w * s), int(h * s)
    r = img.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - tw) // 2, (nh - th) // 2
    r = r.crop((left, top, left + tw, top + th))
    return torch.from_numpy(np.array(r).astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _hidden_leftovers(directory):
    return [p.name for p in directory.iterdir() if ".partial-" in p.name]


# ---------------------------------------------------------------------------- load_image


@pytest.mark.parametrize("size", [(1280, 704), (1344, 704), (880, 464), (500, 900)])
def test_load_image_matches_reference(tmp_path, size):
    img = _pattern_image(*size)
    path = tmp_path / f"img_{size[0]}x{size[1]}.png"
    img.save(path)
    out = load_image(str(path), TW, TH)
    assert out.shape == (3, TH, TW) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, _reference(img, TW, TH))


def test_load_image_identity_is_exact(tmp_path):
    img = _pattern_image(TW, TH, seed=1)
    img.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", TW, TH)
    expect = torch.from_numpy(np.array(img).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert torch.equal(out, expect)


def test_load_image_880x464_resizes_to_1335(tmp_path):
    img = _pattern_image(880, 464)
    img.save(tmp_path / "b.png")
    s = max(TW / 880, TH / 464)
    assert (int(880 * s), int(464 * s)) == (1335, 704)
    assert torch.equal(load_image(tmp_path / "b.png", TW, TH), _reference(img, TW, TH))


def test_load_image_truncates_not_rounds(tmp_path):
    w, h = 881, 463
    s = max(TW / w, TH / h)
    trunc, rounded = (int(w * s), int(h * s)), (round(w * s), round(h * s))
    assert trunc != rounded  # the case is only meaningful if the two rules disagree
    img = _pattern_image(w, h, seed=2)
    img.save(tmp_path / "c.png")
    out = load_image(tmp_path / "c.png", TW, TH)

    def crop_of(nw, nh):
        r = img.resize((nw, nh), Image.LANCZOS)
        left, top = (nw - TW) // 2, (nh - TH) // 2
        r = r.crop((left, top, left + TW, top + TH))
        return torch.from_numpy(np.array(r).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)

    assert torch.equal(out, crop_of(*trunc))
    assert not torch.equal(out, crop_of(*rounded))


def test_load_image_float_truncation_quirk_pads_like_official(tmp_path):
    # 154 * (1280 / 154) < 1280 in floating point -> 1279-wide resize, crop from x = -1.
    w, h = 154, 300
    assert int(w * (TW / w)) == TW - 1
    img = _pattern_image(w, h, seed=3)
    img.save(tmp_path / "q.png")
    with pytest.warns(UserWarning, match="1-px black border"):
        out = load_image(tmp_path / "q.png", TW, TH)
    assert torch.equal(out, _reference(img, TW, TH))
    assert torch.all(out[:, :, 0] == -1.0)  # PIL pads the out-of-bounds column with black


def test_load_image_converts_modes_to_rgb(tmp_path):
    img = _pattern_image(TW, TH).convert("RGBA")
    img.save(tmp_path / "rgba.png")
    assert torch.equal(load_image(tmp_path / "rgba.png", TW, TH), _reference(img.convert("RGB"), TW, TH))


def test_load_image_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(MediaError, match="nope.png.*does not exist"):
        load_image(missing, TW, TH)

    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not an image")
    with pytest.raises(MediaError, match="notes.png"):
        load_image(not_image, TW, TH)

    good = tmp_path / "full.png"
    _pattern_image(64, 64).save(good)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(MediaError, match="cut.png"):
        load_image(truncated, TW, TH)

    with pytest.raises(MediaError, match="not a regular file"):
        load_image(tmp_path, TW, TH)
    with pytest.raises(MediaError):
        load_image(good, 0, TH)
    with pytest.raises(MediaError):
        load_image(good, True, TH)  # a bool is not a size (it was taken as 1)
    assert issubclass(MediaError, ValueError)


def _write_png16(path, values):
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA by the last axis) written byte by byte, so the
    test does not depend on which 16-bit modes PIL can save."""
    import struct
    import zlib

    values = np.asarray(values, dtype=">u2")
    h, w = values.shape[:2]
    colour = 0 if values.ndim == 2 else {2: 4, 3: 2, 4: 6}[values.shape[2]]
    raw = b"".join(b"\x00" + values[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def _sixteen_bit_grey(w=96, h=64):
    """Values spread over the whole 16-bit range (a photo's tones, not just its darkest 256)."""
    rng = np.random.default_rng(7)
    return rng.integers(0, 65536, (h, w)).astype(np.uint16)


def test_load_image_scales_16_bit_greyscale_png(tmp_path):
    values = _sixteen_bit_grey()
    path = _write_png16(tmp_path / "grey16.png", values)
    assert Image.open(path).mode == "I;16"
    out = load_image(path, 96, 64)  # same size: no resampling, the values are checked exactly
    expected = torch.from_numpy((values >> 8).astype(np.float32) / 127.5 - 1.0)
    assert torch.equal(out, expected.expand(3, -1, -1))
    assert float((out == 1.0).float().mean()) < 0.01  # was 99.7 % white (values clipped at 255)
    # and the same as PIL's own 16 -> 8 bit rule for an RGB PNG of the same values
    rgb = _write_png16(tmp_path / "rgb16.png", np.stack([values] * 3, -1))
    assert torch.equal(load_image(rgb, 96, 64), out)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_load_image_scales_other_16_bit_modes(tmp_path, mode):
    values = _sixteen_bit_grey(40, 24)
    if mode == "I":  # PIL reads 16-bit PGMs as 32-bit "I"
        path = tmp_path / "grey.pgm"
        path.write_bytes(b"P5\n40 24\n65535\n" + values.astype(">u2").tobytes())
    else:
        path = tmp_path / "grey.tif"
        data = values.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
        Image.frombytes(mode, (40, 24), data).save(path)
    assert Image.open(path).mode == mode
    out = load_image(path, 40, 24)
    assert torch.equal(out[0], torch.from_numpy((values >> 8).astype(np.float32) / 127.5 - 1.0))


def test_load_image_refuses_images_without_a_bit_depth(tmp_path):
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(MediaError, match="f.tif.*32-bit float"):
        load_image(tmp_path / "f.tif", 32, 32)
    # a 32-bit TIFF may hold 0..255 or 0..2^32-1: refused either way rather than guessed at
    for value in (200, 70000):
        Image.fromarray(np.full((8, 8), value, np.int32)).save(tmp_path / "i32.tif")
        with pytest.raises(MediaError, match="i32.tif.*32-bit integer"):
            load_image(tmp_path / "i32.tif", 32, 32)


def test_load_image_refuses_extreme_aspect_ratios_before_resizing(tmp_path, monkeypatch):
    Image.new("RGB", (2000, 1), (128, 128, 128)).save(tmp_path / "line.png")

    def no_resize(*args, **kwargs):
        raise AssertionError("resize() was called: the bound must come before any resampling")

    monkeypatch.setattr(Image.Image, "resize", no_resize)
    with pytest.raises(MediaError) as e:
        load_image(tmp_path / "line.png", TW, TH)
    from worldplay.media import MAX_RESIZE_EXCESS

    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert "line.png" in msg and "2000x1" in msg and "1408000x704" in msg and f"{MAX_RESIZE_EXCESS}x" in msg


def test_load_image_still_takes_wide_panoramas(tmp_path):
    # 96x64 is 1.5:1; a 20:1 image is 13x the crop's area once resized, within the bound
    _pattern_image(1280, 64).save(tmp_path / "pano.png")
    assert load_image(tmp_path / "pano.png", 96, 64).shape == (3, 64, 96)


def test_load_image_extreme_aspect_ratio_peak_memory(tmp_path):
    """The real cost, measured in a fresh process: a 20000x1 PNG at 96x64 resized to
    1280000x64 first (about 400 MB of peak RSS); refused, it costs nothing."""
    import subprocess
    import sys
    import textwrap

    Image.new("RGB", (20000, 1), (128, 128, 128)).save(tmp_path / "line.png")
    script = textwrap.dedent(f"""
        import resource
        from worldplay.media import MediaError, load_image
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_image({str(tmp_path / "line.png")!r}, 96, 64)
        except MediaError:
            pass
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root,
                          check=True)
    grew_mb = int(done.stdout.strip().splitlines()[-1])
    assert grew_mb < 50, f"peak RSS grew by {grew_mb} MB"


def test_load_image_os_errors_read_without_errno_noise(tmp_path, monkeypatch):
    path = tmp_path / "locked.png"
    _pattern_image(8, 8).save(path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", refuse)  # tests run as root, where chmod refuses nothing
    with pytest.raises(MediaError) as e:
        load_image(path, 32, 32)
    assert str(e.value) == f"cannot read input image {str(path)!r}: Permission denied"


# ------------------------------------------------------------------------ frames_to_uint8


def test_frames_to_uint8_known_values():
    x = torch.tensor([-1.0, 1.0, 0.0, -2.0, 3.0]).view(1, 1, 5, 1, 1).expand(1, 3, 5, 1, 1)
    out = frames_to_uint8(x.float())
    assert out.dtype == torch.uint8 and out.shape == (5, 1, 1, 3)
    assert out[:, 0, 0, 0].tolist() == [0, 255, 127, 0, 255]  # 127.5 truncates to 127
    assert torch.equal(frames_to_uint8(x[0].float()), out)  # [3, T, H, W] accepted too


def test_frames_to_uint8_rounds_in_bf16_first():
    # x = 1 - 2^-8: x/2 + 1/2 = 0.998046875 is a bf16 tie that rounds to 1.0 (-> 255),
    # while float32 keeps 0.998046875 (-> 254.5 -> 254). Official math is in bf16.
    v = 1 - 2**-8
    x = torch.full((1, 3, 1, 1, 1), v)
    assert frames_to_uint8(x.bfloat16())[0, 0, 0, 0].item() == 255
    assert frames_to_uint8(x.float())[0, 0, 0, 0].item() == 254


def test_frames_to_uint8_matches_official_formula():
    x = (torch.rand(1, 3, 3, 8, 16) * 2.2 - 1.1).bfloat16()
    official = ((x[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).float().numpy() * 255).astype(np.uint8)
    assert np.array_equal(frames_to_uint8(x).numpy(), official)


def test_frames_to_uint8_rejects_bad_input():
    with pytest.raises(MediaError):
        frames_to_uint8(torch.zeros(2, 3, 1, 4, 4))
    with pytest.raises(MediaError):
        frames_to_uint8(torch.zeros(4, 1, 4, 4))
    with pytest.raises(MediaError, match="NaN"):
        frames_to_uint8(torch.full((3, 1, 2, 2), float("nan")))


# ---------------------------------------------------------------------------- VideoWriter


def _video_frames(t, h=64, w=128, offset=0):
    """Moving luminance texture with a moderate colour tint: camera-like content.

    Strongly saturated, fast-changing colours lose more to yuv420p chroma subsampling
    (about 4 levels mean |diff| measured); this content measures about 2.
    """
    tt, yy, xx = np.meshgrid(np.arange(t) + offset, np.arange(h), np.arange(w), indexing="ij")
    luma = 128 + 100 * np.sin((xx + 3 * tt) / 9.0) * np.cos((yy - 2 * tt) / 11.0)
    tint = 25 * np.stack([np.cos(xx / 40.0), np.zeros_like(xx, dtype=float), -np.sin(yy / 30.0)], -1)
    return np.clip(luma[..., None] + tint, 0, 255).astype(np.uint8)


def test_video_writer_round_trip(tmp_path):
    path = tmp_path / "out.mp4"
    a, b = _video_frames(13), _video_frames(16, offset=13)
    with VideoWriter(path, fps=16) as w:
        w.append(a)
        w.append(torch.from_numpy(b))  # CPU torch tensors are accepted too
        assert not path.exists()  # nothing at the final path until the block exits cleanly
    assert w.frames_written == 29
    assert _hidden_leftovers(tmp_path) == []

    back = read_video(path)
    assert back.shape == (29, 64, 128, 3) and back.dtype == np.uint8
    err = np.abs(back.astype(np.float64) - np.concatenate([a, b]).astype(np.float64)).mean()
    assert err < 3.0, err  # measured ~2 (libx264 crf 25, yuv420p)

    info = video_info(path)
    assert info["frames"] == 29 and info["fps"] == 16.0
    assert (info["width"], info["height"]) == (128, 64)
    assert info["bytes"] == path.stat().st_size and len(info["sha256"]) == 64


def test_video_writer_is_byte_identical_to_official_export(tmp_path):
    """Same frames through diffusers' export_to_video (the official path) -> same MP4 bytes."""
    export_utils = pytest.importorskip("diffusers.utils.export_utils")
    pixels = np.concatenate([_video_frames(13), _video_frames(16, offset=13)])
    x = (torch.from_numpy(pixels).float() / 127.5 - 1).permute(3, 0, 1, 2)[None].bfloat16()
    # Official: bf16 (x / 2 + 0.5).clamp(0, 1) -> float numpy [T, H, W, C] -> export_to_video.
    official = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).float().numpy()[0]
    export_utils.export_to_video(list(official), str(tmp_path / "official.mp4"), fps=16)

    u8 = frames_to_uint8(x)
    with VideoWriter(tmp_path / "ours.mp4") as w:
        w.append(u8[:13])
        w.append(u8[13:])
    assert (tmp_path / "ours.mp4").read_bytes() == (tmp_path / "official.mp4").read_bytes()


def test_video_writer_refuses_existing_without_overwrite(tmp_path):
    path = tmp_path / "exists.mp4"
    path.write_bytes(b"old")
    with pytest.raises(MediaExistsError, match=r"exists\.mp4.*--overwrite"):
        VideoWriter(path)
    assert path.read_bytes() == b"old"
    assert issubclass(MediaExistsError, MediaError) and issubclass(MediaExistsError, FileExistsError)

    with VideoWriter(path, overwrite=True) as w:
        w.append(_video_frames(3))
    assert read_video(path).shape == (3, 64, 128, 3)
    assert _hidden_leftovers(tmp_path) == []


def test_video_writer_exception_leaves_nothing(tmp_path):
    path = tmp_path / "boom.mp4"
    with pytest.raises(RuntimeError, match="rollout failed"):
        with VideoWriter(path) as w:
            w.append(_video_frames(5))
            (tmp,) = _hidden_leftovers(tmp_path)  # the temp file really exists mid-write
            assert tmp.startswith(f".boom.mp4.partial-{os.getpid()}-") and tmp.endswith(".mp4")
            raise RuntimeError("rollout failed")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_video_writer_no_clobber_if_target_appears_meanwhile(tmp_path):
    path = tmp_path / "race.mp4"
    with pytest.raises(MediaExistsError, match="appeared while encoding"):
        with VideoWriter(path) as w:
            w.append(_video_frames(2))
            path.write_bytes(b"someone else's file")
    assert path.read_bytes() == b"someone else's file"
    assert _hidden_leftovers(tmp_path) == []


def test_video_writer_keyboard_interrupt_keeps_old_file(tmp_path):
    path = tmp_path / "keep.mp4"
    path.write_bytes(b"previous result")
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(path, overwrite=True) as w:
            w.append(_video_frames(2))
            raise KeyboardInterrupt
    assert path.read_bytes() == b"previous result"
    assert _hidden_leftovers(tmp_path) == []


def test_video_writer_rejects_bad_frames(tmp_path):
    with pytest.raises(MediaError, match="multiple of 16"):
        with VideoWriter(tmp_path / "odd.mp4") as w:
            w.append(np.zeros((2, 60, 128, 3), np.uint8))
    with pytest.raises(MediaError, match="uint8"):
        with VideoWriter(tmp_path / "float.mp4") as w:
            w.append(np.zeros((2, 64, 128, 3), np.float32))
    with pytest.raises(MediaError, match="size changed"):
        with VideoWriter(tmp_path / "mixed.mp4") as w:
            w.append(np.zeros((1, 64, 128, 3), np.uint8))
            w.append(np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(MediaError, match="no frames"):
        with VideoWriter(tmp_path / "empty.mp4"):
            pass
    assert list(tmp_path.iterdir()) == []


# imageio-ffmpeg's reader leaves its pipes to the garbage collector once ffmpeg has exited.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning", "ignore::ResourceWarning")
def test_read_video_matches_imageio_and_rejects_non_video(tmp_path):
    import imageio_ffmpeg

    path = tmp_path / "v.mp4"
    with VideoWriter(path) as w:
        w.append(_video_frames(4))
    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    theirs = np.stack([np.frombuffer(b, np.uint8).reshape(64, 128, 3) for b in gen])
    gen.close()
    assert meta["size"] == (128, 64)
    assert np.array_equal(read_video(path), theirs)

    junk = tmp_path / "junk.mp4"
    junk.write_text("not a video")
    with pytest.raises(MediaError, match="junk.mp4"):
        read_video(junk)
    with pytest.raises(MediaError, match="junk.mp4"):
        video_info(junk)
    with pytest.raises(MediaError, match="does not exist"):
        video_info(tmp_path / "missing.mp4")


# ---------------------------------------------------------------------------- atomic text


def test_atomic_write_json_round_trip_and_failure_keeps_old(tmp_path):
    path = tmp_path / "stats.json"
    atomic_write_json(path, {"a": 1, "b": [1.5, "x"]})
    assert json.loads(path.read_text()) == {"a": 1, "b": [1.5, "x"]}
    before = path.read_bytes()

    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]


def test_atomic_write_text_replaces_and_cleans_up(tmp_path):
    path = tmp_path / "sub" / "log.txt"
    atomic_write_text(path, "one\n")
    atomic_write_text(path, "two\n")
    assert path.read_text() == "two\n"
    assert os.listdir(path.parent) == ["log.txt"]
