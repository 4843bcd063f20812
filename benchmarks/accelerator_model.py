"""Predicted update time on an H100-class GPU and a TPU v5e-class chip: a model, not a measurement.

No GPU or TPU has run the update. This module predicts, from the program XLA
builds on this CPU-only machine, how AdaPreLoRA's update time compares with
AdamW's on two accelerators, so that the parts that would dominate there are
known before a device is available::

  python -m benchmarks.accelerator_model                 # 7B shapes, 2 and 32 layers, r = 16, 64
  python -m benchmarks.accelerator_model --layers 2 --ranks 16 --optimizers adamw adaprelora

For each optimizer one train step (the update and ``apply_updates``) of
LoRA factors at 7B shapes (``benchmarks.update_cost.SHAPES``, one pair per
matrix, float32) is traced from abstract inputs, nothing allocated, and read
three ways:

* **flops and bytes**: ``cost_analysis()`` of the program compiled for this
  CPU (XLA's count over the optimized, fused module: ``bytes accessed`` is
  what each fusion reads and writes, a proxy for HBM traffic);
* **kernels**: the instructions of that optimized module that would each be
  a kernel launch on a GPU (fusions, dots, copies, reductions, custom calls;
  not parameters, tuples, constants or bitcasts). XLA's GPU compiler fuses
  differently from its CPU compiler, and no GPU-optimized module can be
  built without a GPU, so this count is a proxy, not the GPU's count;
* **solver calls**: the ``eigh``, ``cholesky`` and ``triangular_solve``
  equations of the step's jaxpr, once per call site, with each one's batch
  and matrix size. The plumbing merges each stage's decompositions of every
  role and layer into one call (``tests/test_solver_calls.py`` counts them in
  the lowered CUDA and TPU programs).

The predicted time per chip is a roofline plus fixed costs::

  t = max((flops − dot_flops) / PEAK_FLOPS + dot_flops / DOT_FLOPS[precision],
          bytes / HBM_BANDWIDTH)
      + kernels × LAUNCH + Σ_calls SOLVER[primitive](batch, n)

``dot_flops`` are the step's ``dot_general`` flops, read from its jaxpr. Every
product of the update asks for ``HIGHEST`` (``docs/derivation.md``,
precision), so they run at the chip's float32 matmul rate; the table also
gives their time at the ``DEFAULT`` rate (TF32, one bfloat16 pass) that the
library does not use, which is what ``HIGHEST`` costs.

Assumed figures (each is a named field of :data:`CHIPS`):

* H100 SXM: HBM3 bandwidth 3.35 TB/s, FP32 (non-tensor-core) peak
  67 TFLOP/s, the rate of a ``HIGHEST`` float32 matmul, and TF32 tensor-core
  peak 494.7 TFLOP/s dense (989.4 with sparsity), the ``DEFAULT`` rate, from
  NVIDIA's H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100).
* Kernel launch: 4 µs per kernel, the order of launch overhead measured for
  back-to-back small kernels without CUDA graphs (NVIDIA Technical Blog,
  "Getting Started with CUDA Graphs", 2019: a few µs per kernel, about 1 µs
  less with a graph). XLA's command buffers (CUDA graphs) would lower it.
* cuSOLVER eigendecompositions: JAX lowers ``eigh`` on CUDA to
  ``cusolver_syevd_ffi``, which runs batched Jacobi (``syevjBatched``) for
  ``n <= 32`` and ``syevd`` (batched ``syevBatched`` since CUDA 12.6.2)
  above (jaxlib/gpu/solver_kernels_ffi.cc). Their cost is taken from the
  measurements in jax-ml/jax issue #31368 (2025, an NVIDIA GPU): Jacobi
  calls take 0.25 ms for ``n <= 32`` whatever the batch up to 128, and at
  ``n = 64`` 0.52 ms plus 0.067 ms per matrix in the batch (2.57 ms at 32),
  taken here for every ``n > 32``. Those are whole jitted calls, so they
  bound the in-program cost from above; ``syevBatched`` may be faster at
  ``n = 64`` (no figure published).
* TPU v5e: HBM2 bandwidth 819 GB/s and bf16 peak 197 TFLOP/s, from Google
  Cloud's "TPU v5e" page (cloud.google.com/tpu/docs/v5e). A ``DEFAULT``
  float32 matmul is one bfloat16 pass, a ``HIGHEST`` one six (JAX's
  ``lax.Precision`` documentation), so it runs at 197/6 TFLOP/s.
* TPU per-op cost: 1 µs per fused op (an assumption: a TPU runs the whole
  program from device memory with no host launch per op; no public per-op
  figure was found).
* TPU ``Eigh``: XLA expands it into a cyclic Jacobi loop (``backend_config``
  ``max_iter=100, tol=1e-6``); each sweep takes ``n − 1`` rounds of
  rotations, assumed here 10 ops per round and 8 sweeps to converge in
  float32, so ``80 (n − 1)`` dependent ops per call at the per-op cost,
  whatever the batch (the batch runs in the vector units side by side).
* Cholesky and triangular solves (an assumption, no published figure for
  batched ``n <= 64``): on the GPU one ``potrf``/``trsm`` launch sequence of
  3 kernels; on the TPU, XLA's column-by-column expansion, ``n`` dependent
  ops per call.

Everything here is a prediction with the figures above; ``benchmarks/
device_check.sh`` measures the GPU side when a GPU is available.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import re
from collections import Counter
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from adaprelora_jax import adaprelora
from benchmarks.update_cost import SHAPES


@dataclasses.dataclass(frozen=True)
class Chip:
  """A chip's assumed figures (sources in the module docstring)."""
  name: str
  hbm_bytes_per_s: float
  peak_flops_per_s: float
  launch_s: float  # fixed cost of one kernel (GPU) or one fused op (TPU)
  solver: Callable[[str, int, int], float]  # (primitive, batch, n) -> seconds of one call
  highest_dot_flops_per_s: float  # float32 matmuls at precision HIGHEST
  default_dot_flops_per_s: float  # float32 matmuls at precision DEFAULT


