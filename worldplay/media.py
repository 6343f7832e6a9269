"""Image input and video output.

Everything here mirrors the official HY-WorldPlay (WAN) pipeline bit for bit where that
matters for parity, and adds the safety the official code lacks:

* :func:`load_image` reproduces ``resize_center_crop_to_tensor`` (PIL, RGB, scale with
  ``int()`` truncation, LANCZOS, centre crop, ``x / 127.5 - 1``).
* :func:`frames_to_uint8` reproduces the decoder post-processing plus diffusers'
  ``export_to_video`` conversion: ``(x * 0.5 + 0.5).clamp(0, 1)`` in the decoder dtype
  (bf16), then ``float32 * 255`` and truncation to ``uint8``.
* :class:`VideoWriter` streams chunks into ffmpeg with the same encoder command line the
  official export produces (libx264, yuv420p, crf 25 from ``quality=5``, 16 fps), but writes
  to a hidden temporary file that only replaces the target on success.
* :func:`read_video` / :func:`video_info` read results back for tests and manifests.
* :func:`atomic_write_text` / :func:`atomic_write_json` are re-exported from :mod:`worldplay.files`.
* :func:`synthetic_image`: a seeded smooth test image (experiments, ``serve``'s synthetic sample).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

# atomic_write_*: re-exported, the stats writers' home until now
from .files import (
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    fsync_file,
    reserve_file,
    sha256_file,
    temp_sibling,
)

__all__ = [
    "MediaError",
    "MediaExistsError",
    "VideoWriter",
    "atomic_write_json",
    "atomic_write_text",
    "check_writable_output",
    "frames_to_uint8",
    "load_image",
    "read_video",
    "synthetic_image",
    "video_info",
]

PathLike = str | os.PathLike

# Official export settings (diffusers ``export_to_video(video, path, fps=16)`` -> imageio v2
# ffmpeg writer). ``quality=5`` becomes ``-crf 25`` for libx264 inside imageio-ffmpeg.
DEFAULT_FPS = 16
DEFAULT_QUALITY = 5
MACRO_BLOCK_SIZE = 16
CODEC = "libx264"
PIXEL_FORMAT = "yuv420p"


class MediaError(ValueError):
    """A user-facing problem with an input image or an output file."""


class MediaExistsError(MediaError, FileExistsError):
    """The output file already exists and overwriting was not requested."""


# --------------------------------------------------------------------------------------
# Image input
# --------------------------------------------------------------------------------------


def _official_resize_geometry(orig_w: int, orig_h: int, target_w: int, target_h: int):
    """Resized size and crop box exactly as the official code computes them.

    ``int()`` truncation is deliberate (HY truncates; FlashDreams rounds). Because of
    floating point, ``w * (target_w / w)`` can land just below ``target_w`` (e.g. w = 77),
    giving ``new_w = target_w - 1``; the crop box then starts at -1 and PIL pads one black
    column. We keep that quirk for parity and let the caller warn about it.
    """
    scale = max(target_w / orig_w, target_h / orig_h)
    new_w = int(orig_w * scale)
    new_h = int(orig_h * scale)
    left = (new_w - target_w) // 2
    top = (new_h - target_h) // 2
    return (new_w, new_h), (left, top, left + target_w, top + target_h)


def conditioning_geometry(path: PathLike, width: int, height: int) -> dict[str, object]:
    """How :func:`load_image` turns the image at ``path`` into the ``width`` x ``height`` frame the
    model receives: source size, scale, resized size and crop box (left, top, right, bottom in
    the resized image), and whether it was upscaled and/or cropped. Reads the header only."""
    from PIL import Image

    with Image.open(Path(path)) as img:
        orig_w, orig_h = img.size
    scale = max(width / orig_w, height / orig_h)
    new_size, box = _official_resize_geometry(orig_w, orig_h, width, height)
    return {"source_size": [orig_w, orig_h], "scale": round(scale, 6), "resized_size": list(new_size),
            "crop_box": list(box), "upscaled": scale > 1, "cropped": list(new_size) != [width, height]}


# PIL gives images of more than 8 bits per channel as 16-bit greyscale modes ("I;16", "I;16B",
# ... from PNG and TIFF) or as 32-bit "I" (16-bit PGM/PPM, which PIL widens to 0..65535, and
# 32-bit TIFF). convert("RGB") clips these to 255 instead of scaling, which turned 99.7 % of a
# 16-bit photo white. (16-bit RGB(A) PNGs need nothing: PIL itself reduces them to 8 bits,
# keeping each value's high byte.)
_SIXTEEN_BIT_MAX = 65535
# Formats whose "I" images hold 16-bit values (PNG: older Pillow opened 16-bit greyscale as "I").
_SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")


def _to_8_bit(img, path: Path):
    """A greyscale image of more than 8 bits as mode "L", scaled by its bit depth.

    16-bit values are reduced to their high byte, the same rule PIL applies to 16-bit RGB PNGs,
    so a 16-bit greyscale image and its RGB copy load alike. 32-bit integer and float images
    have no agreed range to scale from (a 32-bit TIFF may hold 0..255 or 0..2^32-1), so they
    are refused rather than guessed at.
    """
    from PIL import Image

    sixteen_bit = img.mode.startswith("I;16") or (img.mode == "I" and img.format in _SIXTEEN_BIT_I_FORMATS)
    if not sixteen_bit:
        kind = "32-bit float" if img.mode == "F" else f"32-bit integer ({img.format or 'unknown format'})"
        raise MediaError(
            f"input image {str(path)!r} is a {kind} image, whose value range is not defined; "
            "save it as an 8- or 16-bit PNG."
        )
    values = np.asarray(img)
    if values.size and (values.min() < 0 or values.max() > _SIXTEEN_BIT_MAX):
        raise MediaError(
            f"input image {str(path)!r} has values from {values.min()} to {values.max()}, outside the "
            "16-bit range of its format; save it as an 8- or 16-bit PNG."
        )
    return Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8))  # 2-D uint8: mode "L"


def _open_rgb(path: Path):
    """Open and fully decode an image as 8-bit RGB, turning every failure into a MediaError."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise MediaError(f"input image {str(path)!r} does not exist; check the path passed as the image.")
    if not path.is_file():
        raise MediaError(f"input image {str(path)!r} is not a regular file; pass the path of an image file.")
    try:
        with Image.open(path) as img:
            if img.mode == "F" or img.mode.startswith("I"):
                img.load()
                return _to_8_bit(img, path).convert("RGB")
            # convert() forces the full decode, so truncated/corrupt data fails here, inside
            # the try, rather than later in resize().
            return img.convert("RGB")
    except UnidentifiedImageError as exc:
        raise MediaError(
            f"input image {str(path)!r} is not a readable image (PIL cannot identify it); "
            "pass a PNG/JPEG/WebP image file."
        ) from exc
    except Image.DecompressionBombError as exc:
        raise MediaError(
            f"input image {str(path)!r} is too large to decode safely ({exc}); downscale it first."
        ) from exc
    except OSError as exc:
        if exc.errno is not None:  # the file system refused (permissions, I/O error), not PIL
            raise MediaError(f"cannot read input image {str(path)!r}: {exc.strerror}") from exc
        raise _undecodable(path, exc) from exc
    except (SyntaxError, ValueError) as exc:
        raise _undecodable(path, exc) from exc


