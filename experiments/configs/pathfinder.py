"""Pathfinder as in the Long Range Arena: 32x32 images (1024 pixel tokens) by default.

`--config=experiments/configs/pathfinder.py:64` (or `:128`, which `pathx.py` names) selects the
larger images. Generator parameters per resolution are those LRA's builders list
(lra_benchmarks/data/pathfinder.py) with contour length 14 (the "hard" split; 6 and 9 are the
easy and intermediate ones). Model and schedule follow the LRA repo's image configs
(pathfinder32: 1 layer, 4 heads, width 128, MLP 128, dropout 0.2, batch 512, 200 epochs of 160k
images, cosine decay after a one-epoch warmup, lr 1e-3, no weight decay). Generating the 200k
images of one resolution takes about 2-3 hours on one core (32x32) and is cached.
"""

from experiments.configs.common import base_config

TRAIN_EXAMPLES, EVAL_EXAMPLES, EPOCHS = 160_000, 20_000, 200
# Per resolution: generator parameters, then model and batch size from the LRA configs.
_IMAGES = {
    32: dict(paddle_length=2, paddle_margin=1, paddle_thickness=0.5, marker_radius=1.5, continuity=1.0,
             num_distractors=20 // (14 // 3)),
    64: dict(paddle_length=5, paddle_margin=1, paddle_thickness=1.0, marker_radius=2.5, continuity=1.8,
             num_distractors=int(22 / (14 / 3))),
    128: dict(paddle_length=5, paddle_margin=2, paddle_thickness=1.5, marker_radius=3.0, continuity=1.8,
              num_distractors=int(35 / (14 / 3))),
}
_MODELS = {
    32: dict(width=128, num_heads=4, dropout_rate=0.2, position="sinusoidal", batch_size=512, grad_clip_norm=0.0),
    64: dict(width=128, num_heads=4, dropout_rate=0.2, position="sinusoidal", batch_size=512, grad_clip_norm=0.0),
    128: dict(width=32, num_heads=2, dropout_rate=0.1, position="learned", batch_size=64, grad_clip_norm=1.0),
}


def get_config(resolution: str = "32"):
  size = int(resolution)
  if size not in _IMAGES:
    raise ValueError(f"resolution={resolution!r} is not valid; choose one of {sorted(_IMAGES)}")
  config = base_config()
  task = config.task
  task.name = "pathfinder"
  task.seed = 0
  task.num_train = TRAIN_EXAMPLES
  task.num_valid = EVAL_EXAMPLES
  task.num_test = EVAL_EXAMPLES
  task.resolution = size
  task.contour_length = 14
  task.distractor_length = 14 // 3
  task.padding = 1
  task.antialias_scale = 2
  task.update(_IMAGES[size])

  model_sizes = dict(_MODELS[size])
  batch_size, clip = model_sizes.pop("batch_size"), model_sizes.pop("grad_clip_norm")
  model = config.model
  model.num_layers = 1
  # LRA's MLP is qkv_dim * 2 = width.
  model.mlp_ratio = 1.0
  model.pooling = "mean"
  model.update(model_sizes)

  steps_per_epoch = TRAIN_EXAMPLES // batch_size
  train = config.train
  train.batch_size = batch_size
  train.num_steps = steps_per_epoch * EPOCHS
  train.learning_rate = 1e-3
  train.warmup_steps = steps_per_epoch
  train.end_lr_ratio = 0.0
  train.weight_decay = 0.0
  train.grad_clip_norm = clip
  train.eval_every = steps_per_epoch
  train.checkpoint_every = steps_per_epoch
  return config