GPU_LAUNCH_S = 4e-6
TPU_LAUNCH_S = 1e-6


def _cusolver_s(primitive: str, batch: int, n: int) -> float:
  """One cuSOLVER call: ``eigh`` from the measurements of jax-ml/jax#31368, others 3 launches."""
  if primitive != "eigh":
    return 3 * GPU_LAUNCH_S
  if n <= 32:
    return 0.25e-3
  return (0.52 + 0.067 * (batch - 1)) * 1e-3  # the n = 64 row, used for every n > 32


def _tpu_solver_s(primitive: str, batch: int, n: int) -> float:
  """XLA's Jacobi ``Eigh`` (8 sweeps of ``n - 1`` rounds of 10 ops), or ``n`` ops; batch in parallel."""
  del batch
  ops = 8 * (n - 1) * 10 if primitive == "eigh" else n
  return ops * TPU_LAUNCH_S


CHIPS = {
    "h100": Chip("H100 SXM-class GPU", 3.35e12, 67e12, GPU_LAUNCH_S, _cusolver_s,
                 highest_dot_flops_per_s=67e12, default_dot_flops_per_s=494.7e12),
    "tpu_v5e": Chip("TPU v5e-class chip", 819e9, 197e12, TPU_LAUNCH_S, _tpu_solver_s,
                    highest_dot_flops_per_s=197e12 / 6, default_dot_flops_per_s=197e12),
}

OPTIMIZERS = {
    "adamw": lambda: optax.adamw(1e-3),
    "adaprelora": lambda: adaprelora(1e-3),
    "adaprelora_b1": lambda: adaprelora(1e-3, b1=0.9),
}

# Instructions of an optimized module that launch no kernel of their own.
_FREE = {"parameter", "tuple", "get-tuple-element", "constant", "bitcast",
         "after-all", "add-dependency", "opt-barrier", "partition-id", "replica-id"}
_SOLVERS = {"eigh", "cholesky", "lu", "qr", "svd", "triangular_solve", "householder_product"}


def abstract_params(layers: int, rank: int) -> dict:
  """LoRA factors of ``layers`` 7B-like decoder layers, as ``ShapeDtypeStruct``."""
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  return {f"layer_{i}/{name}": {"lora_a": f32(m, rank), "lora_b": f32(rank, n)}
          for i in range(layers) for name, (m, n) in SHAPES.items()}


def trace_step(tx: optax.GradientTransformation, params: dict):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step).trace(params, jax.eval_shape(tx.init, params), params)


def kernel_count(hlo_text: str) -> tuple[int, Counter]:
  """Instructions of an optimized HLO module that would each launch a kernel.

  Counts the instructions of every computation that is not a fusion's body
  (the entry, and loop or conditional bodies), minus those in :data:`_FREE`.
  """
  opcodes: Counter = Counter()
  skip = False
  for line in hlo_text.splitlines():
    head = line.strip()
    if not line.startswith(" ") and "{" in line:  # a computation's header
      name = head.split()[1] if head.startswith("ENTRY") else head.split()[0]
      skip = "fused" in name or name.startswith("%fused") or "region" in name
      continue
    match = re.match(r"(?:ROOT )?%?[\w.\-]+ = [^ ]+ ([\w\-]+)\(", head)
    if skip or not match:
      continue
    opcodes[match.group(1)] += 1
  launched = {k: v for k, v in opcodes.items() if k not in _FREE}
  return sum(launched.values()), Counter(launched)


