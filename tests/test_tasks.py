"""Task generators and loaders: deterministic, and each matches its specification."""

import struct
import zlib

import numpy as np
import pytest

from efficient_attention import config_class, variant_names
from experiments import modeling
from experiments.configs import listops_small, mqar as mqar_config
from experiments.data import DataPosition, TrainStream, eval_batches
from experiments.tasks import build_task, bytes_lm, induction_heads, listops, lra_files, mqar, pathfinder
from experiments.tasks import selective_copy
from experiments.tasks.base import TaskData
from experiments.tasks.cache import cached_arrays
from experiments.trainer import train_and_evaluate

LISTOPS = dict(name="listops", seed=0, num_train=300, num_valid=50, num_test=50, max_depth=4, max_args=4,
               min_length=5, max_length=40)


def evaluate_tokens(tokens: list[str]) -> int:
  """Evaluates a ListOps token sequence with a stack, independently of the generator's trees."""
  stack: list[list] = [[]]
  for token in tokens:
    if token.startswith("["):
      stack.append([token])
    elif token == "]":
      op, *args = stack.pop()
      ordered = sorted(args)
      middle = len(ordered) // 2
      value = {
          "[MIN": ordered[0],
          "[MAX": ordered[-1],
          # The integer part of the median: the mean of the two middle values when there are two.
          "[MED": ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) // 2,
          "[SM": sum(args) % 10,
      }[op]
      stack[-1].append(value)
    else:
      stack[-1].append(int(token))
  (value,) = stack[0]
  return value


def nesting(tokens: list[str]) -> int:
  """Deepest number of open operators."""
  return int(max(np.cumsum([1 if t.startswith("[") else -1 if t == "]" else 0 for t in tokens])))


def decode(split, i) -> list[str]:
  return [listops.VOCAB[t] for t in split.inputs[i, : split.lengths[i]]]


def test_listops_labels_are_the_values_of_the_expressions(tmp_path):
  task = build_task(LISTOPS, tmp_path)
  assert (task.kind, task.vocab_size, task.num_classes) == ("classification", 16, 10)
  seen = set()
  for name, split in task.splits.items():
    assert len(split) == LISTOPS[f"num_{name}"]
    assert split.seq_len == LISTOPS["max_length"]
    assert np.all((split.lengths > LISTOPS["min_length"]) & (split.lengths < LISTOPS["max_length"]))
    assert np.all(split.inputs[np.arange(split.seq_len)[None] >= split.lengths[:, None]] == 0)
    for i in range(len(split)):
      tokens = decode(split, i)
      assert evaluate_tokens(tokens) == split.targets[i], tokens
      seen.add(tuple(tokens))
  # Expressions are distinct, so no test expression also appears in training.
  assert len(seen) == sum(len(s) for s in task.splits.values())
  # Nesting reaches the depth limit but not beyond: depth = max number of open brackets.
  depths = [nesting(decode(split, i)) for split in task.splits.values() for i in range(len(split))]
  assert max(depths) == LISTOPS["max_depth"] - 1


def test_listops_is_deterministic_and_seeded(tmp_path):
  a = build_task(LISTOPS, tmp_path / "a").splits["train"]
  b = build_task(LISTOPS, tmp_path / "b").splits["train"]
  c = build_task({**LISTOPS, "seed": 1}, tmp_path / "a").splits["train"]
  np.testing.assert_array_equal(a.inputs, b.inputs)
  np.testing.assert_array_equal(a.targets, b.targets)
  assert not np.array_equal(a.inputs, c.inputs)


def test_cache_builds_once(tmp_path):
  calls = []

  def build():
    calls.append(1)
    return {"x": np.arange(3)}

  first = cached_arrays(tmp_path, "t", 1, {"a": 1}, build)
  second = cached_arrays(tmp_path, "t", 1, {"a": 1}, build)
  cached_arrays(tmp_path, "t", 2, {"a": 1}, build)
  np.testing.assert_array_equal(first["x"], second["x"])
  assert len(calls) == 2 and not list(tmp_path.glob("*.tmp"))


