"""Model presets: the real Wan 2.2 TI2V-5B sizes (``wan5b``) and a few-MB twin (``tiny``).

Both presets build the *same* modules; only the numbers differ. The field names follow the
diffusers ``config.json`` files of the published checkpoints so that a real ``config.json``
can be turned into one of these dataclasses without a translation table.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

# Wan 2.2 VAE latent statistics (48 channels), from `vae/config.json` of
# Wan-AI/Wan2.2-TI2V-5B-Diffusers. They are not learned weights and live in the config.
WAN22_LATENTS_MEAN: tuple[float, ...] = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD: tuple[float, ...] = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


class ConfigError(ValueError):
    """A model config is malformed (unknown preset, wrong field, impossible value)."""


class ConfigWarning(UserWarning):
    """A config key this package does not know was ignored (diffusers warns the same way)."""


def _from_dict(cls, data: dict[str, Any], source: str):
    """Build a frozen config dataclass from a diffusers-style dict.

    Keys that diffusers writes for its own bookkeeping (``_class_name``, ``_diffusers_version``,
    ...) are ignored. Keys that are neither ours nor bookkeeping (a newer diffusers adds some)
    are a :class:`~worldplay.config.ConfigWarning`, as diffusers itself warns: a field that changes the
    architecture still cannot go unnoticed, because the strict weight load then finds missing,
    unexpected or mis-shaped tensors and names them.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    ignorable = set(getattr(cls, "IGNORED_KEYS", ()))
    kwargs: dict[str, Any] = {}
    unknown = []
    for key, value in data.items():
        if key.startswith("_") or key in ignorable:
            continue
        if key not in known:
            unknown.append(key)
            continue
        if isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    if unknown:
        warnings.warn(
            f"{source}: unknown config keys {sorted(unknown)} for {cls.__name__} ignored (a newer diffusers?); "
            "the weights are still loaded strictly, so a key that changes the model shows up there",
            ConfigWarning,
            stacklevel=3,
        )
    return cls(**kwargs)


@dataclass(frozen=True)
class DiTConfig:
    """Wan 2.2 DiT hyper-parameters, named as in diffusers' ``WanTransformer3DModel`` config."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    in_channels: int = 48
    out_channels: int = 48
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 14336
    num_layers: int = 30
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    # Written by diffusers but not part of the architecture we build.
    IGNORED_KEYS = ("window_size",)

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def __post_init__(self) -> None:
        if self.qk_norm != "rms_norm_across_heads":
            raise ConfigError(f"qk_norm={self.qk_norm!r} is not supported (Wan 2.2 uses 'rms_norm_across_heads')")
        if self.cross_attn_norm is not True:
            raise ConfigError(f"cross_attn_norm={self.cross_attn_norm!r} is not supported: Wan 2.2 TI2V-5B normalises "
                              "before cross-attention (the config key 'cross_attn_norm' must be true)")
        if self.image_dim is not None or self.added_kv_proj_dim is not None:
            raise ConfigError("image_dim / added_kv_proj_dim (the Wan 2.1 I2V CLIP branch) are not supported")
        if self.attention_head_dim % 2 or self.attention_head_dim < 6:
            raise ConfigError(f"attention_head_dim must be even and >= 6, got {self.attention_head_dim}")
        if tuple(self.patch_size) != (1, 2, 2):
            raise ConfigError(f"patch_size must be (1, 2, 2), got {self.patch_size}")
        object.__setattr__(self, "patch_size", tuple(self.patch_size))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> DiTConfig:
        return _from_dict(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["_class_name"] = "WanTransformer3DModel"
        return d


@dataclass(frozen=True)
class VAEConfig:
    """Wan 2.2 VAE hyper-parameters, named as in diffusers' ``AutoencoderKLWan`` config."""

    base_dim: int = 160
    decoder_base_dim: int | None = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # (sic) diffusers' spelling
    dropout: float = 0.0
    is_residual: bool = True
    in_channels: int = 12
    out_channels: int = 12
    patch_size: int | None = 2
    scale_factor_spatial: int = 16
    scale_factor_temporal: int = 4
    latents_mean: tuple[float, ...] = field(default=WAN22_LATENTS_MEAN)
    latents_std: tuple[float, ...] = field(default=WAN22_LATENTS_STD)

    IGNORED_KEYS = ("clip_output",)

    def __post_init__(self) -> None:
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ConfigError(
                f"latents_mean/latents_std need z_dim={self.z_dim} entries, "
                f"got {len(self.latents_mean)}/{len(self.latents_std)}"
            )
        if not self.is_residual or self.patch_size != 2:
            raise ConfigError("only the Wan 2.2 VAE (is_residual=True, patch_size=2) is supported")
        if self.attn_scales:
            raise ConfigError("attn_scales must be empty (Wan 2.2 has attention only in the middle blocks)")
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> VAEConfig:
        return _from_dict(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["_class_name"] = "AutoencoderKLWan"
        return d


DIT_PRESETS: dict[str, DiTConfig] = {
    "wan5b": DiTConfig(),
    # Same structure, a few hundred kB: 2 heads of 12 (RoPE split 4/4/4), 2 layers.
    "tiny": DiTConfig(
        num_attention_heads=2,
        attention_head_dim=12,
        text_dim=32,
        freq_dim=16,
        ffn_dim=64,
        num_layers=2,
    ),
}

VAE_PRESETS: dict[str, VAEConfig] = {
    "wan5b": VAEConfig(),
    # Same structure (4 stages, residual up/down blocks, mid attention), 48 latent channels
    # so the real normalisation constants apply; widths 8..32.
    "tiny": VAEConfig(base_dim=8, decoder_base_dim=8, num_res_blocks=1),
}



def dit_preset(name: str) -> DiTConfig:
    try:
        return DIT_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(DIT_PRESETS)}") from None


def vae_preset(name: str) -> VAEConfig:
    try:
        return VAE_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(VAE_PRESETS)}") from None
