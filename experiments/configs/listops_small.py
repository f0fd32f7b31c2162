"""The default task: a small ListOps (short expressions) that a 2-core CPU trains in about a minute.

Same generator as `listops.py` with shallow trees (depth <= 3, <= 5 arguments, under 64 tokens),
so the model learns real nested evaluation well above the majority class (~12%) within minutes.
"""

from experiments.configs.common import base_config


def get_config():
  config = base_config()
  task = config.task
  task.name = "listops"
  task.seed = 0
  task.num_train = 20_000
  task.num_valid = 1_000
  task.num_test = 1_000
  task.max_depth = 3
  task.max_args = 5
  task.min_length = 0
  task.max_length = 40

  config.model.width = 64
  config.model.num_layers = 2
  config.model.num_heads = 4

  train = config.train
  train.batch_size = 32
  train.num_steps = 1200
  train.learning_rate = 3e-3
  train.warmup_steps = 100
  train.log_every = 100
  train.eval_every = 500
  train.checkpoint_every = 500
  return config
