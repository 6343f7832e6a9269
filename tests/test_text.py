"""Text side: prompt cleaning, the umT5 encoder wrapper, and the on-disk embedding cache.

Everything runs offline on a tiny random umT5 and a tokenizer trained here in milliseconds,
saved in the Wan diffusers layout (``tokenizer/`` + ``text_encoder/``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("ftfy")
pytest.importorskip("transformers")

from worldplay.nn import text  # noqa: E402
from worldplay.nn.text import (  # noqa: E402
    DEFAULT_PROMPT,
    PromptEmbeddingCache,
    PromptEmbeddingCacheMiss,
    TextEncoder,
    clean_prompt,
    encoder_identity_from_dir,
    prompt_embeddings,
)

MAX_LEN = 16
D_MODEL = 16
SHORT_PROMPT = "a cat sits"  # a handful of tokens with the tiny vocabulary: leaves padding rows
LONG_PROMPT = " ".join([DEFAULT_PROMPT] * 3)  # far more than MAX_LEN tokens

_TRAINING_TEXT = [
    DEFAULT_PROMPT,
    "A cat sits on the warm roof of a small house near the sea.",
    "The quick brown fox jumps over the lazy dog while the sun sets.",
    "Marble columns, old temples and narrow streets fill the city.",
    "Walking through a forest with tall trees and bright green leaves.",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _build_tokenizer(directory: Path) -> None:
    """A T5-style unigram tokenizer (<pad>=0, </s>=1, <unk>=2, '</s>' appended), saved like Wan's."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.Unigram())
    # Lowercase is not in the real umT5 tokenizer; it is a marker that the tokenizer.json is used
    # verbatim (transformers 5's T5Tokenizer would rebuild the pipeline and drop it).
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    backend.train_from_iterator(_TRAINING_TEXT * 3, trainer=trainer)
    eos = backend.token_to_id("</s>")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    wrapper = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    wrapper.save_pretrained(str(directory))
    # The Wan repos name the T5 class here; transformers 5's AutoTokenizer would honour it.
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "T5Tokenizer"
    config_path.write_text(json.dumps(config))


def _build_encoder(directory: Path, vocab_size: int) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=D_MODEL,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
    )
    torch.manual_seed(1234)
    UMT5EncoderModel(config).save_pretrained(str(directory))


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    """A tiny umT5 in the Wan diffusers layout."""
    from tokenizers import Tokenizer

    root = tmp_path_factory.mktemp("wan")
    _build_tokenizer(root / "tokenizer")
    vocab_size = Tokenizer.from_file(str(root / "tokenizer" / "tokenizer.json")).get_vocab_size()
    _build_encoder(root / "text_encoder", vocab_size)
    return root


@pytest.fixture(scope="module")
def encoder(wan_dir) -> TextEncoder:
    return TextEncoder.from_pretrained(wan_dir, device="cpu", dtype=torch.float32)


def _reference_ids(wan_dir: Path, cleaned: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask straight from the tokenizers library (independent of transformers)."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(wan_dir / "tokenizer" / "tokenizer.json"))
    ids = raw.encode(cleaned).ids[:max_length]
    if len(ids) == max_length:
        ids[-1] = raw.token_to_id("</s>")  # truncation keeps the end-of-sequence token
    n = len(ids)
    ids = ids + [raw.token_to_id("<pad>")] * (max_length - n)
    mask = [1] * n + [0] * (max_length - n)
    return torch.tensor([ids]), torch.tensor([mask])


# --------------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        (DEFAULT_PROMPT, DEFAULT_PROMPT),
        ("Tom &amp;amp; Jerry", "Tom & Jerry"),
        # With a '<' in the text ftfy leaves entities alone; the two html.unescape calls do it.
        ("<b>Tom &amp;amp; Jerry</b>", "<b>Tom & Jerry</b>"),
        ("  a\t\tcat \n\n sits\xa0\xa0here  ", "a cat sits here"),
        ("The Mona Lisa doesnâ€™t have eyebrows.", "The Mona Lisa doesn't have eyebrows."),
        ("\u3000wide\u3000space\u3000", "wide space"),
    ],
)
def test_clean_prompt(raw, cleaned):
    assert clean_prompt(raw) == cleaned


