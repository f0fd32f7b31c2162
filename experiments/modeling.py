"""Turns the `model` config section and a task into a `DecoderConfig`, choosing the direction per variant."""

import dataclasses
from collections.abc import Mapping
from typing import Any

from efficient_attention import DecoderConfig, config_class, variant_names
from efficient_attention.validation import check_choice

from experiments.tasks.base import TaskData

DIRECTIONS = ("auto", "causal", "bidirectional")


def layer_variants(model: Mapping[str, Any]) -> tuple[str, ...]:
  if model["layer_pattern"]:
    return tuple(name.strip() for name in model["layer_pattern"].split(","))
  return (model["variant"],)


def choose_direction(model: Mapping[str, Any], task: TaskData) -> tuple[bool, str]:
  """-> (causal, why). `auto` picks an encoder for classification and a causal model for token tasks,
  and falls back to the other direction when a layer's variant supports only that one."""
  names = set(layer_variants(model))
  for name in sorted(names):
    check_choice("variant", name, variant_names())
  can_causal = all(config_class(name).supports_causal for name in names)
  can_bidirectional = all(config_class(name).supports_bidirectional for name in names)
  direction = model["direction"]
  check_choice("direction", direction, DIRECTIONS)
  variants = ",".join(sorted(names))
  if direction == "auto":
    if task.kind == "classification":
      direction = "bidirectional" if can_bidirectional else "causal"
    else:
      direction = "causal" if can_causal or task.requires_causal else "bidirectional"
  if direction == "causal" and not can_causal:
    if task.requires_causal:
      raise ValueError(
          f"variant {variants!r} has no causal form, and task {task.name!r} needs a causal model "
          "(its targets are the next inputs); choose a variant that supports causal=True"
      )
    raise ValueError(f"direction='causal' is not valid for variant {variants!r}; it is bidirectional only")
  if direction == "bidirectional" and not can_bidirectional:
    raise ValueError(f"direction='bidirectional' is not valid for variant {variants!r}; it is causal only")
  if direction == "bidirectional" and task.requires_causal:
    raise ValueError(f"direction='bidirectional' is not valid for task {task.name!r}: its targets are the next inputs")
  causal = direction == "causal"
  if model["direction"] != "auto":
    why = f"direction={direction} (set in the config)"
  elif task.kind == "classification":
    why = "encoder (causal=False)" if not causal else f"causal=True because {variants} is causal only"
  else:
    why = "causal=True" if causal else f"causal=False because {variants} is bidirectional only"
  return causal, why


def decoder_config(model: Mapping[str, Any], task: TaskData, seed: int) -> tuple[DecoderConfig, str]:
  """-> (the decoder config for `task`, a line saying which direction was chosen and why)."""
  causal, why = choose_direction(model, task)
  classification = task.kind == "classification"
  pooling = model["pooling"]
  if classification and causal and pooling != "last":
    # Under causal attention only the last real token has seen the whole sequence.
    pooling = "last"
    why += f" (pooling='last' replaces pooling={model['pooling']!r})"
  used = set(layer_variants(model))
  options = {name: dict(fields) for name, fields in dict(model["mixer_options"]).items() if name in used}
  config = DecoderConfig(
      vocab_size=max(task.vocab_size, 0 if classification else task.num_classes),
      width=model["width"],
      num_layers=model["num_layers"],
      num_heads=model["num_heads"],
      variant=model["variant"],
      layer_pattern=model["layer_pattern"],
      mixer_options=options,
      causal=causal,
      position=model["position"],
      max_len=model["max_len"] or task.max_seq_len,
      mlp=model["mlp"],
      mlp_ratio=model["mlp_ratio"],
      norm=model["norm"],
      dropout_rate=model["dropout_rate"],
      head="classifier" if classification else "lm",
      num_classes=task.num_classes if classification else 0,
      pooling=pooling,
      dtype=model["dtype"],
      param_dtype=model["param_dtype"],
      seed=seed,
      remat=model["remat"],
  )
  return config, why


def describe(config: DecoderConfig) -> dict[str, Any]:
  """The decoder config as plain JSON values."""
  fields = dataclasses.asdict(config)
  fields["mixer_options"] = {name: dict(pairs) for name, pairs in config.mixer_options}
  return fields
