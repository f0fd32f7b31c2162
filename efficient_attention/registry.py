"""Maps `--variant` names to their config class and Flax NNX module class."""

import dataclasses
import importlib
from typing import Any

import jax.numpy as jnp
from flax import nnx

from efficient_attention.config import MixerConfig

_VARIANTS: dict[str, tuple[type[MixerConfig], type[nnx.Module]]] = {}


def register(config_cls: type[MixerConfig]):
  """Class decorator: registers a mixer module under `config_cls.variant`."""

  def decorate(module_cls: type[nnx.Module]) -> type[nnx.Module]:
    name = config_cls.variant
    if not name:
      raise ValueError(f"{config_cls.__name__}.variant must name the variant")
    if name in _VARIANTS:
      raise ValueError(f"variant {name!r} is registered twice")
    _VARIANTS[name] = (config_cls, module_cls)
    return module_cls

  return decorate


def _load_variants() -> None:
  # Variants register themselves on import; importing here avoids a cycle with their modules.
  importlib.import_module("efficient_attention.variants")


def variant_names() -> tuple[str, ...]:
  _load_variants()
  return tuple(sorted(_VARIANTS))


def _entry(name: str) -> tuple[type[MixerConfig], type[nnx.Module]]:
  _load_variants()
  if name not in _VARIANTS:
    raise ValueError(f"variant={name!r} is not valid; choose one of {', '.join(sorted(_VARIANTS))}")
  return _VARIANTS[name]


def config_class(name: str) -> type[MixerConfig]:
  return _entry(name)[0]


def make_config(name: str, **overrides: Any) -> MixerConfig:
  """Default config of variant `name`, with those `overrides` that are fields of it.

  Fields the variant does not have are ignored, so a decoder can pass shared settings
  (`num_heads`, `rotary`, `causal`) to every layer of a hybrid.
  """
  cls = config_class(name)
  fields = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in overrides.items() if k in fields})


def build_mixer(
    config: MixerConfig,
    width: int,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Module:
  """Builds the mixer `config` describes: `mixer(x [B, T, width], *, mask=None) -> [B, T, width]`."""
  _, module_cls = _entry(config.variant)
  config.check_width(width)
  return module_cls(config, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
