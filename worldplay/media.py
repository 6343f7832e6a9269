"""Image input, video output and small atomic-file helpers.

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
* :func:`atomic_write_text` / :func:`atomic_write_json` for stats files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import subprocess
import tempfile
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "MediaError",
    "MediaExistsError",
    "VideoWriter",
    "atomic_write_json",
    "atomic_write_text",
    "frames_to_uint8",
    "load_image",
    "read_video",
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


def _open_rgb(path: Path):
    """Open and fully decode an image as RGB, turning every failure into a MediaError."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise MediaError(f"input image {str(path)!r} does not exist; check the path passed as the image.")
    if not path.is_file():
        raise MediaError(f"input image {str(path)!r} is not a regular file; pass the path of an image file.")
    try:
        with Image.open(path) as img:
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
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports truncated or corrupt files as OSError (sometimes SyntaxError/ValueError).
        raise MediaError(
            f"input image {str(path)!r} could not be decoded ({exc}); the file may be truncated "
            "or corrupt, re-export or re-download it."
        ) from exc


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

    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise MediaError(f"target size must be positive integers, got width={width!r}, height={height!r}")
    path = Path(path)
    img = _open_rgb(path)
    orig_w, orig_h = img.size
    if orig_w < 1 or orig_h < 1:
        raise MediaError(f"input image {str(path)!r} is empty ({orig_w}x{orig_h}); use a real image.")

    new_size, box = _official_resize_geometry(orig_w, orig_h, width, height)
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


def _temp_sibling(path: Path, suffix: str = "") -> Path:
    """A unique hidden temp name next to ``path`` (same filesystem, so os.replace is atomic)."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _reserve(tmp: Path) -> int:
    """Create ``tmp`` exclusively (mode 0666 minus umask, like a normal file) and return its fd."""
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename; best effort because some filesystems refuse fsync on directories."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically: temp file in the same directory, fsync, os.replace.

    Readers see either the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    fd = _reserve(tmp)
    try:
        with os.fdopen(fd, "w", encoding=encoding) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Serialise ``obj`` to JSON and write it atomically (see :func:`atomic_write_text`).

    Serialisation happens before any file is touched, so an unencodable object leaves the
    existing file untouched and no temp file behind.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n"
    return atomic_write_text(path, text)


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
    known) writes to a hidden ``.<name>.partial-<pid>-<token><suffix>`` next to the target.
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
        if self.path.is_dir():
            raise MediaError(
                f"output path {str(self.path)!r} is a directory; pass a file name ending in .mp4"
            )
        if self.path.exists() and not overwrite:
            raise MediaExistsError(
                f"output video {str(self.path)!r} already exists; pass --overwrite to replace it "
                "or choose another output path."
            )

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
        tmp = _temp_sibling(self.path, suffix=self.path.suffix or ".mp4")
        os.close(_reserve(tmp))  # claim the name; ffmpeg (-y) then truncates and fills it
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
            _fsync_file(self._tmp)
            self._commit()
        except BaseException:
            self._discard()
            raise
        self._release()
        _fsync_dir(self.path.parent)
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        "sha256": _sha256(path),
    }