def _undecodable(path: Path, exc: Exception) -> MediaError:
    # PIL reports truncated or corrupt files as OSError without an errno (sometimes as
    # SyntaxError/ValueError).
    return MediaError(
        f"input image {str(path)!r} could not be decoded ({exc}); the file may be truncated "
        "or corrupt, re-export or re-download it."
    )


#: How much larger than the crop the resized image may be. The official rule scales the image
#: to cover the target and then crops, so the excess is the mismatch of the aspect ratios:
#: 16x still takes a 29:1 panorama into 1280x704. Without a bound, an 86-byte 2000x1 PNG
#: resized to 1408000x704 before its 1280x704 crop and took 4.2 GB; PIL's decompression-bomb
#: guard counts only the source pixels.
MAX_RESIZE_EXCESS = 16


def load_image(path: PathLike, width: int, height: int) -> torch.Tensor:
    """Load the conditioning image exactly like the official ``resize_center_crop_to_tensor``.

    Steps: PIL open -> RGB -> scale by ``max(width / w, height / h)`` to
    ``(int(w * scale), int(h * scale))`` with LANCZOS -> centre crop with
    ``(new - target) // 2`` offsets -> float32 ``x / 127.5 - 1``.
    No EXIF orientation is applied (the official code does not either).

    Returns a ``[3, height, width]`` float32 tensor in [-1, 1]; the caller casts it to the
    VAE dtype and adds batch/time axes.
    """
    from PIL import Image

    if not all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in (width, height)):
        raise MediaError(f"target size must be positive integers, got width={width!r}, height={height!r}")
    path = Path(path)
    img = _open_rgb(path)
    orig_w, orig_h = img.size
    if orig_w < 1 or orig_h < 1:
        raise MediaError(f"input image {str(path)!r} is empty ({orig_w}x{orig_h}); use a real image.")

    new_size, box = _official_resize_geometry(orig_w, orig_h, width, height)
    limit = MAX_RESIZE_EXCESS * width * height
    if new_size[0] * new_size[1] > limit:
        # Checked on the geometry, before resize() allocates anything.
        raise MediaError(
            f"input image {str(path)!r} is {orig_w}x{orig_h}: covering {width}x{height} would resize it to "
            f"{new_size[0]}x{new_size[1]}, more than {MAX_RESIZE_EXCESS}x the pixels of the crop; its aspect "
            f"ratio is too far from {width}:{height}, so crop it closer to that first."
        )
    if new_size[0] < width or new_size[1] < height:
        # Official behaviour (float truncation) -- kept for parity, but worth knowing.
        warnings.warn(
            f"{str(path)!r}: {orig_w}x{orig_h} resizes to {new_size[0]}x{new_size[1]} under the "
            f"official truncating rule, so the {width}x{height} crop gets a 1-px black border "
            "(same as the official code).",
            stacklevel=2,
        )
    img = img.resize(new_size, Image.LANCZOS).crop(box)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # [H, W, 3]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


