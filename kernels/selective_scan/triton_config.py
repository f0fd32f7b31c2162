"""Tile sizes of the Triton-language selective scan (`triton.py`), importable where triton is not installed.

`triton.py` imports triton at the top, so the tile dataclass lives here: `api.py`, the benchmark and the tests
build and validate `BlockSizes` on any machine, and only a GPU run imports the kernels.
"""

import dataclasses

# State elements (padded N x block_d) per token of a forward tile in the defaults: 128, so a [chunk, N, block_d]
# tile at chunk = 16 holds 2K fp32 values, 64 per thread at 1 warp. Profiled on an H200 (ncu, B=4, L=8K,
# Dm=1536, N=16, bf16), the former 64 (block_d = 4) was bound by the L1/shared-memory pipe (86% busy): Triton spreads
# a tile's channels over lanes first and the states over the rest, so at 4 channels the sum over N for y crossed 8
# lanes (1.5 shuffles per tile element) and each token's 4-channel rows were 8-byte loads (3.3 L1 operations per
# element in all). At 8 channels the sum crosses 4 lanes and the rows are 16-byte loads: 1.8 L1 operations per
# element, 168 registers, half the programs (768 one-warp programs, all resident), and the forward took 0.97 ms
# against 1.24-1.31 in the same run (benchmarks/results/selective_scan_tiles.md).
_DEFAULT_STATE_ELEMENTS = 128
# The backward's: 64 (block_d_bwd = 4 at N = 16) with chunk_bwd = 8 and 1 warp, 16 values per thread per tile, 157
# registers, 1536 programs. Its wider tiles leave fewer warps to hide latency behind (the former 128, block_d_bwd
# = 8, compiled to 254 registers for its 768 programs, 1.5 warps per scheduler) and the L1 pipe was 79% busy either
# way; a narrower block doubles the dB/dC partials ([B, L, Dm / block_d_bwd, N] fp32), which `atomic_bc` avoids.
# Timed on an H200 in the same runs: benchmarks/results/selective_scan_tiles.md.
_DEFAULT_STATE_ELEMENTS_BWD = 64


def _power_of_two(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1 and value & (value - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles [chunk, N, block_d] and launch parameters of the forward and backward kernels.

  Each program owns block_d channels of one batch row and walks L in chunks: a chunk's tokens are scanned in
  parallel (tl.associative_scan along the token axis) and the state is carried from chunk to chunk. The
  backward runs its own tiles: it recomputes states from checkpoints the forward writes every `chunk_bwd`
  tokens, so the two chunk lengths are independent.
  """

  block_d: int = 8  # channels per forward program: B * Dm / block_d programs (768 at B=4, Dm=1536)
  chunk: int = 16  # tokens per forward tile (scanned in parallel)
  num_warps: int = 1
  num_stages: int = 2  # software pipelining of the chunk loop's loads (1: none)
  # The forward loads the next chunk's inputs before scanning the current one (registers carry them), where the
  # pipeliner that num_stages drives leaves these loads unpipelined. Measured at the former tiles (block_d = 4:
  # 1.62 -> 1.13 ms bf16, commit 8c7c45e); at the current ones it costs no registers (168 either way).
  prefetch: bool = True
  # Backward: more live tiles (states, decays, the reverse scan and the state cotangents), and dB/dC are written
  # as one fp32 partial per program and channel block ([B, L, Dm / block_d_bwd, N]), so a wider block_d halves
  # that traffic; chunk_bwd is also the checkpoint interval ([B, ceil(L / chunk_bwd), Dm, N] fp32 saved states).
  block_d_bwd: int = 4
  chunk_bwd: int = 8
  num_warps_bwd: int = 1
  # dB/dC by fp32 atomic adds into one [B, L, G, N] buffer instead of the deterministic per-block partials (not
  # bitwise reproducible: the order of the additions varies from run to run).
  atomic_bc: bool = False

  @classmethod
  def get_default(cls, padded_state_size: int = 16) -> "BlockSizes":
    """The field defaults, chosen for B=4, L=8K, Dm=1536, N=16 on an H200 (768 forward and 1536 backward
    programs; tiles compiled for sm_90 to count registers and the L1 operations per element, profiled with ncu
    and timed), with block_d scaled so that block_d x N stays at 128 (forward) and 64 (backward) state elements
    for other N (a power of two). Prefetching only up to N = 16: its carried B/C rows grow with N (at N = 64 the
    former forward tiles compiled to 255 registers instead of 165, half the warps per SM), and larger N means
    more, narrower programs that hide load latency by occupancy. `experiments/bench/selective_scan.py
    --triton_blocks` times alternatives."""
    return cls(block_d=max(1, _DEFAULT_STATE_ELEMENTS // padded_state_size),
               block_d_bwd=max(1, _DEFAULT_STATE_ELEMENTS_BWD // padded_state_size),
               prefetch=padded_state_size <= 16)

  def fitted(self, channels_per_group: int) -> "BlockSizes":
    """Halves block_d and block_d_bwd until they divide Dm / G, so a program's channels share one B/C group."""
    fit = lambda b: b if channels_per_group % b == 0 else fit(b // 2)
    return dataclasses.replace(self, block_d=fit(self.block_d), block_d_bwd=fit(self.block_d_bwd))

  def validate(self, channels_per_group: int) -> None:
    """Raises ValueError naming the first field that Triton (power-of-two tiles) or the layout cannot take."""
    for name in ("block_d", "chunk", "block_d_bwd", "chunk_bwd", "num_warps", "num_warps_bwd"):
      if not _power_of_two(getattr(self, name)):
        raise ValueError(f"block_sizes.{name}={getattr(self, name)!r} is not valid; it must be a power of two")
    if not isinstance(self.num_stages, int) or isinstance(self.num_stages, bool) or self.num_stages < 1:
      raise ValueError(f"block_sizes.num_stages={self.num_stages!r} is not valid; it must be a positive int")
    for name in ("atomic_bc", "prefetch"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"block_sizes.{name}={getattr(self, name)!r} is not valid; it must be a bool")
    for name in ("block_d", "block_d_bwd"):
      if channels_per_group % getattr(self, name):
        raise ValueError(f"block_sizes.{name}={getattr(self, name)} is not valid; it must divide "
                         f"Dm / G = {channels_per_group}")
