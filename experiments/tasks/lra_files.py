"""Loads the official Long Range Arena release files, for users who have them (lra_release.gz).

kind="listops": `{prefix}_train.tsv`, `{prefix}_val.tsv`, `{prefix}_test.tsv` in data_dir, a header
  `Source<TAB>Target` and expressions like `( ( [MAX 2 9 ) ] )`; tokens as in tasks/listops.py
  (parentheses dropped).
kind="text": `{prefix}_train.tsv`, `_val`, `_test`, rows `label<TAB>text` (an optional header row is
  skipped); byte-level tokens (utf-8 byte + 1; 0 is padding).
kind="retrieval": `new_aan_pairs.train.tsv`, `.eval.tsv`, `.test.tsv`, rows
  `label<TAB>id1<TAB>id2<TAB>text1<TAB>text2`; the two documents, byte-level and each cut at max_length,
  are joined by a separator token into one sequence (LRA encodes them in two towers instead).
kind="pathfinder": data_dir/metadata/*.npy, text lines `<subdir> <file> <index> <label> ...`, naming
  grayscale PNGs data_dir/<subdir>/<file>; split 80/10/10 in metadata order, as LRA does.
Sequences longer than max_length are cut; shorter ones are right-padded.
"""

import csv
import struct
import sys
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from experiments.tasks import listops
from experiments.tasks.base import SPLITS, Split, TaskData, pad_sequences

KINDS = ("listops", "text", "retrieval", "pathfinder")
BYTE_VOCAB = 257
# Joins the two documents of a retrieval pair: the first id past the 256 byte tokens.
SEPARATOR = 257
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rows(path: Path) -> list[list[str]]:
  if not path.exists():
    raise FileNotFoundError(f"LRA file {path} is missing")
  csv.field_size_limit(sys.maxsize)
  with open(path, newline="", encoding="utf-8") as f:
    return [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]


def _bytes(text: str, max_length: int) -> np.ndarray:
  return np.frombuffer(text.encode("utf-8"), np.uint8)[:max_length].astype(np.int32) + 1


def _classification(sequences: list[np.ndarray], labels: list[int], max_length: int) -> Split:
  inputs, lengths = pad_sequences([s[:max_length] for s in sequences], max_length)
  return Split(inputs, lengths, np.array(labels, np.int32))


def load_listops(data_dir: Path, prefix: str, max_length: int) -> dict[str, Split]:
  splits = {}
  for name, suffix in zip(SPLITS, ("train", "val", "test")):
    rows = _rows(data_dir / f"{prefix}_{suffix}.tsv")[1:]
    tokens = [np.array([listops.TOKEN_ID[t] for t in source.split() if t not in "()"], np.int32) for source, _ in rows]
    splits[name] = _classification(tokens, [int(target) for _, target in rows], max_length)
  return splits


def load_text(data_dir: Path, prefix: str, max_length: int) -> dict[str, Split]:
  splits = {}
  for name, suffix in zip(SPLITS, ("train", "val", "test")):
    rows = [row for row in _rows(data_dir / f"{prefix}_{suffix}.tsv") if row[0].lstrip("-").isdigit()]
    splits[name] = _classification([_bytes(text, max_length) for _, text in rows], [int(r[0]) for r in rows],
                                   max_length)
  return splits


def load_retrieval(data_dir: Path, max_length: int) -> dict[str, Split]:
  splits = {}
  for name, suffix in zip(SPLITS, ("train", "eval", "test")):
    rows = _rows(data_dir / f"new_aan_pairs.{suffix}.tsv")
    pairs = [np.concatenate([_bytes(r[3], max_length), [SEPARATOR], _bytes(r[4], max_length)]) for r in rows]
    splits[name] = _classification(pairs, [int(float(r[0])) for r in rows], 2 * max_length + 1)
  return splits