# --------------------------------------------------------------------------------------
# Decoder output -> uint8
# --------------------------------------------------------------------------------------


def synthetic_image(path: Path, height: int, width: int, seed: int) -> Path:
    """A deterministic smooth colour image (seeded random Fourier pattern) saved as PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    img = np.zeros((height, width, 3))
    for c in range(3):
        for _ in range(4):
            fy, fx = rng.uniform(0.5, 4.0, size=2)
            phase = rng.uniform(0, 2 * np.pi)
            img[..., c] += np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
    img = (img - img.min()) / (img.max() - img.min() + 1e-12)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img * 255).round().astype(np.uint8)).save(path, format="PNG")
    return path


def frames_to_uint8(frames: torch.Tensor, *, check_finite: bool = True) -> torch.Tensor:
    """Convert decoder output in [-1, 1] to ``uint8 [T, H, W, 3]`` with the official rounding.

    Accepts ``[1, 3, T, H, W]`` or ``[3, T, H, W]``. The affine map and clamp run in the
    input dtype (bf16 in practice, as in the official pipeline), the result is widened to
    float32, multiplied by 255 and *truncated* (diffusers ``(frame * 255).astype(uint8)``).
    Runs on whatever device ``frames`` lives on; move the result to CPU for writing.
    """
    if frames.dim() == 5:
        if frames.shape[0] != 1:
            raise MediaError(f"frames_to_uint8 expects batch size 1, got shape {tuple(frames.shape)}")
        frames = frames[0]
    if frames.dim() != 4 or frames.shape[0] != 3:
        raise MediaError(
            f"frames_to_uint8 expects [1, 3, T, H, W] or [3, T, H, W], got {tuple(frames.shape)}"
        )
    if not frames.is_floating_point():
        raise MediaError(f"frames_to_uint8 expects a floating tensor in [-1, 1], got {frames.dtype}")
    if check_finite and not bool(torch.isfinite(frames).all()):
        # NaN -> uint8 is undefined behaviour; a NaN here means the decoder broke, so say so.
        raise MediaError("decoded frames contain NaN/Inf; the model or VAE produced invalid output")

    unit = (frames * 0.5 + 0.5).clamp(0, 1)  # stays in the decoder dtype on purpose
    # float -> uint8 casts truncate toward zero, matching numpy's astype(np.uint8).
    scaled = unit.float() * 255
    return scaled.to(torch.uint8).permute(1, 2, 3, 0).contiguous()


# --------------------------------------------------------------------------------------
# Atomic file plumbing
# --------------------------------------------------------------------------------------


def check_writable_output(path: PathLike, *, overwrite: bool, what: str = "output") -> Path:
    """Refuse now, before any work, an output that could not be written at the end: a directory,
    an existing file without ``overwrite``, or a folder that is not a folder or not writable
    (tried by creating and dropping an unnamed file there). Missing folders are created later."""
    path = Path(path)
    if path.is_dir():
        raise MediaError(f"cannot write {what} {str(path)!r}: it is a directory; pass a file name")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise MediaExistsError(
            f"{what} {str(path)!r} already exists; pass --overwrite to replace it or choose another output path."
        )
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise MediaError(f"cannot write {what} {str(path)!r}: {str(folder)!r} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise MediaError(f"cannot write {what} {str(path)!r}: {exc.strerror or exc}") from None
    return path


# --------------------------------------------------------------------------------------
# Video output
# --------------------------------------------------------------------------------------


def _ffmpeg_write_command(
    exe: str, tmp: Path, width: int, height: int, fps: float, quality: float
) -> list[str]:
    """The encoder command imageio-ffmpeg builds for the official export, for our sizes.

    Mirrors ``imageio_ffmpeg.write_frames`` (what diffusers' ``export_to_video`` ends up
    calling): raw rgb24 on stdin -> libx264, yuv420p, variable bit-rate
    ``crf = int((1 - quality / 10) * 51)`` (quality 5 -> crf 25). Verified byte-identical
    to the official export by tests/test_media.py.
    """
    rate = str(Fraction(fps).limit_denominator())
    crf = int((1 - quality / 10.0) * 51)
    return [
        exe, "-y",
        "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}",
        "-pix_fmt", "rgb24", "-r", rate, "-i", "-", "-an",
        "-vcodec", CODEC, "-pix_fmt", PIXEL_FORMAT, "-crf", str(crf),
        "-v", "error",
        str(tmp),
    ]  # fmt: skip


def _popen_isolated(cmd: list[str], stderr) -> subprocess.Popen:
    """Start ffmpeg in its own process group so Ctrl-C reaches only Python.

    We then decide what happens to the encoder (kill and delete the partial file) instead
    of ffmpeg dying on SIGINT at an arbitrary point.
    """
    kwargs: dict[str, Any] = {}
    if os.name == "posix":
        kwargs["start_new_session"] = True
    else:  # pragma: no cover - Windows
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr, **kwargs)


def _as_uint8_frames(frames) -> np.ndarray:
    """Validate one chunk and return it as a C-contiguous ``uint8 [T, H, W, 3]`` array."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]  # a single [H, W, 3] frame
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise MediaError(f"VideoWriter.append expects uint8 [T, H, W, 3] frames, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        # Refuse silently-wrong conversions: floats must go through frames_to_uint8 first.
        raise MediaError(
            f"VideoWriter.append expects uint8 frames, got {frames.dtype}; convert with frames_to_uint8()"
        )
    return np.ascontiguousarray(frames)


class VideoWriter:
    """Streaming, atomic MP4 writer with the official export settings.

    Usage::

        with VideoWriter(path, fps=16, overwrite=False) as w:
            for chunk in rollout:                # uint8 [T, H, W, 3] per chunk
                w.append(chunk)

    ffmpeg (imageio-ffmpeg's binary, started on the first ``append`` once the frame size is
    known) writes to a hidden ``.<name>.partial-<pid>-t<start>-h<host>-<token><suffix>`` next
    to the target (the owner tag of :mod:`worldplay.leftovers`).
    A clean exit from the ``with`` block waits for ffmpeg, checks its exit status and moves
    the file onto ``path``; any exception (KeyboardInterrupt included) kills ffmpeg and
    deletes the temp file, so ``path`` never holds a half-written video. Frame sides must
    be multiples of 16: the official export uses ``macro_block_size=16`` and we refuse
    rather than let ffmpeg rescale.
    """

    def __init__(
        self,
        path: PathLike,
        fps: float = DEFAULT_FPS,
        *,
        overwrite: bool = False,
        quality: float = DEFAULT_QUALITY,
    ) -> None:
        self.path = Path(path)
        self.fps = fps
        self.quality = quality
        self.overwrite = overwrite
        self.frames_written = 0
        self.size: tuple[int, int] | None = None  # (width, height), fixed by the first chunk
        self._tmp: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._stderr = None  # anonymous temp file collecting ffmpeg's messages
        self._closed = False
        if not 1 <= quality <= 10:
            raise MediaError(f"quality must be in [1, 10] (imageio scale), got {quality!r}")
        # Checked here, before any encoding work, so a long rollout cannot end in a refusal.
        check_writable_output(self.path, overwrite=overwrite, what="output video")

    # -- context manager ---------------------------------------------------------------

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- writing -----------------------------------------------------------------------

    def append(self, frames) -> None:
        """Encode one chunk of ``uint8 [T, H, W, 3]`` frames (numpy or CPU torch)."""
        if self._closed:
            raise MediaError(f"VideoWriter for {str(self.path)!r} is already closed")
        frames = _as_uint8_frames(frames)
        if frames.shape[0] == 0:
            return
        height, width = frames.shape[1:3]
        if self._proc is None:
            self._start(width, height)
        elif (width, height) != self.size:
            raise MediaError(
                f"frame size changed mid-video for {str(self.path)!r}: started at "
                f"{self.size[0]}x{self.size[1]}, got {width}x{height}"
            )
        try:
            # One pipe write per chunk; the array's buffer goes to ffmpeg without a copy.
            self._proc.stdin.write(frames)
        except OSError as exc:  # BrokenPipeError: ffmpeg exited early
            self._proc.wait()
            raise MediaError(
                f"ffmpeg stopped while writing {str(self.path)!r} ({exc}): {self._ffmpeg_messages()}"
            ) from exc
        self.frames_written += frames.shape[0]

    def _start(self, width: int, height: int) -> None:
        import imageio_ffmpeg

        if width % MACRO_BLOCK_SIZE or height % MACRO_BLOCK_SIZE:
            raise MediaError(
                f"frame size {width}x{height} for {str(self.path)!r} is not a multiple of "
                f"{MACRO_BLOCK_SIZE}; the official export would rescale it, so use a width and "
                f"height divisible by {MACRO_BLOCK_SIZE}."
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Keep the real suffix so ffmpeg picks the same container as for the final name.
        tmp = temp_sibling(self.path, suffix=self.path.suffix or ".mp4")
        os.close(reserve_file(tmp))  # claim the name; ffmpeg (-y) then truncates and fills it
        self._tmp = tmp
        self.size = (width, height)
        cmd = _ffmpeg_write_command(
            imageio_ffmpeg.get_ffmpeg_exe(), tmp, width, height, self.fps, self.quality
        )
        # A file, not a pipe, for stderr: a pipe nobody drains could fill up and stall ffmpeg.
        self._stderr = tempfile.TemporaryFile()
        self._proc = _popen_isolated(cmd, self._stderr)

    def _ffmpeg_messages(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", "replace").strip()
        return text[-2000:] or "(no message from ffmpeg)"

    # -- finishing ---------------------------------------------------------------------

    def close(self) -> Path:
        """Finish encoding and atomically move the video onto ``path``. Returns ``path``."""
        if self._closed:
            return self.path
        self._closed = True
        if self._proc is None:
            raise MediaError(
                f"no frames were written to {str(self.path)!r}; refusing to create an empty video"
            )
        try:
            self._proc.stdin.close()  # EOF: ffmpeg flushes the encoder and writes the moov atom
            rc = self._proc.wait()
            if rc != 0:
                raise MediaError(
                    f"ffmpeg failed (exit {rc}) writing {str(self.path)!r}: {self._ffmpeg_messages()}"
                )
            fsync_file(self._tmp)
            self._commit()
        except BaseException:
            self._discard()
            raise
        self._release()
        fsync_dir(self.path.parent)
        return self.path

    def _commit(self) -> None:
        if self.overwrite:
            os.replace(self._tmp, self.path)
            self._tmp = None
            return
        # Without overwrite, a hard link is an atomic "create only if absent": it closes
        # the window in which another process could have created the target meanwhile.
        try:
            os.link(self._tmp, self.path)
        except FileExistsError as exc:
            raise MediaExistsError(
                f"output video {str(self.path)!r} appeared while encoding; pass --overwrite to replace it"
            ) from exc
        except OSError:
            # Filesystems without hard links: check-then-replace (tiny race, best effort).
            if self.path.exists():
                raise MediaExistsError(
                    f"output video {str(self.path)!r} appeared while encoding; pass --overwrite to replace it"
                ) from None
            os.replace(self._tmp, self.path)
            self._tmp = None
            return
        self._tmp.unlink()
        self._tmp = None

    def abort(self) -> None:
        """Stop ffmpeg without finishing the file and delete the temp file."""
        self._closed = True
        self._discard()

    def _discard(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()  # don't spend time finishing a video nobody will keep
        self._release()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def _release(self) -> None:
        """Reap ffmpeg and close our ends of its pipes/files."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):  # flushing into a dead pipe
                proc.stdin.close()
            proc.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


# --------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------

# ", 128x64," / ", 1280x704 [SAR 1:1 ...]" in ffmpeg's stream line; the leading ", " keeps
# codec tags such as "0x31637661" from matching.
_SIZE_RE = re.compile(r", (\d+)x(\d+)\b")
_FPS_RE = re.compile(r", ([\d.]+) fps")


def _run_ffmpeg(path: Path, output_args: list[str], what: str) -> tuple[bytes, str]:
    """Run imageio-ffmpeg's binary on ``path``; return (stdout, stderr) or raise MediaError."""
    import imageio_ffmpeg

    if not path.is_file():
        raise MediaError(f"video {str(path)!r} does not exist or is not a file")
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path), *output_args]
    # communicate() drains both pipes, so a chatty stderr cannot deadlock a large stdout.
    proc = subprocess.run(cmd, capture_output=True, check=False)
    log = proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise MediaError(f"could not {what} video {str(path)!r}: {log.strip()[-1500:]}")
    return proc.stdout, log


def _video_stream_line(log: str, section: str) -> str:
    """The first ``Video:`` stream line after the ``Input #0`` / ``Output #0`` header."""
    start = log.find(section)
    for line in log[start if start >= 0 else 0 :].splitlines():
        if "Stream #" in line and "Video:" in line:
            return line
    raise MediaError(f"ffmpeg reported no video stream ({section})")


def _size_and_fps(line: str) -> tuple[int, int, float | None]:
    size = _SIZE_RE.search(line)
    if size is None:
        raise MediaError(f"cannot parse the frame size from ffmpeg's stream line: {line.strip()!r}")
    fps = _FPS_RE.search(line)
    return int(size.group(1)), int(size.group(2)), float(fps.group(1)) if fps else None


def read_video(path: PathLike) -> np.ndarray:
    """Decode a whole video to ``uint8 [T, H, W, 3]`` RGB (for tests and analysis).

    Holds every frame in memory (125 frames of 1280x704 is about 340 MB).
    """
    path = Path(path)
    raw, log = _run_ffmpeg(path, ["-map", "0:v:0", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], "decode")
    # The output stream line carries the size after any automatic rotation.
    width, height, _ = _size_and_fps(_video_stream_line(log, "Output #0"))
    frame_bytes = width * height * 3
    if len(raw) % frame_bytes:
        raise MediaError(f"decoded data of {str(path)!r} is not a whole number of {width}x{height} frames")
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, height, width, 3).copy()


def video_info(path: PathLike) -> dict[str, Any]:
    """Facts about a written video for manifests: frames, fps, width, height, bytes, sha256.

    The frame count comes from ``imageio_ffmpeg.count_frames_and_secs`` (ffmpeg copies
    the stream to a null muxer: no decode), which is exact for the constant-frame-rate MP4s
    written here and robust across ffmpeg versions.
    """
    import imageio_ffmpeg

    path = Path(path)
    _, log = _run_ffmpeg(path, ["-map", "0:v:0", "-c", "copy", "-f", "null", "-"], "probe")
    width, height, fps = _size_and_fps(_video_stream_line(log, "Input #0"))
    try:
        frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except (RuntimeError, OSError) as exc:
        raise MediaError(f"ffmpeg could not count the frames of {str(path)!r}: {exc}") from exc
    return {
        "frames": int(frames),
        "fps": fps,
        "width": width,
        "height": height,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }
