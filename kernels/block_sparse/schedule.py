"""Which CTA runs which mask row: a longest-first (LPT) assignment of work items to a fixed number of CTAs.

Block-sparse rows can differ a lot in length (a BigBird global row visits every key tile, its neighbours a handful).
CTAs launch in grid order, so a long row that happens to launch last leaves the rest of the GPU idle while it
finishes. Sorting the items longest first and giving each to the least-loaded CTA bounds that tail; with one CTA
per item it is simply the launch order.
"""

import heapq

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# A row's fixed cost (loading its Q, storing its O, the first product before any overlap) in key tiles.
ITEM_OVERHEAD_TILES = 2
_INTERPRET_CTAS = 4


def lpt_schedule(costs: np.ndarray, num_ctas: int) -> tuple[np.ndarray, np.ndarray]:
  """Greedy longest-processing-time assignment of items to CTAs.

  Args:
    costs: [N] non-negative work per item (e.g. its key tiles plus a per-item overhead).
    num_ctas: how many CTAs share the items (>= 1).

  Returns:
    items int32 [num_ctas, L]: the items each CTA runs, in order (longest first), padded with -1;
    lengths int32 [num_ctas]: how many of its entries are real.
  """
  costs = np.asarray(costs, np.float64).reshape(-1)
  if num_ctas < 1:
    raise ValueError(f"num_ctas={num_ctas} must be at least 1")
  order = np.argsort(-costs, kind="stable")
  if num_ctas >= len(costs) or np.all(costs == costs[0]):
    # Equal costs (or one item per CTA): round robin over the sorted order is exactly LPT, without the heap.
    per_cta = [order[c::num_ctas] for c in range(num_ctas)]
  else:
    per_cta = [[] for _ in range(num_ctas)]
    loads = [(0.0, c) for c in range(num_ctas)]  # (load, cta): ties go to the lower CTA index
    for item in order:
      load, cta = heapq.heappop(loads)
      per_cta[cta].append(item)
      heapq.heappush(loads, (load + costs[item], cta))
  lengths = np.array([len(x) for x in per_cta], np.int32)
  items = np.full((num_ctas, max(1, int(lengths.max(initial=0)))), -1, np.int32)
  for cta, row in enumerate(per_cta):
    items[cta, :len(row)] = row
  return items, lengths


def work_schedule(count: np.ndarray, num_heads: int, batch: int, *, persistent: bool, num_ctas: int | None,
                  interpret: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Items (row, head, batch), numbered (head * R + row) * batch + b, assigned to CTAs longest first.

  count: int [Hm, R] listed tiles per row (Hm = 1: shared by all heads; else Hm = num_heads). persistent: one CTA
  per SM (or `num_ctas`; 4 in interpret mode) running several items each; else one CTA per item.
  """
  count = np.asarray(count)
  count = np.broadcast_to(count, (num_heads, count.shape[-1]))
  costs = np.repeat(count.reshape(-1) + ITEM_OVERHEAD_TILES, batch)
  if not persistent:
    return lpt_schedule(costs, costs.size)
  if num_ctas is None:
    # One CTA per SM: the kernels' shared memory allows no more.
    num_ctas = _INTERPRET_CTAS if interpret else jax.devices()[0].core_count
  return lpt_schedule(costs, min(costs.size, num_ctas))


def item_coordinates(items_ref, cta, i, *, batch: int, rows: int):
  """In a kernel: (batch, head, row) of CTA `cta`'s i-th item in `work_schedule`'s numbering."""
  item = items_ref[cta, i]
  head_row = lax.div(item, jnp.int32(batch))
  return lax.rem(item, jnp.int32(batch)), lax.div(head_row, jnp.int32(rows)), lax.rem(head_row, jnp.int32(rows))