def test_clean_prompt_matches_official_regex_whitespace():
    """The official code collapses whitespace with the ``regex`` module; so must we."""
    regex = pytest.importorskip("regex")
    import html

    import ftfy

    def official(value: str) -> str:
        value = html.unescape(html.unescape(ftfy.fix_text(value))).strip()
        return regex.sub(r"\s+", " ", value).strip()

    tricky = ["a\x1cb\x1dc\x1ed\x1ff", "a&#28;b", "x &amp;#x1c; y", "a\u2028b\u2029c\x85d", "p\x0bq\x0cr"]
    for value in tricky:
        assert clean_prompt(value) == official(value), value


def test_clean_prompt_without_ftfy(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ftfy", None)
    with pytest.raises(ImportError, match=r"ftfy.*pip install 'worldplay\[text\]'"):
        clean_prompt("hello")


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------


def test_encode_shape_padding_and_reference(encoder, wan_dir):
    from tokenizers import Tokenizer
    from transformers import UMT5EncoderModel

    embeddings, seq_len = encoder.encode(SHORT_PROMPT, max_length=MAX_LEN)
    assert embeddings.shape == (1, MAX_LEN, D_MODEL)
    assert embeddings.dtype == torch.float32

    raw = Tokenizer.from_file(str(wan_dir / "tokenizer" / "tokenizer.json"))
    real_tokens = len(raw.encode(SHORT_PROMPT, add_special_tokens=False).ids)
    assert seq_len == real_tokens + 1  # + </s>
    assert 1 < seq_len < MAX_LEN

    assert torch.all(embeddings[0, seq_len:] == 0)
    assert torch.all(embeddings[0, :seq_len].abs().sum(dim=-1) > 0)

    ids, mask = _reference_ids(wan_dir, clean_prompt(SHORT_PROMPT), MAX_LEN)
    model = UMT5EncoderModel.from_pretrained(str(wan_dir / "text_encoder"), local_files_only=True).eval()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(embeddings[:, :seq_len], reference[:, :seq_len])
    # The encoder's own padded outputs are non-zero: the zeroing is what the test above checks.
    assert reference[:, seq_len:].abs().sum() > 0


def test_encode_output_dtype_is_a_cast(encoder):
    full, seq_len = encoder.encode(SHORT_PROMPT, max_length=MAX_LEN)
    half, half_len = encoder.encode(SHORT_PROMPT, max_length=MAX_LEN, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half_len == seq_len
    assert torch.equal(half, full.to(torch.bfloat16))


def test_encode_truncates_keeping_eos(encoder, wan_dir):
    embeddings, seq_len = encoder.encode(LONG_PROMPT, max_length=MAX_LEN)
    assert seq_len == MAX_LEN
    assert torch.all(embeddings[0].abs().sum(dim=-1) > 0)
    ids, _ = _reference_ids(wan_dir, clean_prompt(LONG_PROMPT), MAX_LEN)
    tokens = encoder.tokenizer(
        [clean_prompt(LONG_PROMPT)],
        padding="max_length",
        max_length=MAX_LEN,
        truncation=True,
        return_tensors="pt",
    )
    assert torch.equal(tokens["input_ids"], ids)


def test_tokenizer_json_is_used_verbatim(encoder, wan_dir):
    """Upper-case input: only a verbatim tokenizer.json applies the marker Lowercase normaliser."""
    cleaned = clean_prompt(DEFAULT_PROMPT)
    ids, _ = _reference_ids(wan_dir, cleaned, MAX_LEN)
    tokens = encoder.tokenizer(
        [cleaned], padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt"
    )
    assert torch.equal(tokens["input_ids"], ids)


def test_flat_layout_and_identity(wan_dir, tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(wan_dir / "text_encoder", flat)
    for file in (wan_dir / "tokenizer").iterdir():
        shutil.copy(file, flat / file.name)

    flat_encoder = TextEncoder.from_pretrained(flat, device="cpu", dtype=torch.float32)
    wan_encoder = TextEncoder.from_pretrained(wan_dir, device="cpu", dtype=torch.float32)
    assert torch.equal(
        flat_encoder.encode(SHORT_PROMPT, max_length=MAX_LEN)[0],
        wan_encoder.encode(SHORT_PROMPT, max_length=MAX_LEN)[0],
    )

    identity = encoder_identity_from_dir(wan_dir)
    assert encoder_identity_from_dir(flat) == identity  # layout-independent
    # Weights are not part of the identity: a copy holding only config + tokenizer matches.
    for weights in flat.glob("*.safetensors"):
        weights.unlink()
    assert encoder_identity_from_dir(flat) == identity
    # Any tokenizer or config change does change it.
    config = json.loads((flat / "config.json").read_text())
    config["layer_norm_epsilon"] = 1e-5
    (flat / "config.json").write_text(json.dumps(config))
    assert encoder_identity_from_dir(flat) != identity


def test_no_implicit_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextEncoder.from_pretrained("Wan-AI/Wan2.2-TI2V-5B-Diffusers", device="cpu")
    with pytest.raises(FileNotFoundError, match="neither"):
        TextEncoder.from_pretrained(tmp_path, device="cpu")


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def _cache_files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


def test_prompt_embeddings_caches_and_skips_the_encoder(encoder, wan_dir, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    kwargs = dict(
        cache_dir=cache_dir,
        device="cpu",
        dtype=torch.float32,
        max_length=MAX_LEN,
        encoder_dtype=torch.float32,
    )

    first, first_len = prompt_embeddings(SHORT_PROMPT, encoder_dir=wan_dir, **kwargs)
    expected, expected_len = encoder.encode(SHORT_PROMPT, max_length=MAX_LEN)
    assert torch.equal(first, expected) and first_len == expected_len
    assert len(_cache_files(cache_dir)) == 1

    def refuse(*args, **kw):
        raise AssertionError("the encoder must not be loaded on a cache hit")

    monkeypatch.setattr(TextEncoder, "from_pretrained", refuse)
    second, second_len = prompt_embeddings(SHORT_PROMPT, encoder_dir=wan_dir, **kwargs)
    assert torch.equal(second, first) and second_len == first_len
    # Without any encoder files, given the identity (how a benchmark looks it up).
    third, _ = prompt_embeddings(SHORT_PROMPT, encoder_identity=encoder_identity_from_dir(wan_dir), **kwargs)
    assert torch.equal(third, first)

    from safetensors import safe_open

    (file,) = cache_dir.iterdir()
    with safe_open(str(file), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["prompt"] == clean_prompt(SHORT_PROMPT)
    assert meta["encoder_identity"] == encoder_identity_from_dir(wan_dir)
    assert meta["dtype"] == "float32" and meta["max_length"] == str(MAX_LEN)
    assert meta["seq_len"] == str(first_len) and "created" in meta


def test_prompt_embeddings_bf16_default_encoder_dtype(wan_dir, tmp_path):
    embeddings, seq_len = prompt_embeddings(
        SHORT_PROMPT,
        cache_dir=tmp_path,
        encoder_dir=wan_dir,
        device="cpu",
        dtype=torch.bfloat16,
        max_length=MAX_LEN,
    )
    assert embeddings.dtype == torch.bfloat16
    assert torch.all(embeddings[0, seq_len:] == 0)


def test_cache_key_covers_every_input():
    base = dict(prompt_cleaned="a cat", encoder_identity="enc-A", dtype=torch.bfloat16, max_length=512)
    key = PromptEmbeddingCache.key(**base)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert PromptEmbeddingCache.key(**base) == key
    variants = [
        {"prompt_cleaned": "a cat."},
        {"encoder_identity": "enc-B"},
        {"dtype": torch.float32},
        {"max_length": 226},
    ]
    keys = {PromptEmbeddingCache.key(**{**base, **change}) for change in variants}
    keys.add(PromptEmbeddingCache.key(**base, encoder_dtype=torch.float32))
    assert key not in keys and len(keys) == len(variants) + 1


def _stored_entry(tmp_path: Path) -> tuple[PromptEmbeddingCache, str, torch.Tensor]:
    cache = PromptEmbeddingCache(tmp_path / "cache")
    key = cache.key("a cat", "enc", torch.float32, 8)
    embeddings = torch.zeros(1, 8, 4)
    embeddings[0, :3] = torch.randn(3, 4)
    cache.put(key, embeddings, 3, {"prompt": "a cat"})
    return cache, key, embeddings


def test_cache_round_trip(tmp_path):
    cache, key, embeddings = _stored_entry(tmp_path)
    stored, seq_len = cache.get(key)
    assert torch.equal(stored, embeddings) and seq_len == 3
    assert cache.get(cache.key("a dog", "enc", torch.float32, 8)) is None


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "empty"])
def test_corrupt_cache_file_is_a_logged_miss_and_deleted(tmp_path, caplog, damage):
    cache, key, _ = _stored_entry(tmp_path)
    path = cache.path(key)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # inside the tensor data
    else:
        path.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger=text.__name__):
        assert cache.get(key) is None
    assert str(path) in caplog.text and "corrupt" in caplog.text
    assert not path.exists()


def test_interrupted_serialisation_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(text.safetensors.torch, "save", broken_save)
    cache = PromptEmbeddingCache(tmp_path / "cache")
    key = cache.key("a cat", "enc", torch.float32, 8)
    with pytest.raises(RuntimeError, match="interrupted"):
        cache.put(key, torch.zeros(1, 8, 4), 1, {})
    assert _cache_files(cache.directory) == []


def test_interrupted_file_write_leaves_nothing(tmp_path, monkeypatch):
    """Fail after the bytes reached the temporary file: it must be removed, the target never made."""

    def broken_fsync(fd):
        raise OSError("disk went away")

    monkeypatch.setattr(text.os, "fsync", broken_fsync)
    cache = PromptEmbeddingCache(tmp_path / "cache")
    key = cache.key("a cat", "enc", torch.float32, 8)
    with pytest.raises(OSError, match="disk went away"):
        cache.put(key, torch.zeros(1, 8, 4), 1, {})
    assert _cache_files(cache.directory) == []


def test_cache_miss_without_encoder_names_the_prompt(tmp_path):
    identity = "Wan-AI/Wan2.2-TI2V-5B-Diffusers@test"
    with pytest.raises(PromptEmbeddingCacheMiss, match=re.escape(DEFAULT_PROMPT)) as info:
        prompt_embeddings(
            DEFAULT_PROMPT, cache_dir=tmp_path, encoder_identity=identity, device="cpu", dtype=torch.bfloat16
        )
    key = PromptEmbeddingCache.key(
        DEFAULT_PROMPT, identity, torch.bfloat16, 512, encoder_dtype=torch.bfloat16
    )
    assert key in str(info.value) and "encoder_dir" in str(info.value)
    with pytest.raises(ValueError, match="encoder_identity or encoder_dir"):
        prompt_embeddings(DEFAULT_PROMPT, cache_dir=tmp_path, device="cpu", dtype=torch.bfloat16)


def test_corrupt_entry_is_recomputed(wan_dir, tmp_path):
    kwargs = dict(
        cache_dir=tmp_path, encoder_dir=wan_dir, device="cpu", dtype=torch.float32, max_length=MAX_LEN
    )
    first, _ = prompt_embeddings(SHORT_PROMPT, **kwargs)
    (path,) = tmp_path.iterdir()
    path.write_bytes(path.read_bytes()[:100])
    again, _ = prompt_embeddings(SHORT_PROMPT, **kwargs)
    assert torch.equal(again, first)
    assert PromptEmbeddingCache(tmp_path).get(path.stem) is not None