def test_mqar_queries_recall_their_values():
  split = mqar.generate(np.random.default_rng(0), 64, 64, vocab_size=128, num_kv_pairs=8)
  for inputs, targets, weights in zip(split.inputs, split.targets, split.weights):
    keys, values = inputs[0:16:2], inputs[1:16:2]
    assert len(set(keys)) == 8 and np.all((1 <= keys) & (keys < 64)) and np.all((64 <= values) & (values < 128))
    queries = np.flatnonzero(weights)
    assert len(queries) == 8 and np.all(queries >= 16) and np.all((queries - 16) % 2 == 0)
    pairs = dict(zip(keys, values))
    assert sorted(inputs[queries]) == sorted(keys)
    assert all(targets[q] == pairs[inputs[q]] for q in queries)


def test_mqar_task_trains_with_separate_test_length(tmp_path):
  config = mqar_config.get_config()
  config.cache_dir = str(tmp_path / "cache")
  config.task.update(num_train=64, num_valid=16, num_test=16, vocab_size=64, train_seq_len=32, test_seq_len=64,
                     num_kv_pairs=4, test_num_kv_pairs=8)
  config.model.update(width=16, num_layers=1, num_heads=2)
  config.train.update(batch_size=8, num_steps=2, log_every=1, eval_every=2, checkpoint_every=2, warmup_steps=1)
  results = train_and_evaluate(config, tmp_path / "run")
  resolved = (tmp_path / "run" / "config.json").read_text()
  assert '"max_len": 64' in resolved
  assert np.isfinite(results["test"]["bits_per_token"])
  task = build_task(config.task, config.cache_dir)
  assert task.splits["train"].seq_len == 32 and task.splits["test"].seq_len == 64
  assert int(task.splits["test"].weights.sum(axis=1).max()) == 8


def test_selective_copy_targets_are_the_data_tokens_in_order():
  split = selective_copy.generate(np.random.default_rng(0), 32, 50, vocab_size=10, num_tokens=6)
  assert split.seq_len == 56
  for inputs, targets, weights in zip(split.inputs, split.targets, split.weights):
    context = inputs[:50]
    data = context[context != selective_copy.NOISE]
    assert len(data) == 6 and np.all(data >= selective_copy.FIRST_DATA)
    assert np.all(inputs[50:] == selective_copy.MARKER)
    np.testing.assert_array_equal(targets[50:], data)
    np.testing.assert_array_equal(np.flatnonzero(weights), np.arange(50, 56))


def test_induction_heads_answer_follows_the_first_trigger():
  split = induction_heads.generate(np.random.default_rng(0), 64, 20, vocab_size=8)
  for inputs, targets, weights in zip(split.inputs, split.targets, split.weights):
    triggers = np.flatnonzero(inputs == induction_heads.TRIGGER)
    assert len(triggers) == 2 and triggers[1] == 19 and triggers[0] <= 17
    assert targets[19] == inputs[triggers[0] + 1] and np.flatnonzero(weights).tolist() == [19]


def test_bytes_lm_windows_predict_the_next_byte_and_split_by_file(tmp_path):
  root = tmp_path / "lib"
  files = {f"pkg/m{i}.py": f"# module {i}\nx = {i}\n".encode() * 20 for i in range(40)}
  files["site-packages/skip.py"] = b"never read"
  for name, body in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(body)
  params = dict(name="bytes_lm", root=str(root), seq_len=16, max_train_bytes=0, max_valid_bytes=0, max_test_bytes=0)
  task = build_task(params, tmp_path / "cache")
  assert task.requires_causal and task.token_unit == "byte"
  streams = bytes_lm.corpus(root, {"train": 0, "valid": 0, "test": 0})
  for name, split in task.splits.items():
    expected = b"".join(body for path, body in sorted(files.items())
                        if not path.startswith("site-") and bytes_lm.split_of(path) == name)
    assert streams[name].tobytes() == expected
    flat = split.inputs.reshape(-1)
    np.testing.assert_array_equal(flat, streams[name][: flat.size])
    np.testing.assert_array_equal(split.targets[:, :-1], split.inputs[:, 1:])
    np.testing.assert_array_equal(split.targets[:-1, -1], split.inputs[1:, 0])
  assert {bytes_lm.split_of(p) for p in files} == {"train", "valid", "test"}


