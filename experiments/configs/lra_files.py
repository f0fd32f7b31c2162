"""The official LRA release files (set task.data_dir), with the LRA repo's model sizes per task.

`--config=experiments/configs/lra_files.py:<kind>` with kind listops (default), text, retrieval or
pathfinder, e.g.
  python -m experiments.train --config=experiments/configs/lra_files.py:text \\
      --config.task.data_dir=/data/lra_release/imdb
"""

from experiments.configs import listops, pathfinder
from experiments.configs.common import base_config


def get_config(kind: str = "listops"):
  if kind == "listops":
    config = listops.get_config()
    max_length, prefix = 2000, "basic"
  elif kind == "pathfinder":
    config = pathfinder.get_config("32")
    max_length, prefix = 1024, ""
  elif kind in ("text", "retrieval"):
    config = base_config()
    # lra_benchmarks/{text_classification,matching}/configs: 4 layers, batch 32, rsqrt schedule
    # (0.05, warmup 8000), weight decay 0.1; text width 256 / MLP 1024 over 1000 bytes, 20k steps;
    # retrieval width 128 / MLP 512 over 4000 bytes per document, 5k steps.
    text = kind == "text"
    config.model.update(width=256 if text else 128, num_layers=4, num_heads=4, mlp_ratio=4.0)
    config.train.update(batch_size=32, num_steps=20_000 if text else 5_000, schedule="rsqrt", learning_rate=0.05,
                        warmup_steps=8_000, weight_decay=0.1, grad_clip_norm=0.0, eval_every=1_000,
                        checkpoint_every=1_000)
    max_length, prefix = (1000, "imdb") if text else (4000, "")
  else:
    raise ValueError(f"kind={kind!r} is not valid; choose one of listops, text, retrieval, pathfinder")
  config.task = base_config().task
  config.task.name = "lra_files"
  config.task.kind = kind
  # Directory holding the release files of this kind (see experiments/tasks/lra_files.py).
  config.task.data_dir = ""
  config.task.prefix = prefix
  config.task.max_length = max_length
  return config
