"""Selective copying as in Mamba (section 4.1.1): 16 data tokens among noise in a 4096-token context,
vocabulary 16, a 2-layer width-64 model. test_seq_len sets the context length of the test split."""

from experiments.configs.common import base_config


def get_config():
  config = base_config()
  task = config.task
  task.name = "selective_copy"
  task.seed = 0
  task.num_train = 20_000
  task.num_valid = 1_000
  task.num_test = 1_000
  task.vocab_size = 16
  task.num_tokens = 16
  task.train_seq_len = 4096
  task.test_seq_len = 4096

  model = config.model
  model.width = 64
  model.num_layers = 2
  model.position = "rope"

  train = config.train
  train.batch_size = 32
  train.num_steps = 50_000
  train.learning_rate = 1e-3
  train.warmup_steps = 1_000
  train.eval_every = 5_000
  train.eval_batches = 8
  train.checkpoint_every = 5_000
  return config