def test_bytes_lm_finds_the_standard_library():
  names = {p.name for p in bytes_lm.source_files(bytes_lm.stdlib_dir())}
  assert {"os.py", "functools.py"} <= names


PATHFINDER = dict(resolution=16, contour_length=5, distractor_length=2, num_distractors=3, paddle_length=2,
                  paddle_margin=1, paddle_thickness=1.0, marker_radius=1.5, continuity=1.0, padding=1,
                  antialias_scale=2)


@pytest.mark.parametrize("label", [0, 1])
def test_pathfinder_markers_sit_on_the_ends_of_one_or_two_contours(label):
  rng = np.random.default_rng(label)
  for _ in range(3):
    image, info = pathfinder.generate_image(rng, label, PATHFINDER)
    assert image.shape == (16, 16) and image.dtype == np.uint8
    first, second = info["snakes"]
    assert len(first) == len(second) == PATHFINDER["contour_length"]
    # Consecutive paddles of a contour are one gap apart: each contour is one dashed line.
    for snake in (first, second):
      gaps = [np.linalg.norm(b_next[0] - a[1]) for a, b_next in zip(snake, snake[1:])]
      np.testing.assert_allclose(gaps, PATHFINDER["paddle_margin"], rtol=1e-5)
    end = second[-1][1] if label == 0 else first[-1][1]
    np.testing.assert_allclose(info["markers"], [first[0][0], end])
    for x, y in info["markers"]:
      assert image[int(y), int(x)] > 128


def test_pathfinder_split_is_balanced_and_deterministic(tmp_path):
  params = dict(name="pathfinder", seed=0, num_train=20, num_valid=4, num_test=4, **PATHFINDER)
  a, b = build_task(params, tmp_path / "a"), build_task(params, tmp_path / "b")
  np.testing.assert_array_equal(a.splits["train"].inputs, b.splits["train"].inputs)
  assert a.splits["train"].targets.sum() == 10 and a.splits["train"].seq_len == 256


