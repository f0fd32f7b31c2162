"""Multi-query associative recall with Zoology's generator: vocabulary 8192, 16 key-value pairs.

Trained at length 256 and tested at 512 (the same 16 pairs spread over a longer sequence), to
measure length extrapolation; raise test_num_kv_pairs to also test more pairs than trained on.
"""

from experiments.configs.common import base_config


def get_config():
  config = base_config()
  task = config.task
  task.name = "mqar"
  task.seed = 0
  task.num_train = 100_000
  task.num_valid = 3_000
  task.num_test = 3_000
  task.vocab_size = 8192
  task.train_seq_len = 256
  task.test_seq_len = 512
  task.num_kv_pairs = 16
  task.test_num_kv_pairs = 16
  task.power_a = 0.01

  model = config.model
  model.width = 128
  model.num_layers = 2
  model.position = "rope"

  train = config.train
  train.batch_size = 64
  train.num_steps = 20_000
  train.learning_rate = 1e-3
  train.weight_decay = 0.1
  train.warmup_steps = 1_000
  train.eval_every = 2_000
  train.checkpoint_every = 2_000
  return config
