"""Byte-level language modelling on this machine's Python standard-library sources (bits per byte).

Windows of 1024 bytes, a 4-layer width-256 causal model. Limit the corpus with
task.max_train_bytes (0 = every training file, ~30 MB for CPython 3.12).
"""

from experiments.configs.common import base_config


def get_config():
  config = base_config()
  task = config.task
  task.name = "bytes_lm"
  # Directory of sources; "" is the running interpreter's standard library.
  task.root = ""
  task.seq_len = 1024
  task.max_train_bytes = 0
  task.max_valid_bytes = 1_000_000
  task.max_test_bytes = 1_000_000

  model = config.model
  model.width = 256
  model.num_layers = 4
  model.num_heads = 4
  model.mlp_ratio = 4.0
  model.position = "rope"

  train = config.train
  train.batch_size = 16
  train.num_steps = 20_000
  train.learning_rate = 1e-3
  train.weight_decay = 0.1
  train.warmup_steps = 1_000
  train.eval_every = 2_000
  train.eval_batches = 50
  train.checkpoint_every = 2_000
  return config
