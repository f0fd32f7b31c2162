"""Training and evaluation on long-range tasks: `python -m experiments.train --variant=performer`.

train.py      the absl command line (flags, config file and overrides) around trainer.train_and_evaluate
trainer.py    the loop: jitted AdamW steps, periodic evaluation, final test, NaN/Inf stop, resume
modeling.py   task + `model` config section -> DecoderConfig (encoder or causal per variant)
optim.py      learning-rate schedules and the optimizer
data.py       resumable shuffled batches, padded eval batches, sharding over the device mesh
checkpoint.py orbax checkpoints of model, optimizer and data position
metrics.py    metrics.jsonl, TensorBoard event files, the progress bar
configs/      one ml_collections config per task (`--task=<name>`)
tasks/        generated (seeded, cached) and file-loaded tasks
"""
