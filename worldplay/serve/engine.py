"""The model side of the server: one warm :class:`~worldplay.session.WorldSession` per device.

Everything here runs in the server's single model thread (one generation in flight; the event
loop never waits on model work). The session is made once and then reset in place for every new
world, so compiled blocks and CUDA graphs survive from one player to the next (the first world
after start-up pays for the compiles with the fastest settings).
"""

from __future__ import annotations

import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..actions import Motion
from ..media import MediaError, load_image
from ..rollout import ChunkOutput, RolloutSettings, WorldPlayPipeline

SYNTHETIC = "synthetic"
MAX_UPLOADS_KEPT = 4  # uploaded images held (decoded) until a world starts from one


class EngineError(ValueError):
    """A request the engine cannot serve (unknown sample, bad upload); one line for the page."""


class Engine:
    """Loads images and prompts and steps the one session of this device.

    ``text_for(prompt)``: prompt embeddings ``[1, L, text_dim]`` (seeded random ones for random
    weights). ``samples``: name -> a callable giving the image file (resolved when chosen, so an
    unreachable one costs nothing until then). ``max_chunks``: the length of a world before it
    has to start over (the history grows with it: ~0.34 MB per latent at 704x1280).
    ``third_person``: the keys' actions labelled as the official third-person mode."""

    def __init__(self, pipe: WorldPlayPipeline, settings: RolloutSettings, size: tuple[int, int],
                 text_for: Callable[[str], torch.Tensor], *, samples: dict[str, Callable[[], Path]] | None = None,
                 max_chunks: int = 900, seed: int = 0, random_weights: bool = False, third_person: bool = False):
        self.pipe = pipe
        self.settings = settings
        self.size = size  # (height, width)
        self.text_for = text_for
        self.samples = {SYNTHETIC: self._synthetic, **(samples or {})}
        self.max_chunks = max_chunks
        self.seed = seed
        self.random_weights = random_weights  # the page says that the prompt means nothing then
        self.third_person = third_person  # keys labelled as the official tps=True mode
        self.session = None
        self.steps = 0  # chunks generated since start-up (tests and logs)
        self._uploads: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._uploads_lock = threading.Lock()  # uploads arrive in their own thread
        self._scratch = tempfile.TemporaryDirectory(prefix="worldplay-serve-")

    # -- images ------------------------------------------------------------------------------

    def _synthetic(self) -> Path:
        from ..media import synthetic_image

        height, width = self.size
        path = Path(self._scratch.name) / f"synthetic-{self.seed}-{height}x{width}.png"
        return path if path.is_file() else synthetic_image(path, height, width, self.seed)

    def sample_image(self, name: str) -> torch.Tensor:
        if name not in self.samples:
            raise EngineError(f"no sample image {name!r}; choose one of {', '.join(self.samples)}")
        try:
            path = self.samples[name]()
        except (OSError, ValueError) as exc:  # an input that cannot be resolved (offline, bad digest)
            raise EngineError(f"sample {name!r} is not available: {str(exc).splitlines()[0]}") from None
        return self._load(path, f"sample {name!r}")

    def add_upload(self, ident: str, data: bytes) -> tuple[int, int]:
        """Decode an uploaded image exactly as the CLI loads ``--image`` (same checks and limits);
        keep it under ``ident``. Returns the original size (width, height)."""
        path = Path(self._scratch.name) / f"upload-{ident}"
        try:
            path.write_bytes(data)
            image = self._load(path, "the uploaded image")
        finally:
            path.unlink(missing_ok=True)
        with self._uploads_lock:
            self._uploads[ident] = image
            while len(self._uploads) > MAX_UPLOADS_KEPT:
                self._uploads.popitem(last=False)
        return image.shape[-1], image.shape[-2]

    def upload_image(self, ident: str) -> torch.Tensor:
        with self._uploads_lock:
            image = self._uploads.get(ident)
        if image is None:
            raise EngineError("that upload is no longer kept (the server keeps the last few); upload it again")
        return image

    def _load(self, path: Path, what: str) -> torch.Tensor:
        height, width = self.size
        try:
            return load_image(path, width, height)
        except MediaError as exc:
            # The message names the server's temporary path; the player knows the file as `what`.
            raise EngineError(str(exc).replace(repr(str(path)), what).splitlines()[0]) from None

    # -- the world ---------------------------------------------------------------------------

    def begin(self, image: torch.Tensor, prompt: str) -> None:
        """A new world from ``image`` and ``prompt``, in the warm session when there is one."""
        text = self.text_for(prompt)
        if self.session is None:
            self.session = self.pipe.session(image, text, self.settings, third_person=self.third_person)
        else:
            self.session.reset(image, text)

    def restart(self) -> None:
        self.session.reset()

    @property
    def chunk(self) -> int:
        return 0 if self.session is None else self.session.chunk

    def step(self, motion: Motion) -> tuple[ChunkOutput, np.ndarray]:
        """The next chunk for ``motion``, and the camera-to-world poses of its 4 latents."""
        out = self.session.step(motion)
        self.steps += 1
        return out, self.session.last_poses.c2w

    def close(self) -> None:
        if self.session is not None:
            self.session.finish()
        self._scratch.cleanup()
