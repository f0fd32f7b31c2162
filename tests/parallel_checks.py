"""Multi-device checks for tests/test_parallel.py, run in a subprocess that forces several CPU devices.

`python -m tests.parallel_checks` prints, as its last line, one JSON object {check name: results}; each check
compares a sequence-parallel result (outputs and gradients, as relative RMS errors, or a trainer's metrics) with
the single-device one. jax must see the devices before it starts, which is why this is a separate process (the
suite's own jax has one CPU device).
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
).strip()

import json  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from efficient_attention import Decoder, DecoderConfig  # noqa: E402
from efficient_attention import parallel  # noqa: E402
from kernels.flash_attention import flash_attention  # noqa: E402
from kernels.linear_attention import linear_attention  # noqa: E402
from kernels.selective_scan import selective_scan  # noqa: E402
from tests.helpers import relative_rms  # noqa: E402


def _errors(prefix, actual, expected):
  return {f"{prefix}{i}": relative_rms(a, e) for i, (a, e) in enumerate(zip(actual, expected))}


def _value_and_grads(fn, args, cotangent):
  """fn(*args) and the gradients of <fn(*args), cotangent> for every arg."""
  out = fn(*args)
  grads = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cotangent), argnums=tuple(range(len(args))))(*args)
  return [out, *grads]


def _compare(single, sharded, args, cotangent, expected=None):
  """Errors of the sharded value and gradients against the single-device ones (`expected`, when given: the
  single-device result of the same args and cotangent, shared by comparisons of one reference)."""
  if expected is None:
    expected = _expected(single, args, cotangent)
  actual = jax.jit(lambda *a: _value_and_grads(sharded, a, cotangent))(*args)
  return _errors("out_and_grad", actual, expected)


def _expected(single, args, cotangent):
  """The single-device value and gradients, jitted (run eagerly, they would dispatch and compile op by op)."""
  return jax.jit(lambda *a: _value_and_grads(single, a, cotangent))(*args)


def ring_checks(layout):
  """Causal ring attention (zig-zag) against the flash op (reference kernel; the Pallas one is checked on GPU),
  with GQA and right padding. The decoder check runs a causal window, the trainer check a bidirectional one."""
  b, t, h, hkv, d = 2, 48, 4, 2, 16
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k, v = (jax.random.normal(key, (b, t, hkv, d)) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], (b, t, h, d))
  lengths = jnp.array([t, 29])
  results = {}
  single = lambda q, k, v: flash_attention(q, k, v, causal=True, kv_lengths=lengths, impl="xla")
  sharded = lambda q, k, v: parallel.ring_attention(q, k, v, layout, causal=True, kv_lengths=lengths, impl="xla")
  expected = _expected(single, (q, k, v), cotangent)
  results["ring_causal_zigzag"] = _compare(single, sharded, (q, k, v), cotangent, expected)
  # The heads in two groups, one ring after the other (GQA: one kv head per group).
  grouped = lambda q, k, v: parallel.ring_attention(q, k, v, layout, causal=True, kv_lengths=lengths, impl="xla",
                                                    head_groups=2)
  results["ring_causal_zigzag_head_groups"] = _compare(single, grouped, (q, k, v), cotangent, expected)
  return results


def scan_checks(layout):
  """Sequence-parallel linear attention with a per-channel decay (Performer in the decoder check has a per-head
  one) and the selective scan with grouped B/C."""
  b, t, h, kd, vd = 2, 32, 2, 8, 4
  keys = jax.random.split(jax.random.key(1), 12)
  q, k = (jax.random.normal(key, (b, t, h, kd)) for key in keys[:2])
  v = jax.random.normal(keys[2], (b, t, h, vd))
  cotangent = jax.random.normal(keys[3], (b, t, h, vd))
  decay = -jax.nn.softplus(jax.random.normal(keys[4], (b, t, h, kd)))
  single = lambda q, k, v, decay: linear_attention(q, k, v, decay=decay, chunk_size=8)
  sharded = lambda q, k, v, decay: parallel.linear_attention(q, k, v, layout, decay=decay, chunk_size=8)
  results = {"linear_attention_per_channel": _compare(single, sharded, (q, k, v, decay), cotangent)}

  dm, n, groups = 8, 4, 2
  x, dt, z = (jax.random.normal(key, (b, t, dm)) for key in keys[6:9])
  a = -jnp.exp(jax.random.normal(keys[9], (dm, n)))
  bb, cc = (jax.random.normal(key, (b, t, groups, n)) for key in keys[10:12])
  dskip, dt_bias = jnp.linspace(0.5, 1.5, dm), jnp.linspace(-1.0, 1.0, dm)
  single = lambda x, dt, a, bb, cc, z, dskip, dt_bias: selective_scan(x, dt, a, bb, cc, D=dskip, z=z, dt_bias=dt_bias,
                                                                       chunk_size=8)
  sharded = lambda x, dt, a, bb, cc, z, dskip, dt_bias: parallel.selective_scan(
      x, dt, a, bb, cc, layout, D=dskip, z=z, dt_bias=dt_bias, chunk_size=8)
  results["selective_scan"] = _compare(single, sharded, (x, dt, a, bb, cc, z, dskip, dt_bias),
                                       jax.random.normal(keys[3], (b, t, dm)))
  return results


def ring_memory_checks():
  """Compiled temporary memory of ring attention's forward + backward at the same tokens per device on 2 and 4
  devices: one visiting block and one partial result alive at a time, so it should not grow with the ring."""
  c, h, d = 128, 4, 16

  def temp_bytes(n, head_groups=1):
    layout = parallel.SequenceLayout(parallel.make_mesh(f"data:1,sequence:{n}", devices=jax.devices()[:n]))
    q = jax.ShapeDtypeStruct((1, n * c, h, d), jnp.float32)
    loss = lambda q, k, v: jnp.sum(parallel.ring_attention(q, k, v, layout, causal=True, impl="xla",
                                                           head_groups=head_groups) ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  return {"ring_memory": {"two": temp_bytes(2), "four": temp_bytes(4), "two_in_4_head_groups": temp_bytes(2, 4)}}


def decoder_checks(mesh):
  """Loss and every parameter gradient of a hybrid decoder, one layer per parallel path (ring attention with a
  causal window, scan-combine for Performer (the `linear` mixer's path plus a decay), RWKV and Mamba), with
  right padding: single device vs data:2 x sequence:2."""
  config = DecoderConfig(
      vocab_size=17, width=32, num_layers=4, num_heads=2,
      layer_pattern="sliding_window,performer,rwkv,mamba",
      mixer_options={"sliding_window": {"window": 5}, "performer": {"num_features": 16, "chunk_size": 8},
                     "rwkv": {"mix_rank": 4, "decay_rank": 4, "chunk_size": 8}},
      position="rope", max_len=64, mlp_ratio=1.0,
  )
  model = Decoder(config, rngs=nnx.Rngs(0))
  b, t = 4, 32
  inputs = jax.random.randint(jax.random.key(2), (b, t), 0, 17)
  mask = jnp.arange(t)[None, :] < jnp.array([32, 20, 32, 9])[:, None]

  def loss(model, inputs, mask):
    logits = model(inputs, mask=mask)
    return jnp.mean(jnp.where(mask[..., None], logits, 0.0) ** 2)

  step = lambda model, inputs, mask: nnx.value_and_grad(loss)(model, inputs, mask)
  expected_loss, expected_grads = nnx.jit(step)(model, inputs, mask)
  spec = NamedSharding(mesh, PartitionSpec("data", "sequence"))
  with parallel.sequence_parallel(mesh):
    actual_loss, actual_grads = nnx.jit(step)(model, jax.device_put(inputs, spec), jax.device_put(mask, spec))
  errors = {"loss": relative_rms(actual_loss, expected_loss)}
  flat_expected = dict(nnx.to_flat_state(expected_grads))
  for path, value in nnx.to_flat_state(actual_grads):
    errors["grad/" + "/".join(map(str, path))] = relative_rms(value[...], flat_expected[path][...])
  return {"decoder": errors}


def batch_split_checks(mesh):
  """A batch-only mesh (data:4): the kernels run per data shard under shard_map (XLA would otherwise run each
  opaque kernel call on the whole gathered batch on every device), with the single-device loss and gradients."""
  config = DecoderConfig(
      vocab_size=17, width=32, num_layers=3, num_heads=2, layer_pattern="flash,linear,mamba",
      mixer_options={"flash": {"impl": "pallas"}, "linear": {"chunk_size": 8}}, position="rope", max_len=32,
      mlp_ratio=1.0,
  )
  model = Decoder(config, rngs=nnx.Rngs(0))
  b, t = 4, 16
  inputs = jax.random.randint(jax.random.key(3), (b, t), 0, 17)
  mask = jnp.arange(t)[None, :] < jnp.array([16, 11, 16, 5])[:, None]
  loss = lambda model, inputs, mask: jnp.mean(jnp.where(mask[..., None], model(inputs, mask=mask), 0.0) ** 2)
  step = lambda model, inputs, mask: nnx.value_and_grad(loss)(model, inputs, mask)
  expected_loss, expected_grads = nnx.jit(step)(model, inputs, mask)
  spec = NamedSharding(mesh, PartitionSpec("data"))
  with parallel.sequence_parallel(mesh):
    args = (jax.device_put(inputs, spec), jax.device_put(mask, spec))
    graphdef, state = nnx.split(model)
    program = str(jax.make_jaxpr(lambda state, *a: step(nnx.merge(graphdef, state), *a))(state, *args))
    actual_loss, actual_grads = nnx.jit(step)(model, *args)
  errors = {"loss": relative_rms(actual_loss, expected_loss)}
  flat_expected = dict(nnx.to_flat_state(expected_grads))
  for path, value in nnx.to_flat_state(actual_grads):
    errors["grad/" + "/".join(map(str, path))] = relative_rms(value[...], flat_expected[path][...])
  # One shard_map per mixer in the forward pass (their transposes add more).
  return {"batch_split": {"errors": errors, "shard_maps": program.count("shard_map[")}}


def trainer_checks(cache_dir, workdir):
  """train_and_evaluate on a tiny ListOps with mesh data:2,sequence:2 and FSDP against one device."""
  # Imported here: the trainer pulls in orbax and the task generators, which the other checks do not need.
  from experiments import modeling, trainer
  from experiments.data import eval_batches, make_mesh, shard_batch
  from experiments.tasks import build_task
  from tests.test_train import tiny_config

  def config(**train):
    config = tiny_config(cache_dir, num_steps=2, **train)
    # Wide enough that FSDP splits the larger matrices (small arrays stay replicated). A window of 3 reaches
    # into the neighbouring blocks (8 tokens per device) on both sides.
    config.model.update(variant="local", width=64)
    config.model.mixer_options.local.window = 3
    return config

  single = trainer.train_and_evaluate(config(), os.path.join(workdir, "single"))
  mesh_config = config(mesh="data:2,sequence:2", fsdp=True)
  mesh = make_mesh(mesh_config.train.mesh)
  task = build_task(mesh_config.task, cache_dir)
  model, _ = trainer.create(modeling.decoder_config(mesh_config.model, task, 0)[0], 0, mesh_config.train, mesh)
  fsdp_sharded = any(("data", "sequence") in tuple(leaf.sharding.spec) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
  batch = shard_batch(next(eval_batches(task.splits["train"], 8)), mesh)
  sharded = trainer.train_and_evaluate(mesh_config, os.path.join(workdir, "mesh"))
  return {"trainer": {"single": single, "mesh": sharded, "fsdp_sharded": fsdp_sharded,
                      "batch_spec": list(batch["inputs"].sharding.spec)}}


def main():
  mesh_sequence = parallel.make_mesh("data:1,sequence:4")
  layout = parallel.SequenceLayout(mesh_sequence)
  results = {}
  results.update(ring_checks(layout))
  results.update(scan_checks(layout))
  results.update(ring_memory_checks())
  results.update(decoder_checks(parallel.make_mesh("data:2,sequence:2")))
  results.update(batch_split_checks(parallel.make_mesh("data:4")))
  with tempfile.TemporaryDirectory() as workdir:
    results.update(trainer_checks(os.path.join(workdir, "cache"), workdir))
  # The last line of stdout; the trainer's progress bar writes lines before it.
  print("\n" + json.dumps(results))


if __name__ == "__main__":
  main()