def _equations(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs nested in it, once per call site."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _equations(sub)


def solver_calls(traced) -> list[tuple[str, int, int]]:
  """``(primitive, batch, n)`` of every matrix decomposition the step runs.

  Read from the jaxpr, once per call site: the lowered module holds one body
  per function however often it is called. Each such primitive is one
  solver ``custom_call`` on every platform (``test_lowering.py``).
  """
  calls = []
  for eqn in _equations(traced.jaxpr.jaxpr):
    if eqn.primitive.name in _SOLVERS:
      shape = eqn.invars[0].aval.shape
      batch = 1
      for d in shape[:-2]:
        batch *= d
      calls.append((eqn.primitive.name, batch, shape[-1]))
  return calls


def dot_flops(traced) -> float:
  """Flops of the step's ``dot_general`` equations (``2 · out · contracted``), once per call site."""
  total = 0.0
  for eqn in _equations(traced.jaxpr.jaxpr):
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      contracted = math.prod(eqn.invars[0].aval.shape[d] for d in contract)
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted
  return total


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list in older JAX
  return {"flops": float(cost.get("flops", 0.0)),
          "bytes": float(cost.get("bytes accessed", 0.0))}


def analyse(name: str, layers: int, rank: int) -> dict:
  """Flops, bytes, kernels and solver calls of ``name``'s step at 7B shapes."""
  traced = trace_step(OPTIMIZERS[name](), abstract_params(layers, rank))
  compiled = traced.lower(lowering_platforms=("cpu",)).compile()
  kernels, opcodes = kernel_count(compiled.as_text())
  return {**_cost(compiled), "dot_flops": dot_flops(traced), "kernels": kernels,
          "opcodes": dict(opcodes.most_common(8)), "solver_calls": solver_calls(traced)}


def predict(program: dict, chip: Chip) -> dict:
  """Seconds of one update on ``chip``, split into the model's terms."""
  dots = program.get("dot_flops", 0.0)
  compute = ((program["flops"] - dots) / chip.peak_flops_per_s
             + dots / chip.highest_dot_flops_per_s)
  roofline = max(compute, program["bytes"] / chip.hbm_bytes_per_s)
  launches = program["kernels"] * chip.launch_s
  solvers = sum(chip.solver(p, b, n) for p, b, n in program["solver_calls"])
  return {"roofline_s": roofline, "launch_s": launches, "solver_s": solvers,
          "total_s": roofline + launches + solvers,
          "dots_highest_s": dots / chip.highest_dot_flops_per_s,
          "dots_default_s": dots / chip.default_dot_flops_per_s}


def model(names: list[str], layer_counts: list[int], ranks: list[int]) -> dict:
  """Programs and predictions for every (layers, rank); ratios to AdamW."""
  out = {}
  for layers in layer_counts:
    for rank in ranks:
      programs = {n: analyse(n, layers, rank) for n in names}
      row = {}
      for chip_key, chip in CHIPS.items():
        times = {n: predict(p, chip) for n, p in programs.items()}
        base = times["adamw"]["total_s"]
        row[chip_key] = {n: {**t, "ratio": t["total_s"] / base} for n, t in times.items()}
      out[f"L{layers}_r{rank}"] = {"layers": layers, "rank": rank,
                                   "programs": programs, "predicted": row}
      print(_table(out[f"L{layers}_r{rank}"]), flush=True)
  return out


def _table(entry: dict) -> str:
  lines = [f"\n{entry['layers']} layers, r = {entry['rank']} (model, not a measurement)",
           "| optimizer | chip | MFLOP | MiB moved | kernels | solver calls | roofline ms"
           " | dots ms HIGHEST (DEFAULT) | launch ms | solver ms | total ms | / AdamW |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for chip_key, times in entry["predicted"].items():
    for name, t in times.items():
      p = entry["programs"][name]
      lines.append(
          f"| {name} | {chip_key} | {p['flops'] / 1e6:.0f} | {p['bytes'] / 2**20:.0f} | "
          f"{p['kernels']} | {len(p['solver_calls'])} | {t['roofline_s'] * 1e3:.2f} | "
          f"{t['dots_highest_s'] * 1e3:.3f} ({t['dots_default_s'] * 1e3:.3f}) | "
          f"{t['launch_s'] * 1e3:.2f} | {t['solver_s'] * 1e3:.2f} | {t['total_s'] * 1e3:.2f} | "
          f"{t['ratio']:.2f} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                      choices=list(OPTIMIZERS))
  parser.add_argument("--layers", type=int, nargs="+", default=[2, 32])
  parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path("benchmarks/out/accelerator_model"))
  args = parser.parse_args(argv)
  names = ["adamw", *[n for n in args.optimizers if n != "adamw"]]
  result = {"assumptions": {k: {f.name: getattr(c, f.name) for f in dataclasses.fields(c)
                                if f.name != "solver"} for k, c in CHIPS.items()},
            "configs": model(names, args.layers, args.ranks)}
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "accelerator_model.json").write_text(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
