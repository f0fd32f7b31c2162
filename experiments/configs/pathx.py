"""Path-X: Pathfinder at 128x128 (16384 pixel tokens), with the LRA repo's pathfinder128 config."""

from experiments.configs import pathfinder


def get_config():
  return pathfinder.get_config("128")
