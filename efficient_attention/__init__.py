"""Efficient attention variants as Flax NNX sequence mixers, composed into one configurable decoder."""

from efficient_attention.config import AttentionConfig, MixerConfig
from efficient_attention.decoder import Decoder, DecoderConfig
from efficient_attention.registry import build_mixer, config_class, make_config, variant_names

__all__ = [
    "AttentionConfig",
    "Decoder",
    "DecoderConfig",
    "MixerConfig",
    "build_mixer",
    "config_class",
    "make_config",
    "variant_names",
]