def decode_png(data: bytes) -> np.ndarray:
  """8-bit, non-interlaced PNG -> uint8 [H, W] (the first channel: gray, or red of RGB/RGBA)."""
  if data[:8] != _PNG_SIGNATURE:
    raise ValueError("not a PNG file")
  offset, chunks, header = 8, [], None
  while offset < len(data):
    (length,), kind = struct.unpack(">I", data[offset : offset + 4]), data[offset + 4 : offset + 8]
    body = data[offset + 8 : offset + 8 + length]
    offset += 12 + length
    if kind == b"IHDR":
      header = struct.unpack(">IIBBBBB", body)
    elif kind == b"IDAT":
      chunks.append(body)
    elif kind == b"IEND":
      break
  width, height, depth, color, _, _, interlace = header
  channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)
  if depth != 8 or channels is None or interlace:
    raise ValueError(f"unsupported PNG (bit depth {depth}, color type {color}, interlace {interlace})")
  raw = np.frombuffer(zlib.decompress(b"".join(chunks)), np.uint8).reshape(height, 1 + width * channels)
  return _unfilter(raw, channels)[:, ::channels]


def _unfilter(raw: np.ndarray, bpp: int) -> np.ndarray:
  """Undoes the per-row PNG filters (None, Sub, Up, Average, Paeth) -> [H, W * bpp] uint8.

  None, Sub and Up are vectorised per row; Average and Paeth depend on the pixel just decoded and
  run pixel by pixel.
  """
  height, stride = raw.shape[0], raw.shape[1] - 1
  out = np.zeros((height, stride), np.int64)
  previous = np.zeros(stride, np.int64)
  for y in range(height):
    kind, line = raw[y, 0], raw[y, 1:].astype(np.int64)
    if kind == 0:
      row = line
    elif kind == 1:
      row = np.cumsum(line.reshape(-1, bpp), axis=0).reshape(-1)
    elif kind == 2:
      row = line + previous
    else:
      row = np.zeros(stride, np.int64)
      for x in range(stride):
        left = row[x - bpp] if x >= bpp else 0
        up, up_left = previous[x], (previous[x - bpp] if x >= bpp else 0)
        if kind == 3:
          predictor = (left + up) // 2
        else:
          p = left + up - up_left
          pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
          predictor = left if pa <= pb and pa <= pc else (up if pb <= pc else up_left)
        row[x] = (line[x] + predictor) & 0xFF
    row = row & 0xFF
    out[y], previous = row, row
  return out.astype(np.uint8)


def load_pathfinder(data_dir: Path) -> dict[str, Split]:
  metadata = sorted((data_dir / "metadata").glob("*.npy"), key=lambda p: (len(p.stem), p.stem))
  if not metadata:
    raise FileNotFoundError(f"no metadata/*.npy files under {data_dir}")
  images, labels = [], []
  for path in metadata:
    for line in path.read_text().splitlines():
      fields = line.split(" ")
      images.append(decode_png((data_dir / fields[0] / fields[1]).read_bytes()).reshape(-1))
      labels.append(int(fields[3]))
  images, labels = np.stack(images), np.array(labels, np.int32)
  cuts = [int(0.8 * len(labels)), int(0.9 * len(labels))]
  lengths = np.full(len(labels), images.shape[1], np.int32)
  parts = zip(np.split(images, cuts), np.split(lengths, cuts), np.split(labels, cuts))
  return {name: Split(*part) for name, part in zip(SPLITS, parts)}


def build(params: Mapping[str, Any], cache_dir) -> TaskData:
  """params: kind, data_dir, prefix (listops/text file prefix), max_length."""
  del cache_dir  # the files are the data; nothing is generated
  kind, data_dir, max_length = params["kind"], Path(params["data_dir"]), int(params["max_length"])
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r} is not valid; choose one of {', '.join(KINDS)}")
  if not params["data_dir"]:
    raise ValueError("lra_files needs task.data_dir: the directory holding the LRA release files")
  if kind == "listops":
    return TaskData("lra_listops", "classification", len(listops.VOCAB), listops.NUM_CLASSES,
                    load_listops(data_dir, params["prefix"], max_length))
  if kind == "text":
    return TaskData("lra_text", "classification", BYTE_VOCAB, 2, load_text(data_dir, params["prefix"], max_length))
  if kind == "retrieval":
    return TaskData("lra_retrieval", "classification", BYTE_VOCAB + 1, 2, load_retrieval(data_dir, max_length))
  return TaskData("lra_pathfinder", "classification", 256, 2, load_pathfinder(data_dir))
