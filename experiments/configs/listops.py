"""ListOps as in the Long Range Arena: the LRA generator's parameters and the LRA repo's model and schedule.

Data: 96k/2k/2k expressions of 500-2000 tokens, depth <= 10, <= 10 arguments (lra_benchmarks/data/listops.py).
Model: 4 layers, width 512, 8 heads, MLP 1024. Training: batch 32, 5k steps, AdamW (b2 0.98, weight decay
0.1) with LRA's rsqrt schedule (0.05 * linear_warmup(1000) * rsqrt_decay). Generating the data once
takes ~10 minutes on one core; it is cached afterwards.
"""

from experiments.configs.common import base_config


def get_config():
  config = base_config()
  task = config.task
  task.name = "listops"
  task.seed = 0
  task.num_train = 96_000
  task.num_valid = 2_000
  task.num_test = 2_000
  task.max_depth = 10
  task.max_args = 10
  task.min_length = 500
  task.max_length = 2000

  model = config.model
  model.width = 512
  model.num_layers = 4
  model.num_heads = 8
  model.mlp_ratio = 2.0
  model.dropout_rate = 0.1

  train = config.train
  train.batch_size = 32
  train.num_steps = 5000
  train.schedule = "rsqrt"
  train.learning_rate = 0.05
  train.warmup_steps = 1000
  train.weight_decay = 0.1
  train.grad_clip_norm = 0.0
  train.eval_every = 500
  train.eval_batches = 20
  train.checkpoint_every = 1000
  return config
