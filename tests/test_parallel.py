"""Sequence and data parallelism (efficient_attention.parallel): sharded results equal single-device ones.

The multi-device checks run in a subprocess (tests/parallel_checks.py) that forces 4 CPU devices: XLA reads
the device count once, before jax starts, and the rest of the suite runs on one device.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from efficient_attention import parallel
from kernels.flash_attention import flash_attention
from kernels.linear_attention import linear_attention
from kernels.selective_scan import selective_scan
from tests import parallel_runner
from tests.helpers import assert_close

# f32 tolerance of DESIGN.md section 5 for single ops; the decoder's gradients pass through four layers of
# differently ordered sums, so they get ten times more room.
OP_TOLERANCE = 1e-5
DECODER_TOLERANCE = 1e-4
# fp32 matmuls on GPUs may run as TF32 (10-bit mantissa); a split changes the order of the sums, not the method.
GPU_F32_TOLERANCE = 5e-3


@pytest.fixture(scope="module")
def multi_device_results(request):
  """tests/parallel_checks.py's results, computed once per run (see tests/parallel_runner.py): under
  pytest-xdist they were started in the background when collection ended (tests/conftest.py)."""
  directory = parallel_runner.shared_dir(request.config)
  if directory is None:
    return parallel_runner.run_now()
  parallel_runner.start_in_background(directory)  # a no-op when collection already started them
  return parallel_runner.wait_for_results(directory)


@pytest.mark.parametrize("check", ["ring_causal_zigzag", "ring_causal_zigzag_head_groups",
                                   "linear_attention_per_channel", "selective_scan"])
def test_sharded_op_matches_single_device(multi_device_results, check):
  """Ring attention and the sequence-parallel scans: output and every input gradient."""
  for quantity, error in multi_device_results[check].items():
    assert error <= OP_TOLERANCE, f"{check} {quantity}: relative RMS error {error:.3g}"


def test_ring_memory_does_not_grow_with_the_ring(multi_device_results):
  """Per device, at the same tokens per device: 4 devices may not need more than 2 (with every step's block and
  partial result alive at once it took about 1.8x here)."""
  report = multi_device_results["ring_memory"]
  assert report["four"] <= 1.1 * report["two"], report


def test_ring_head_groups_cut_its_memory(multi_device_results):
  """Heads in 4 groups, one ring after the other: the accumulators and visiting blocks hold a quarter of the
  heads, so the step's temporary memory must drop well below the all-heads ring's (0.33x measured; 0.71x when
  XLA merged the backward's recomputed block attention with the forward's and kept every group's scores alive)."""
  report = multi_device_results["ring_memory"]
  assert report["two_in_4_head_groups"] <= 0.45 * report["two"], report


def test_ring_head_groups_default_keeps_enough_rows_per_kernel_call():
  # The module, not the function of the same name that efficient_attention.parallel exports.
  ring_attention_module = importlib.import_module("efficient_attention.parallel.ring_attention")
  assert ring_attention_module._head_groups(rows=8 * 57344, hkv=8) == 4
  assert ring_attention_module._head_groups(rows=8 * 28672, hkv=8) == 2
  assert ring_attention_module._head_groups(rows=8 * 4096, hkv=8) == 1
  assert ring_attention_module._head_groups(rows=1 << 30, hkv=1) == 1


def test_decoder_loss_and_gradients_match_single_device(multi_device_results):
  errors = multi_device_results["decoder"]
  assert len(errors) > 20, "expected the loss and a gradient per parameter"
  bad = {name: error for name, error in errors.items() if not error <= DECODER_TOLERANCE}
  assert not bad, f"relative RMS errors above {DECODER_TOLERANCE}: {bad}"


def test_batch_only_mesh_runs_kernels_per_shard(multi_device_results):
  report = multi_device_results["batch_split"]
  assert report["shard_maps"] >= 3, "the flash, linear-attention and selective-scan calls should each be shard_mapped"
  bad = {name: error for name, error in report["errors"].items() if not error <= DECODER_TOLERANCE}
  assert not bad, f"relative RMS errors above {DECODER_TOLERANCE}: {bad}"


def test_trainer_with_sequence_mesh_and_fsdp_matches_one_device(multi_device_results):
  """train_and_evaluate with train.mesh="data:2,sequence:2" and train.fsdp (a `local` encoder: bidirectional ring
  attention with a window reaching the blocks on both sides): same metrics as on one device."""
  report = multi_device_results["trainer"]
  assert report["fsdp_sharded"], "no parameter was split over the data and sequence axes together"
  assert report["batch_spec"] == ["data", "sequence"]
  for split in ("valid", "test"):
    np.testing.assert_allclose(report["mesh"][split]["loss"], report["single"][split]["loss"], rtol=1e-4)


def test_parse_mesh():
  assert parallel.parse_mesh("data:2,sequence:2") == {"data": 2, "sequence": 2}
  assert parallel.parse_mesh("") == {}
  assert parallel.parse_mesh("sequence:-1") == {"sequence": -1}
  for bad in ("data", "model:2", "data:2,data:2", "data:x", "data:0"):
    with pytest.raises(ValueError, match="mesh="):
      parallel.parse_mesh(bad)


def test_make_mesh_checks_the_device_count():
  mesh = parallel.make_mesh("")
  assert mesh.shape == {"data": jax.device_count(), "sequence": 1}
  with pytest.raises(ValueError, match="must equal"):
    parallel.make_mesh(f"data:{jax.device_count()},sequence:2")


def test_fsdp_spec_splits_the_largest_divisible_dimension_over_every_device():
  # fsdp_spec reads only the axis sizes, so a stand-in for a 4 x 2 mesh will do on one CPU device.
  fake = type("FakeMesh", (), {"shape": {"data": 4, "sequence": 2}})()
  assert parallel.fsdp_spec((128, 256), fake) == PartitionSpec(None, ("data", "sequence"))
  assert parallel.fsdp_spec((1024, 6), fake) == PartitionSpec(("data", "sequence"))
  assert parallel.fsdp_spec((100, 60), fake) == PartitionSpec("data")  # 8 divides neither; 4 divides both
  assert parallel.fsdp_spec((3, 5001), fake) == PartitionSpec()  # nothing divides
  assert parallel.fsdp_spec((8, 8), fake) == PartitionSpec()  # too small to be worth a gather
  sequence_only = type("FakeMesh", (), {"shape": {"data": 1, "sequence": 4}})()
  assert parallel.fsdp_spec((1024, 256), sequence_only) == PartitionSpec("sequence")
  single = type("FakeMesh", (), {"shape": {"data": 1, "sequence": 1}})()
  assert parallel.fsdp_spec((1024, 256), single) == PartitionSpec()


def test_single_device_mesh_keeps_the_single_device_path():
  mesh = parallel.make_mesh("")
  with parallel.sequence_parallel(mesh):
    assert parallel.active_layout() is None
  assert parallel.active_layout() is None


def test_ring_attention_rejects_bad_arguments():
  layout = parallel.SequenceLayout(parallel.make_mesh(""))
  q = jnp.zeros((1, 8, 2, 8))
  with pytest.raises(ValueError, match="impl='nope'"):
    parallel.ring_attention(q, q, q, layout, impl="nope")
  with pytest.raises(ValueError, match="k.shape"):
    parallel.ring_attention(q, q[:, :4], q[:, :4], layout)
  with pytest.raises(ValueError, match=r"head_groups=3 .*valid: \[1, 2\]"):
    parallel.ring_attention(q, q, q, layout, head_groups=3)


@pytest.mark.gpu
def test_ring_attention_pallas_matches_flash_on_gpus():
  """Ring over every visible GPU with the Pallas kernel, bf16: outputs and gradients against one-device flash."""
  n = jax.device_count()
  if n < 2:
    pytest.skip("needs 2 or more GPUs")
  mesh = parallel.make_mesh(f"data:1,sequence:{n}")
  layout = parallel.SequenceLayout(mesh)
  b, t, h, d = 2, 512 * n, 8, 64
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, do = (jax.random.normal(key, (b, t, h, d), jnp.bfloat16) for key in keys)
  lengths = jnp.array([t, t - 300])
  for options in (dict(causal=True), dict(), dict(causal=True, window=(128, 0)), dict(causal=True, head_groups=4)):
    def loss(fn):
      return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
    single = lambda q, k, v: flash_attention(q, k, v, kv_lengths=lengths, impl="pallas",
                                             **{key: value for key, value in options.items() if key != "head_groups"})
    ring = lambda q, k, v: parallel.ring_attention(q, k, v, layout, kv_lengths=lengths, impl="pallas", **options)
    assert_close(jax.jit(ring)(q, k, v), single(q, k, v), 1e-2, f"ring {options} output")
    expected = jax.grad(loss(single), argnums=(0, 1, 2))(q, k, v)
    actual = jax.jit(jax.grad(loss(ring), argnums=(0, 1, 2)))(q, k, v)
    for name, a, e in zip("qkv", actual, expected):
      assert_close(a, e, 2e-2, f"ring {options} d{name}")



@pytest.mark.gpu
def test_sequence_parallel_scans_match_kernels_on_gpus():
  """Linear attention (per-channel decay) and the selective scan split over every visible GPU, default impls."""
  n = jax.device_count()
  if n < 2:
    pytest.skip("needs 2 or more GPUs")
  layout = parallel.SequenceLayout(parallel.make_mesh(f"data:1,sequence:{n}"))
  b, t, h, d = 2, 256 * n, 4, 64
  keys = jax.random.split(jax.random.key(1), 10)
  q, k, v = (jax.random.normal(key, (b, t, h, d)) for key in keys[:3])
  decay = -jax.nn.softplus(jax.random.normal(keys[3], (b, t, h, d)))
  o = jax.jit(lambda q: parallel.linear_attention(q, k, v, layout, decay=decay))(q)
  assert_close(o, linear_attention(q, k, v, decay=decay), GPU_F32_TOLERANCE, "linear attention")
  dm, n_state = 128, 16
  x, dt, z = (jax.random.normal(key, (b, t, dm)) for key in keys[4:7])
  a = -jnp.exp(jax.random.normal(keys[7], (dm, n_state)))
  bb, cc = (jax.random.normal(key, (b, t, n_state)) for key in keys[8:10])
  loss = lambda fn: lambda x, dt: jnp.sum(fn(x, dt) ** 2)
  single = lambda x, dt: selective_scan(x, dt, a, bb, cc, z=z)
  split = lambda x, dt: parallel.selective_scan(x, dt, a, bb, cc, layout, z=z)
  assert_close(jax.jit(split)(x, dt), single(x, dt), GPU_F32_TOLERANCE, "selective scan")
  for name, actual, expected in zip(("dx", "ddt"), jax.jit(jax.grad(loss(split), argnums=(0, 1)))(x, dt),
                                    jax.grad(loss(single), argnums=(0, 1))(x, dt)):
    assert_close(actual, expected, GPU_F32_TOLERANCE, f"selective scan {name}")
