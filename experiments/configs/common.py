"""Defaults every task config starts from; task files change what their task needs."""

import dataclasses

import ml_collections

from efficient_attention import config_class, variant_names

# Mixer fields the decoder sets from its own config for every layer; they are not per-variant options.
_DECODER_OWNED = {"causal", "num_heads", "num_kv_heads", "rotary", "max_len", "seed"}


def mixer_options() -> ml_collections.ConfigDict:
  """{variant: {field: default}} for every registered variant's own scalar fields.

  Listing the defaults makes each one overridable from the command line with its type checked,
  e.g. `--config.model.mixer_options.performer.num_features=128`; only the options of the variants
  a model uses reach it.
  """
  options = ml_collections.ConfigDict()
  for name in variant_names():
    fields = {}
    for field in dataclasses.fields(config_class(name)):
      default = field.default
      if field.name in _DECODER_OWNED or isinstance(default, type(dataclasses.MISSING)):
        continue
      if isinstance(default, (bool, int, float, str, tuple)):
        fields[field.name] = default
    options[name] = fields
  if "compressive" in options:
    # The compression network learns only from the paper's attention-reconstruction loss, which the
    # training step collects from what the layers sow (experiments/trainer.py).
    options.compressive.sow_compression_loss = True
  return options


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Seeds parameters, dropout and the training order (task generators have their own task.seed).
  config.seed = 0
  # Weight of auxiliary losses the mixers sow (the compressive memory's attention reconstruction).
  config.aux_loss_weight = 1.0
  # Where generated tasks are cached; "" means $EFFICIENT_ATTENTION_CACHE or ~/.cache/efficient_attention/tasks.
  config.cache_dir = ""

  # The task section: `name` picks the generator (experiments/tasks), the other fields are its parameters.
  config.task = ml_collections.ConfigDict()

  model = config.model = ml_collections.ConfigDict()
  # Sequence mixer of every layer (see efficient_attention.variant_names()); --variant sets it.
  model.variant = "full"
  # Hybrids: comma-separated variants tiled over the layers, e.g. "mamba,mamba,full" (overrides variant).
  model.layer_pattern = ""
  # "auto": an encoder for classification and a causal model for token tasks, falling back to the other
  # direction when the variant supports only that one; or "causal" / "bidirectional".
  model.direction = "auto"
  model.width = 128
  model.num_layers = 2
  model.num_heads = 4
  model.mlp = "gelu"
  # MLP hidden size as a multiple of width.
  model.mlp_ratio = 2.0
  model.norm = "layernorm"
  # "learned" | "sinusoidal" | "rope" | "none".
  model.position = "learned"
  model.dropout_rate = 0.0
  # Classifier pooling: "mean" | "first" | "last" (a causal classifier always pools the last real token).
  model.pooling = "mean"
  # Compute dtype ("bfloat16" for mixed precision) and parameter dtype.
  model.dtype = "float32"
  model.param_dtype = "float32"
  # Longest sequence the model accepts; 0 means the task's longest split.
  model.max_len = 0
  # Gradient checkpointing per block (recompute activations in the backward; for long sequences).
  model.remat = False
  model.mixer_options = mixer_options()

  train = config.train = ml_collections.ConfigDict()
  train.batch_size = 32
  # Eval batch size; 0 means batch_size.
  train.eval_batch_size = 0
  train.num_steps = 1000
  # "cosine" | "rsqrt" (LRA's constant * linear_warmup * rsqrt_decay) | "constant".
  train.schedule = "cosine"
  train.learning_rate = 1e-3
  train.warmup_steps = 100
  # Final learning rate of the cosine schedule as a fraction of learning_rate.
  train.end_lr_ratio = 0.01
  train.weight_decay = 0.01
  train.b1 = 0.9
  train.b2 = 0.98
  train.eps = 1e-9
  # Global gradient-norm clipping; 0 disables it.
  train.grad_clip_norm = 1.0
  train.log_every = 50
  train.eval_every = 500
  # Validation batches per periodic evaluation; -1 means the whole split. The final test uses all of it.
  train.eval_batches = -1
  train.checkpoint_every = 500
  train.max_checkpoints = 2
  # Device mesh (--mesh): "" puts every device on the data axis; "data:2,sequence:2" also splits each
  # sequence over 2 devices (ring attention, sequence-parallel scans). Sizes multiply to the device count.
  train.mesh = ""
  # Shard parameters and optimizer state over every device (FSDP over the data and sequence axes) instead of
  # replicating them.
  train.fsdp = False
  return config
