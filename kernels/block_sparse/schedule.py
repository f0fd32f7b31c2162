"""Which CTA runs which mask row: a longest-first (LPT) assignment of work items to a fixed number of CTAs.

Block-sparse rows can differ a lot in length (a BigBird global row visits every key tile, its neighbours a handful).
CTAs launch in grid order, so a long row that happens to launch last leaves the rest of the GPU idle while it
finishes. Sorting the items longest first and giving each to the least-loaded CTA bounds that tail; with one CTA
per item it is simply the launch order.
"""

import heapq

import numpy as np


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
