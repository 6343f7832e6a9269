"""The text side: prompt cleaning, the umT5-XXL encoder, and an on-disk embedding cache.

The WAN-5B DiT is conditioned on umT5-XXL *encoder* states (``[1, 512, 4096]``). The procedure
is the official one (HY ``_get_t5_prompt_embeds``):

1. clean the prompt (:func:`clean_prompt`);
2. tokenise with ``padding="max_length"``, ``truncation=True``, ``add_special_tokens=True``
   (so ``</s>`` is appended), ``max_length=512``;
3. run the encoder with ids and attention mask;
4. keep the first ``seq_len = mask.sum()`` rows and replace the rest by *exact zeros* (not the
   encoder's outputs at the padded positions);
5. cast to the DiT dtype.

Classifier-free guidance is off in the distilled model, so no negative prompt is ever encoded.

The encoder weighs 11.4 GB and its output depends only on (cleaned prompt, tokenizer, weights,
dtypes, max length), so :func:`prompt_embeddings` computes each embedding once and keeps it in a
:class:`PromptEmbeddingCache` on disk. A cache hit never imports ``transformers`` nor touches the
encoder weights; that is how benchmarks run.

Only :func:`clean_prompt` needs ``ftfy`` and only :class:`TextEncoder` needs ``transformers``;
both are imported lazily so that the cache can be read in an environment without them (``ftfy``
is still needed there, because the cache key is computed over the *cleaned* prompt).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import html
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from ..constants import DEFAULT_PROMPT  # re-exported: the prompt the encoder is tested with
from ..files import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT",
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_PROMPT",
    "EncoderLayout",
    "PromptEmbeddingCache",
    "PromptEmbeddingCacheMiss",
    "TextEncoder",
    "clean_prompt",
    "encoder_identity_from_dir",
    "prompt_embeddings",
    "resolve_encoder_layout",
]


# The official pipeline's ``__call__`` default (the 226 of its helper methods is never used).
DEFAULT_MAX_LENGTH = 512

# Versions the on-disk format and the fixed tokenizer options (padding, truncation, special
# tokens, zeroed padding rows). Part of every cache key: change it when any of these change.
CACHE_FORMAT = "worldplay-text-embedding-v1"

# The official code collapses ``\s+`` with the third-party ``regex`` module, whose ``\s`` is the
# Unicode White_Space property. The standard ``re`` module's ``\s`` additionally matches the
# four information separators U+001C..U+001F; excluding them reproduces ``regex`` exactly
# without the extra dependency (ftfy already deletes those characters, so this is belt and braces).
_WHITESPACE_RUN = re.compile(r"[^\S\x1c-\x1f]+")

# Files that tell a tokenizer directory apart from anything else.
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")

# Weight files are left out of the encoder identity (see :func:`encoder_identity_from_dir`).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")

_KEY_PATTERN = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------------------------
# Prompt cleaning
# --------------------------------------------------------------------------------------------


def clean_prompt(text: str) -> str:
    """Clean a prompt exactly like the official pipeline (``prompt_clean``).

    ``ftfy.fix_text`` (mojibake, control characters, ...), HTML-unescape twice, strip, collapse
    every whitespace run to a single space, strip again.

    Not idempotent (a doubly escaped entity loses one level of escaping per application), so
    clean a raw prompt exactly once.

    Raises:
        ImportError: ftfy is not installed; the official code has no fallback, and cleaning
            without it would silently change the tokens of some prompts.
    """
    require_text_extra("ftfy")
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip()


# The packages of the ``text`` extra (pip install 'worldplay[text]'): what real weights need to
# clean and encode a prompt. One list, so the error and pyproject's extra cannot drift apart.
TEXT_EXTRA = ("transformers", "sentencepiece", "ftfy")
TEXT_EXTRA_INSTALL = "pip install 'worldplay[text]'"


class TextExtraMissing(ImportError):
    """A package of the ``text`` extra is not installed; the message names the install command."""


def require_text_extra(*packages: str) -> None:
    """Raise :class:`~worldplay.nn.text.TextExtraMissing` naming every missing package of ``packages`` (default: the
    whole extra) and the one command that installs them all."""
    import importlib.util

    wanted = packages or TEXT_EXTRA
    missing = []
    for name in wanted:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):  # a module set to None in sys.modules, or without a spec
            missing.append(name)
    if missing:
        raise TextExtraMissing(
            f"prompts of real weights need {', '.join(missing)} (not installed); "
            f"install the text extra: {TEXT_EXTRA_INSTALL}"
        )


# --------------------------------------------------------------------------------------------
# Locating the tokenizer and encoder files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderLayout:
    """Where the tokenizer files and the encoder (config + weights) of one encoder live."""

    tokenizer_dir: Path
    encoder_dir: Path


def resolve_encoder_layout(path: str | os.PathLike[str]) -> EncoderLayout:
    """Find the tokenizer and encoder directories under ``path``.

    Accepts either a Wan diffusers-layout snapshot (``tokenizer/`` and ``text_encoder/``
    subfolders, e.g. ``Wan-AI/Wan2.2-TI2V-5B-Diffusers``) or a directory that directly holds
    both a tokenizer and an encoder ``config.json``.

    Raises:
        FileNotFoundError: neither layout is present. Only local directories are accepted: a
            Hub repo id is never resolved or downloaded here.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Text-encoder directory {str(root)!r} does not exist (a local directory is required; "
            "Hub downloads are done separately with a pinned revision)."
        )
    wan_tokenizer, wan_encoder = root / "tokenizer", root / "text_encoder"
    if wan_tokenizer.is_dir() and wan_encoder.is_dir():
        return EncoderLayout(tokenizer_dir=wan_tokenizer, encoder_dir=wan_encoder)
    if (root / "config.json").is_file() and any((root / name).is_file() for name in _TOKENIZER_FILES):
        return EncoderLayout(tokenizer_dir=root, encoder_dir=root)
    raise FileNotFoundError(
        f"{str(root)!r} holds neither 'tokenizer/' + 'text_encoder/' subfolders (Wan diffusers layout) "
        f"nor a tokenizer ({', '.join(_TOKENIZER_FILES)}) next to an encoder config.json."
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_identity_file(path: Path) -> bool:
    name = path.name
    return (
        path.is_file()
        and not name.startswith(".")
        and not name.lower().endswith((".md", ".lock"))
        and not name.endswith(_WEIGHT_SUFFIXES)
    )


def encoder_identity_from_dir(path: str | os.PathLike[str]) -> str:
    """A digest naming the tokenizer + encoder in ``path``, for cache keys.

    Hashes the content of every small file of the tokenizer and encoder directories
    (tokenizer.json, spiece.model, tokenizer_config.json, special_tokens_map.json, the encoder
    config.json and the shard index ``*.index.json``, ...), keyed by file name so that the Wan
    layout and a flat directory with the same files give the same identity.

    The weight shards themselves (11.4 GB for umT5-XXL) are deliberately **not** read or even
    looked at: hashing them would take minutes, and leaving them out means the identity can be
    computed on a machine that holds only the ~21 MB of config and tokenizer files (enough to
    look an embedding up without the weights). The weights are therefore identified only
    through their config and shard index; pin the Hub revision when downloading, or pass an
    explicit ``encoder_identity`` (e.g. ``"Wan-AI/Wan2.2-TI2V-5B-Diffusers@<commit>"``) where
    that is not enough.
    """
    layout = resolve_encoder_layout(path)
    entries: set[tuple[str, str]] = set()
    for directory in {layout.tokenizer_dir, layout.encoder_dir}:
        for file in sorted(directory.iterdir()):
            if _is_identity_file(file):
                entries.add((file.name, _file_sha256(file)))
    digest = hashlib.sha256()
    for name, file_digest in sorted(entries):
        digest.update(f"{name}\0{file_digest}\n".encode())
    return f"files-sha256:{digest.hexdigest()}"


# --------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------


def _load_tokenizer(tokenizer_dir: Path) -> Any:
    """Load the tokenizer from local files only.

    When a ``tokenizer.json`` exists it is loaded *verbatim* with the generic fast-tokenizer
    class. That is what the official stack (transformers 4.56, ``T5TokenizerFast``) ran. In
    transformers 5 ``AutoTokenizer`` maps ``tokenizer_class: T5Tokenizer`` to a class that
    *rebuilds* the pipeline from the vocabulary (new pre-tokenizer, no byte fallback, only the
    precompiled normaliser kept, extra-id handling from its own defaults), which may tokenise
    some prompts differently from the file. Without a ``tokenizer.json`` (e.g. only
    ``spiece.model``) ``AutoTokenizer`` is the only option.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir), local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(
            f"Tokenizer in {str(tokenizer_dir)!r} defines no pad or eos token; a T5/umT5 tokenizer "
            "(with <pad> and </s>) is required."
        )
    return tokenizer


class TextEncoder:
    """The umT5 encoder (``transformers.UMT5EncoderModel``) with its tokenizer.

    Build it with :meth:`from_pretrained`; call :meth:`encode`; call :meth:`close` (or use it
    as a context manager) to release the weights as soon as the embedding is computed.
    """

    def __init__(self, tokenizer: Any, model: torch.nn.Module) -> None:
        self.tokenizer = tokenizer
        self.model: torch.nn.Module | None = model

    @classmethod
    def from_pretrained(
        cls,
        path_or_dir: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
    ) -> TextEncoder:
        """Load tokenizer and encoder from a local directory (see :func:`resolve_encoder_layout`).

        ``dtype`` is the dtype the encoder *computes* in. The official run uses bf16 (the
        pipeline is loaded with ``torch_dtype=bfloat16``). Nothing is ever downloaded
        (``local_files_only=True``).
        """
        from transformers import UMT5EncoderModel

        layout = resolve_encoder_layout(path_or_dir)
        started = time.perf_counter()
        tokenizer = _load_tokenizer(layout.tokenizer_dir)
        model = UMT5EncoderModel.from_pretrained(str(layout.encoder_dir), dtype=dtype, local_files_only=True)
        if model.config.model_type != "umt5":
            raise ValueError(
                f"{str(layout.encoder_dir)!r} holds a {model.config.model_type!r} model, expected 'umt5'."
            )
        model.eval().requires_grad_(False).to(device)
        logger.info(
            "Loaded text encoder from %s (%s, %s on %s) in %.1f s",
            path_or_dir,
            type(tokenizer).__name__,
            dtype,
            device,
            time.perf_counter() - started,
        )
        return cls(tokenizer, model)

    def _require_model(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError("TextEncoder was closed; load it again with TextEncoder.from_pretrained.")
        return self.model

    @property
    def device(self) -> torch.device:
        return next(self._require_model().parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self._require_model().parameters()).dtype

    def encode(
        self, prompt: str, *, max_length: int = DEFAULT_MAX_LENGTH, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, int]:
        """Clean and encode one raw prompt; see :meth:`encode_cleaned` for the result."""
        return self.encode_cleaned(clean_prompt(prompt), max_length=max_length, dtype=dtype)

    @torch.no_grad()
    def encode_cleaned(
        self, text: str, *, max_length: int = DEFAULT_MAX_LENGTH, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, int]:
        """Encode one already-cleaned prompt.

        Returns:
            ``(embeddings, seq_len)``: ``embeddings`` is ``[1, max_length, d_model]`` in ``dtype``
            (default: the encoder's dtype) on the encoder's device, with rows ``seq_len:``
            exactly zero; ``seq_len`` counts the real tokens including ``</s>`` (at most
            ``max_length``: longer prompts are truncated, keeping ``</s>``).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects one prompt string (batch size 1), got {type(text).__name__}")
        model = self._require_model()
        tokens = self.tokenizer(
            [text],
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        seq_len = int(mask.gt(0).sum())
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        # The encoder's outputs at padded positions are not zero; the DiT was trained on
        # embeddings whose padding rows are exact zeros, so build the result from zeros.
        embeddings = torch.zeros_like(hidden, dtype=dtype or hidden.dtype)
        embeddings[:, :seq_len] = hidden[:, :seq_len]
        return embeddings, seq_len

    def close(self) -> None:
        """Drop the weights and return their memory (GPU memory included) right away."""
        if self.model is None:
            return
        on_cuda = self.device.type == "cuda"
        self.model = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    def __enter__(self) -> TextEncoder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# The on-disk cache
# --------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_sha256(tensor: torch.Tensor) -> str:
    # Byte view so that every dtype (bf16 included, which numpy lacks) hashes the same way.
    raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


class _CorruptEntry(ValueError):
    """A cache file that exists but cannot be trusted."""


class PromptEmbeddingCacheMiss(LookupError):
    """No cached embedding for a prompt, and no encoder to compute it."""


class PromptEmbeddingCache:
    """Prompt embeddings on disk, one safetensors file per key.

    Each ``<key>.safetensors`` holds ``embeddings`` (``[1, max_length, d_model]``) and
    ``seq_len`` (0-dim int64), and in its metadata the prompt, encoder identity, dtypes,
    max length, creation time and a sha256 of the embedding bytes.

    Writes are atomic: the file is written to a hidden temporary file in the same directory,
    fsynced, then renamed over the final name, so readers see either nothing or a complete
    file. A writer killed hard (SIGKILL, power loss) can leave a ``.<key>.safetensors.*.tmp``
    file behind; it is never read.

    Corrupt entries: a file that fails to parse or to validate (truncated, wrong shape or dtype,
    bytes not matching the stored checksum, ...) is treated as a **miss**: a warning naming the
    file is logged and the file is deleted, so the next :func:`prompt_embeddings` call with an
    encoder recomputes it, and a call without one reports a clear cache miss.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    @staticmethod
    def key(
        prompt_cleaned: str,
        encoder_identity: str,
        dtype: torch.dtype,
        max_length: int,
        *,
        encoder_dtype: torch.dtype | None = None,
    ) -> str:
        """sha256 hex over everything that changes the stored embedding.

        ``dtype`` is the stored (DiT) dtype, ``encoder_dtype`` the dtype the encoder computed in
        (default: ``dtype``). Library versions and the device are recorded in the metadata but
        are not part of the key (see :func:`prompt_embeddings`).
        """
        fields = {
            "format": CACHE_FORMAT,
            "prompt": prompt_cleaned,
            "encoder_identity": encoder_identity,
            "dtype": _dtype_name(dtype),
            "encoder_dtype": _dtype_name(encoder_dtype or dtype),
            "max_length": int(max_length),
        }
        canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        """The file of ``key`` (which must be a sha256 hex digest, so it cannot escape the dir)."""
        if not _KEY_PATTERN.fullmatch(key):
            raise ValueError(f"Not a cache key (64 lowercase hex digits): {key!r}")
        return self.directory / f"{key}.safetensors"

    def get(self, key: str) -> tuple[torch.Tensor, int] | None:
        """``(embeddings on CPU, seq_len)`` for ``key``, or ``None`` on a miss (see class doc)."""
        path = self.path(key)
        try:
            embeddings, seq_len, metadata = _read_entry(path)
            _validate_entry(key, embeddings, seq_len, metadata)
        except FileNotFoundError:
            return None
        except OSError as err:
            # An I/O problem (permissions, a directory in the way, ...) is not corruption: the
            # file may be fine, so do not delete it; fail and say which file.
            raise OSError(f"Cannot read text-embedding cache file {path}: {err}") from err
        except (safetensors.SafetensorError, _CorruptEntry) as err:
            logger.warning(
                "Text-embedding cache file %s is corrupt (%s); deleting it and treating it as a miss.",
                path,
                err,
            )
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None
        return embeddings, seq_len

    def put(self, key: str, embeddings: torch.Tensor, seq_len: int, meta: dict[str, Any]) -> Path:
        """Store an entry atomically and return its path.

        ``meta`` values are stored as strings. ``dtype``, ``max_length``, ``seq_len``, ``key``,
        ``format`` and the checksum are derived from the arguments (a conflicting ``dtype`` or
        ``max_length`` in ``meta`` is an error); ``created`` defaults to now (UTC, ISO 8601).
        """
        path = self.path(key)
        embeddings = embeddings.detach().to("cpu").contiguous()
        if embeddings.ndim != 3 or embeddings.shape[0] != 1:
            raise ValueError(
                f"Expected embeddings of shape [1, max_length, d_model], got {tuple(embeddings.shape)}"
            )
        max_length = embeddings.shape[1]
        if not 1 <= int(seq_len) <= max_length:
            raise ValueError(f"seq_len {seq_len} outside [1, {max_length}]")
        derived = {"dtype": _dtype_name(embeddings.dtype), "max_length": str(max_length)}
        for name, value in derived.items():
            if name in meta and str(meta[name]) != value:
                raise ValueError(f"meta[{name!r}] = {meta[name]!r} contradicts the tensor ({value})")
        metadata = {str(name): str(value) for name, value in meta.items()}
        metadata.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        metadata.update(
            derived,
            format=CACHE_FORMAT,
            key=key,
            seq_len=str(int(seq_len)),
            embeddings_sha256=_tensor_sha256(embeddings),
        )
        tensors = {"embeddings": embeddings, "seq_len": torch.tensor(int(seq_len), dtype=torch.int64)}
        data = safetensors.torch.save(tensors, metadata=metadata)
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)  # a shared cache: old or complete, never partial
        logger.info("Stored text embedding %s (seq_len %d)", path, seq_len)
        return path


def _read_entry(path: Path) -> tuple[torch.Tensor, int, dict[str, str]]:
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        names = set(handle.keys())
        if names != {"embeddings", "seq_len"}:
            raise _CorruptEntry(f"unexpected tensors {sorted(names)}")
        embeddings = handle.get_tensor("embeddings")
        seq_len_tensor = handle.get_tensor("seq_len")
    if seq_len_tensor.ndim != 0 or seq_len_tensor.dtype != torch.int64:
        raise _CorruptEntry(f"seq_len is {seq_len_tensor.dtype} of shape {tuple(seq_len_tensor.shape)}")
    return embeddings, int(seq_len_tensor), metadata


def _validate_entry(key: str, embeddings: torch.Tensor, seq_len: int, metadata: dict[str, str]) -> None:
    def expect(condition: bool, what: str) -> None:
        if not condition:
            raise _CorruptEntry(what)

    expect(metadata.get("format") == CACHE_FORMAT, f"format {metadata.get('format')!r}")
    expect(metadata.get("key") == key, f"stored key {metadata.get('key')!r} differs from file name")
    expect(embeddings.ndim == 3 and embeddings.shape[0] == 1, f"embeddings shape {tuple(embeddings.shape)}")
    expect(str(embeddings.shape[1]) == metadata.get("max_length"), "embedding rows != metadata max_length")
    expect(_dtype_name(embeddings.dtype) == metadata.get("dtype"), "embedding dtype != metadata dtype")
    expect(
        str(seq_len) == metadata.get("seq_len") and 1 <= seq_len <= embeddings.shape[1], f"seq_len {seq_len}"
    )
    expect(
        _tensor_sha256(embeddings) == metadata.get("embeddings_sha256"), "embedding bytes fail their checksum"
    )


# --------------------------------------------------------------------------------------------
# The one call the rest of the code makes
# --------------------------------------------------------------------------------------------


def _library_versions() -> dict[str, str]:
    versions = {"torch": torch.__version__}
    with contextlib.suppress(ImportError):
        import transformers

        versions["transformers"] = transformers.__version__
    return versions


def prompt_embeddings(
    prompt: str,
    *,
    cache_dir: str | os.PathLike[str],
    encoder_dir: str | os.PathLike[str] | None = None,
    encoder_identity: str | None = None,
    device: str | torch.device,
    dtype: torch.dtype,
    max_length: int = DEFAULT_MAX_LENGTH,
    encoder_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, int]:
    """The DiT text conditioning for ``prompt``: ``(embeddings [1, max_length, d_model], seq_len)``.

    Looks the embedding up in ``cache_dir`` first; a hit loads nothing else (no encoder, no
    ``transformers``). On a miss the encoder is loaded from ``encoder_dir`` (computing in
    ``encoder_dtype``, bf16 like the official run, then cast to ``dtype``), the result is
    stored, and the encoder is released before returning.

    The cache key covers the cleaned prompt, the encoder identity, ``dtype``, ``encoder_dtype``
    and ``max_length``. ``encoder_identity`` defaults to :func:`encoder_identity_from_dir` of
    ``encoder_dir`` (config and tokenizer files only); pass it explicitly to look embeddings up
    without any encoder files at hand. The device the embedding was computed on and the
    torch/transformers versions are recorded in the file's metadata but are not part of the key,
    so an embedding computed once can be reused across machines (they change the result only
    at the level of rounding noise; check the metadata when doing bit-level parity work).

    Raises:
        PromptEmbeddingCacheMiss: the cache misses and no ``encoder_dir`` was given.
        ValueError: neither ``encoder_dir`` nor ``encoder_identity`` was given (no key).
    """
    if encoder_identity is None:
        if encoder_dir is None:
            raise ValueError(
                "prompt_embeddings needs encoder_identity or encoder_dir (whose config and tokenizer "
                "files name the encoder) to compute the cache key."
            )
        encoder_identity = encoder_identity_from_dir(encoder_dir)
    cleaned = clean_prompt(prompt)
    cache = PromptEmbeddingCache(cache_dir)
    key = cache.key(cleaned, encoder_identity, dtype, max_length, encoder_dtype=encoder_dtype)

    hit = cache.get(key)
    if hit is not None:
        embeddings, seq_len = hit
        logger.info("Text embedding cache hit %s (prompt %r, seq_len %d)", key, cleaned, seq_len)
        return embeddings.to(device), seq_len

    if encoder_dir is None:
        raise PromptEmbeddingCacheMiss(
            f"No cached text embedding for prompt {cleaned!r} in {str(cache.directory)!r} "
            f"(key {key}; encoder identity {encoder_identity!r}, dtype {_dtype_name(dtype)}, "
            f"encoder dtype {_dtype_name(encoder_dtype)}, max_length {max_length}), and no encoder_dir "
            "was given to compute it. Fill the cache once where the umT5 encoder is available: "
            "worldplay.nn.text.prompt_embeddings(prompt, cache_dir=..., encoder_dir=<Wan2.2-TI2V-5B-Diffusers "
            "snapshot>, encoder_identity=<the same identity>, device=..., dtype=...)."
        )

    require_text_extra()  # before the encoder's files are read: one line naming the install command
    logger.info("Text embedding cache miss %s: encoding prompt %r with %s", key, cleaned, encoder_dir)
    started = time.perf_counter()
    with TextEncoder.from_pretrained(encoder_dir, device=device, dtype=encoder_dtype) as encoder:
        # Encode the prompt cleaned above: cleaning is not idempotent, so never clean it twice.
        embeddings, seq_len = encoder.encode_cleaned(cleaned, max_length=max_length, dtype=dtype)
        device_name = str(encoder.device)
    meta = {
        "prompt": cleaned,
        "encoder_identity": encoder_identity,
        "encoder_dir": str(encoder_dir),
        "encoder_dtype": _dtype_name(encoder_dtype),
        "dtype": _dtype_name(dtype),
        "max_length": max_length,
        "device": device_name,
        **{f"{name}_version": version for name, version in _library_versions().items()},
    }
    cache.put(key, embeddings, seq_len, meta)
    logger.info("Encoded prompt in %.1f s (seq_len %d)", time.perf_counter() - started, seq_len)
    return embeddings, seq_len
