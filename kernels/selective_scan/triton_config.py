"""Tile sizes of the Triton-language selective scan (`triton.py`), importable where triton is not installed.

`triton.py` imports triton at the top, so the tile dataclass lives here: `api.py`, the benchmark and the tests
build and validate `BlockSizes` on any machine, and only a GPU run imports the kernels.
"""

import dataclasses

# State elements (padded N x block_d) per token of a forward tile in the defaults: 64, so a [chunk, N, block_d]
# tile holds 1K fp32 values at chunk = 16, 32 registers per thread per live tile at 1 warp.
_DEFAULT_STATE_ELEMENTS = 64
# The backward's: 128 (block_d_bwd = 8 at N = 16) with chunk_bwd = 8 and 1 warp, also 32 values per thread per
# tile. Triton spreads a tile's channels over lanes first and the states over the rest, so the tile shape decides
# the cost of the sums over channels (dB, dC) and over states (y, dx, d(delta)). Compiled for sm_90 (B=4,
# L=8K, Dm=1536, N=16, per tile element): 7.6 shuffles, 2.4 shared-memory accesses, 28 FP32 instructions, 254
# registers, no spills (bf16 too, its loads widened in their own layout), against 11.2 / 6.6 / 36.8 and 255
# registers (bf16: 188 bytes of spills) for the former 16 channels x 16 tokens over 4 warps, whose state sums
# crossed warps through shared memory. Wider blocks on 2-8 warps or 16 tokens need 9-15 shuffles or spill; 4
# tokens or 4 channels cut registers (150-170) but double the checkpoints or the dB/dC partials
# ([B, L, Dm / block_d_bwd, N] fp32).
# Not yet timed: its 768 one-warp programs (B=4, Dm=1536) all fit on the GPU at once (8 per SM at 254
# registers), but that is half the former's warps, about 1.5 per scheduler.
_DEFAULT_STATE_ELEMENTS_BWD = 128


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

  block_d: int = 4  # channels per forward program: B * Dm / block_d programs (1536 at B=4, Dm=1536)
  chunk: int = 16  # tokens per forward tile (scanned in parallel)
  num_warps: int = 1
  num_stages: int = 2  # software pipelining of the chunk loop's loads (1: none)
  # The forward loads the next chunk's inputs before scanning the current one (registers carry them), where the
  # pipeliner that num_stages drives leaves these loads unpipelined. Costs registers: 112 -> 144 at the defaults.
  prefetch: bool = True
  # Backward: more live tiles (states, decays, the reverse scan and the state cotangents), and dB/dC are written
  # as one fp32 partial per program and channel block ([B, L, Dm / block_d_bwd, N]), so a wider block_d halves
  # that traffic; chunk_bwd is also the checkpoint interval ([B, ceil(L / chunk_bwd), Dm, N] fp32 saved states).
  block_d_bwd: int = 8
  chunk_bwd: int = 8
  num_warps_bwd: int = 1
  # dB/dC by fp32 atomic adds into one [B, L, G, N] buffer instead of the deterministic per-block partials (not
  # bitwise reproducible: the order of the additions varies from run to run).
  atomic_bc: bool = False

  @classmethod
  def get_default(cls, padded_state_size: int = 16) -> "BlockSizes":
    """The field defaults, chosen for B=4, L=8K, Dm=1536, N=16 on an H200 (1536 forward programs; tiles picked
    by compiling for sm_90 and counting registers, shuffles and shared-memory traffic per element; the forward's
    also by timing), with block_d scaled so that block_d x N stays at 64 (forward) and 128 (backward) state
    elements for other N (a power of two). Prefetching only up to N = 16: its carried B/C rows grow with N (at
    N = 64 the forward compiled to 255 registers instead of 165, half the warps per SM), and larger N means more,
    narrower programs that hide load latency by occupancy. `experiments/bench/selective_scan.py --triton_blocks`
    times alternatives."""
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