def png(image: np.ndarray, filters: list[int]) -> bytes:
  """Encodes a grayscale uint8 image with the given filter type per row (the PNG spec's predictors)."""
  height, width = image.shape
  rows, previous = [], np.zeros(width, np.int64)
  for y in range(height):
    row = image[y].astype(np.int64)
    left = np.concatenate([[0], row[:-1]])
    up_left = np.concatenate([[0], previous[:-1]])
    kind = filters[y % len(filters)]
    if kind == 4:
      p = left + previous - up_left
      pa, pb, pc = np.abs(p - left), np.abs(p - previous), np.abs(p - up_left)
      predictor = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, previous, up_left))
    else:
      predictor = [np.zeros(width, np.int64), left, previous, (left + previous) // 2][kind]
    rows.append(bytes([kind]) + ((row - predictor) % 256).astype(np.uint8).tobytes())
    previous = row

  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

  header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return (lra_files._PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
          + chunk(b"IEND", b""))


def test_png_decoder_undoes_every_filter():
  image = np.random.default_rng(0).integers(0, 256, (7, 9), dtype=np.uint8)
  np.testing.assert_array_equal(lra_files.decode_png(png(image, [0, 1, 2, 3, 4])), image)


def test_lra_files_load_the_release_formats(tmp_path):
  expressions, labels = listops.generate(seed=3, num_examples=9, max_depth=3, max_args=3, min_length=0,
                                         max_length=30)

  def lra_string(tokens):  # LRA's TSV form: every operator application wrapped in parentheses
    return "( " + " ( ".join(tokens[:-1]) + " )" * (len(tokens) - 1) + " " + tokens[-1] + " )"

  for suffix, part in (("train", slice(0, 3)), ("val", slice(3, 6)), ("test", slice(6, 9))):
    rows = "".join(f"{lra_string(e)}\t{y}\n" for e, y in zip(expressions[part], labels[part]))
    (tmp_path / f"basic_{suffix}.tsv").write_text("Source\tTarget\n" + rows)
    (tmp_path / f"imdb_{suffix}.tsv").write_text("label\ttext\n1\tgreat film\n0\tdull\n")
  for suffix in ("train", "eval", "test"):
    (tmp_path / f"new_aan_pairs.{suffix}.tsv").write_text("1.0\tid1\tid2\tabc\tde\n0.0\tid3\tid4\tx\ty\n")
  images = np.random.default_rng(1).integers(0, 256, (10, 4, 4), dtype=np.uint8)
  (tmp_path / "imgs" / "0").mkdir(parents=True)
  (tmp_path / "metadata").mkdir()
  lines = []
  for i, image in enumerate(images):
    (tmp_path / "imgs" / "0" / f"sample_{i}.png").write_bytes(png(image, [i % 5]))
    lines.append(f"imgs/0 sample_{i}.png {i} {i % 2} 1.0 14 4\n")
  (tmp_path / "metadata" / "0.npy").write_text("".join(lines))

  def load(kind, max_length, prefix=""):
    params = dict(name="lra_files", kind=kind, data_dir=str(tmp_path), prefix=prefix, max_length=max_length)
    return build_task(params, None)

  task = load("listops", 40, "basic")
  for name, part in (("train", slice(0, 3)), ("test", slice(6, 9))):
    split = task.splits[name]
    assert [decode(split, i) for i in range(3)] == expressions[part]
    np.testing.assert_array_equal(split.targets, labels[part])
  text = load("text", 5, "imdb").splits["valid"]
  assert text.inputs[0].tolist() == [ord(c) + 1 for c in "great"] and text.targets.tolist() == [1, 0]
  pair = load("retrieval", 2).splits["test"]
  assert pair.inputs[0, :5].tolist() == [ord("a") + 1, ord("b") + 1, lra_files.SEPARATOR, ord("d") + 1, ord("e") + 1]
  assert pair.targets.tolist() == [1, 0]
  paths = load("pathfinder", 16).splits
  assert [len(paths[n]) for n in ("train", "valid", "test")] == [8, 1, 1]
  np.testing.assert_array_equal(paths["train"].inputs, images[:8].reshape(8, -1))
  np.testing.assert_array_equal(paths["test"].targets, [1])


def test_direction_follows_what_the_variant_supports(tmp_path):
  task = build_task(dict(LISTOPS, num_train=20, num_valid=5, num_test=5), tmp_path)
  model = listops_small.get_config().model
  for name in variant_names():
    model.variant = name
    decoder, why = modeling.decoder_config(model, task, seed=0)
    assert decoder.causal == (not config_class(name).supports_bidirectional)
    if decoder.causal:
      assert decoder.pooling == "last" and "causal only" in why
  bidirectional_only = [n for n in variant_names() if not config_class(n).supports_causal]
  if not bidirectional_only:
    pytest.skip("no bidirectional-only variant is registered")
  language_modelling = TaskData("lm", "tokens", 16, 16, task.splits, requires_causal=True)
  model.variant = bidirectional_only[0]
  with pytest.raises(ValueError, match="needs a causal model"):
    modeling.decoder_config(model, language_modelling, seed=0)


def test_train_stream_resumes_at_its_position_and_covers_each_epoch(tmp_path):
  split = build_task(dict(LISTOPS, num_train=50), tmp_path).splits["train"]
  stream = TrainStream(split, 8, seed=0)
  batches = [next(stream) for _ in range(9)]
  # 50 distinct examples in batches of 8: six batches (48 distinct rows) per epoch, then a new permutation.
  assert len({row.tobytes() for b in batches[:6] for row in b["inputs"]}) == 48
  assert stream.position == DataPosition(1, 24)
  interrupted = TrainStream(split, 8, seed=0)
  for _ in range(4):
    next(interrupted)
  resumed = TrainStream(split, 8, seed=0, position=DataPosition.from_json(interrupted.position.to_json()))
  for batch in batches[4:]:
    np.testing.assert_array_equal(next(resumed)["inputs"], batch["inputs"])
  evaluated = list(eval_batches(split, 16))
  assert len(evaluated) == 4 and sum(b["weights"].sum() for b in evaluated) == 50
