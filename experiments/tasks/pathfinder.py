"""Pathfinder (Linsley et al. 2018; LRA's Pathfinder and Path-X): are the two markers on one contour?

Each image shows dashed contours ("snakes": chains of short paddles with small gaps, bending by a
bounded angle between paddles) and two round markers. Label 1: the markers sit on the two ends of
one contour; label 0: on ends of two different contours. Distractor contours fill the rest. The
parameters are those of the original generator as LRA used them (contour length 6/9/14 paddles for
the easy/intermediate/hard splits, distractors of a third of that length, their count, paddle
length, gap, thickness, marker radius, antialiasing by drawing at 2x and averaging). Drawing is
this module's own: the turning angle between paddles is uniform in ±continuity·45°, and contours
may not touch one another (their pixels, dilated by the gap, stay disjoint).
Images are flattened row-major into resolution² pixel tokens (0-255).
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from experiments.tasks.base import SPLITS, Split, TaskData, arrays_to_splits, splits_to_arrays
from experiments.tasks.cache import cached_arrays

VERSION = 1
VOCAB_SIZE = 256
NUM_CLASSES = 2
_MAX_TURN = np.pi / 4
# Placements tried per contour before giving up (targets: start the image again; distractors: skip it).
_ATTEMPTS = 100
_PADDLE_ATTEMPTS = 8


class _Canvas:
  """A supersampled drawing surface with an occupancy mask for keeping contours apart."""

  def __init__(self, size: int):
    self.size = size
    self.ink = np.zeros((size, size), np.float32)
    self.taken = np.zeros((size, size), bool)
    self._ys, self._xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

  def segment(self, a: np.ndarray, b: np.ndarray, radius: float) -> tuple[tuple[slice, slice], np.ndarray]:
    """(region, mask): the pixels of `region` whose centre is within `radius` of the segment a-b ((x, y) points).

    Only the segment's bounding box is computed, which keeps drawing cheap at Path-X resolutions.
    """
    lo = np.maximum(np.floor(np.minimum(a, b) - radius), 0).astype(int)
    hi = np.minimum(np.ceil(np.maximum(a, b) + radius) + 1, self.size).astype(int)
    region = (slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    ys, xs = self._ys[region], self._xs[region]
    d = b - a
    t = np.clip(((xs - a[0]) * d[0] + (ys - a[1]) * d[1]) / max(float(d @ d), 1e-9), 0.0, 1.0)
    mask = (xs - a[0] - t * d[0]) ** 2 + (ys - a[1] - t * d[1]) ** 2 <= radius**2
    return region, mask

  def touches(self, paddles, radius: float) -> bool:
    return any((self.taken[region] & mask).any() for region, mask in (self.segment(a, b, radius) for a, b in paddles))

  def claim(self, paddles, radius: float) -> None:
    for a, b in paddles:
      region, mask = self.segment(a, b, radius)
      self.taken[region] |= mask

  def draw(self, paddles, radius: float) -> None:
    for a, b in paddles:
      region, mask = self.segment(a, b, radius)
      self.ink[region][mask] = 1.0

  def disc(self, centre: np.ndarray, radius: float) -> None:
    """Draws a filled disc (a marker): a zero-length segment is a disc."""
    region, mask = self.segment(centre, centre, radius)
    self.ink[region][mask] = 1.0


def _snake(rng, canvas: _Canvas, num_paddles: int, p: Mapping[str, float]) -> list[np.ndarray] | None:
  """Paddle endpoints [(a, b), ...] of a contour that fits the canvas without touching others, or None.

  The contour grows one paddle at a time; a paddle that would leave the canvas or touch another
  contour is redrawn with a new turn up to _PADDLE_ATTEMPTS times (as the original generator's
  max_paddle_retrial), and the whole contour is restarted elsewhere when that fails.
  """
  margin, halo = p["padding"], p["paddle_thickness"] / 2 + p["paddle_margin"]

  def fits(a, b) -> bool:
    inside = np.all(b >= margin) and np.all(b <= canvas.size - margin)
    return bool(inside) and not canvas.touches([(a, b)], halo)

  for _ in range(_ATTEMPTS):
    point = rng.uniform(margin, canvas.size - margin, 2)
    angle = rng.uniform(0, 2 * np.pi)
    paddles = []
    for i in range(num_paddles):
      for _ in range(_PADDLE_ATTEMPTS):
        turn = rng.uniform(-1.0, 1.0) * p["continuity"] * _MAX_TURN if i else 0.0
        direction = np.array([np.cos(angle + turn), np.sin(angle + turn)])
        start = point + (p["paddle_margin"] * direction if i else 0.0)
        end = start + p["paddle_length"] * direction
        if fits(start, end):
          break
      else:
        break
      paddles.append((start, end))
      angle, point = angle + turn, end
    if len(paddles) == num_paddles:
      canvas.claim(paddles, halo)
      canvas.draw(paddles, p["paddle_thickness"] / 2)
      return paddles
  return None


def generate_image(rng: np.random.Generator, label: int, params: Mapping[str, Any]) -> tuple[np.ndarray, dict]:
  """One image uint8 [resolution, resolution] with the given label, and how it was drawn:
  {"snakes": [paddle endpoints per target contour], "markers": [(x, y), (x, y)] in output pixels}."""
  scale = params["antialias_scale"]
  p = {key: params[key] * scale for key in ("padding", "paddle_length", "paddle_margin", "paddle_thickness")}
  p["continuity"] = params["continuity"]
  size = params["resolution"] * scale
  while True:
    canvas = _Canvas(size)
    targets = [_snake(rng, canvas, params["contour_length"], p) for _ in range(2)]
    if any(snake is None for snake in targets):
      continue
    ends = [targets[0][0][0], targets[0][-1][1]] if label else [targets[0][0][0], targets[1][-1][1]]
    for end in ends:
      canvas.disc(end, params["marker_radius"] * scale)
    for _ in range(params["num_distractors"]):
      _snake(rng, canvas, params["distractor_length"], p)
    image = canvas.ink.reshape(params["resolution"], scale, params["resolution"], scale).mean(axis=(1, 3))
    info = {"snakes": [[(a / scale, b / scale) for a, b in snake] for snake in targets],
            "markers": [end / scale for end in ends]}
    return np.round(image * 255).astype(np.uint8), info


def generate(rng: np.random.Generator, num_examples: int, params: Mapping[str, Any]) -> Split:
  """Balanced labels in random order; images flattened to [N, resolution²]."""
  labels = rng.permutation(np.arange(num_examples) % 2)
  images = np.stack([generate_image(rng, int(label), params)[0].reshape(-1) for label in labels])
  return Split(images, np.full(num_examples, images.shape[1], np.int32), labels.astype(np.int32))


def build(params: Mapping[str, Any], cache_dir) -> TaskData:
  """params: seed, num_train/valid/test, resolution, contour_length, distractor_length, num_distractors,
  paddle_length, paddle_margin, paddle_thickness, marker_radius, continuity, padding, antialias_scale."""
  params = dict(params)

  def make() -> dict[str, np.ndarray]:
    return splits_to_arrays({
        name: generate(np.random.default_rng([int(params["seed"]), i]), int(params[f"num_{name}"]), params)
        for i, name in enumerate(SPLITS)
    })

  arrays = cached_arrays(cache_dir, "pathfinder", VERSION, params, make)
  return TaskData("pathfinder", "classification", VOCAB_SIZE, NUM_CLASSES, arrays_to_splits(arrays))
