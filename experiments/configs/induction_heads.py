"""Induction heads as in Mamba (section 4.1.2): vocabulary 16, trained at length 256, a 2-layer
width-64 model; tested at 4096 (16x longer) to measure length extrapolation (Mamba goes to 2^20)."""

from experiments.configs.common import base_config


def get_config():
  config = base_config()
  task = config.task
  task.name = "induction_heads"
  task.seed = 0
  task.num_train = 100_000
  task.num_valid = 1_000
  task.num_test = 1_000
  task.vocab_size = 16
  task.train_seq_len = 256
  task.test_seq_len = 4096

  model = config.model
  model.width = 64
  model.num_layers = 2
  model.position = "rope"

  train = config.train
  train.batch_size = 8
  train.num_steps = 25_000
  train.learning_rate = 1e-3
  train.warmup_steps = 500
  train.eval_every = 2_500
  train.checkpoint_every = 2_500
  train.eval_batch_size = 32
  return config
