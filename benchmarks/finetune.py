"""Fine-tune MiniLM + LoRA on WordNet noun categories: the optimizer comparison harness.

all-MiniLM-L6-v2 gets rank-8 ``nnx.LoRA`` adapters (``A`` random, ``B = 0``) on
the query and value projections, and a 26-way linear head; only those are
trained (:data:`benchmarks.minilm.TRAINABLE`). Every optimizer gets the same
schedule (linear warmup, then cosine decay to 0), the same decoupled weight
decay on every trainable leaf, the same seed-determined init and batch order,
and is scored on the same fixed held-out subset, so two runs with one seed
differ only by the optimizer and its learning rate. Two reference lines train
with AdamW but without LoRA: ``head_only_adamw`` (frozen encoder, head only)
and ``full_ft_adamw`` (every encoder weight and the head)::

  python -m benchmarks.finetune            # main job: family + references at their tuned lr
  python -m benchmarks.finetune --sweep    # the tuning protocol (see `sweep_jobs`), 150 steps
  python -m benchmarks.finetune --sweep --size gpu   # 1500 steps of 64, all held-out definitions
  python -m benchmarks.finetune --optimizers adaprelora adaprelora_b1 --lrs 1e-3 --diagnostics
  python -m benchmarks.finetune --optimizers adamw "adaprelora:b1=0.95,decay_rate=0.9" \\
      --lrs adamw=1e-3,3e-3 adaprelora=3e-4,1e-3

Results go to ``--out``: ``finetune.json`` (every run, rewritten after each
one) and ``finetune.png`` (accuracy curves at each optimizer's best lr and the
lr sweep). ``--reuse FILE ...`` takes finished runs with the same settings
from earlier JSON files instead of rerunning them (also: resuming a sweep).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import itertools
import json
import math
import operator
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats
from flax import nnx
from tqdm import tqdm

from adaprelora_jax import adaprelora, scale_by_adaprelora, with_weight_stats
from benchmarks.family import FAMILY, eval_schedule, warmup_cosine, warmup_steps
from benchmarks.minilm import TRAINABLE, EncoderClassifier, Frozen, load_minilm
from benchmarks.sizes import fill_defaults
from benchmarks.wordnet import NOUN_LEXNAMES, Split, load_wordnet_nouns

Factory = Callable[[optax.Schedule], optax.GradientTransformation]

MAX_LEN = 32
LORA_TARGETS = ("query", "value")
LORA_SCALE = 1.0  # load_minilm(lora_alpha=None): the nnx.LoRA convention
WEIGHT_DECAY = 0.01  # the same decoupled decay, on every trainable leaf, for every optimizer
EMA_DECAY = 0.9
EVAL_SEED = 1234  # fixes the held-out subset, independently of the run seed
EVAL_CHUNK = 250
LENGTH_QUANTUM = 8  # eval chunks are trimmed to a multiple of this many tokens


def _lora_only(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` on the LoRA factors only, so the head keeps exactly the fallback Adam of plain ``adaprelora``."""
  is_lora = lambda tree: jax.tree.map(
      lambda v: isinstance(v, nnx.LoRAParam), tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  return optax.masked(tx, is_lora)


TRAIN_MODES: dict[str, Any] = {
    "lora": TRAINABLE,  # LoRA adapters + head
    "head": nnx.Param,  # built without adapters: the head alone
    "full": (nnx.Param, Frozen),  # built without adapters: every weight
    "lora_stats": TRAINABLE,  # adapters with W-gradient statistics probes + head
}
"""What each training mode trains (an ``nnx`` filter); only the ``lora`` modes build adapters."""

FULL_STATS = ("adaprelora_full",)
"""Optimizers that read exact W-gradient statistics: trained in mode ``lora_stats``."""

REFERENCES: dict[str, str] = {"head_only_adamw": "head", "full_ft_adamw": "full"}
"""Reference lines: AdamW in a training mode other than ``lora``."""

OPTIMIZERS: dict[str, Factory] = {
    # The family (benchmarks/family.py): adamw, adafactor, lora_plus, scaled_adamw,
    # lora_pro, lora_pro_full, lora_rite, adaprelora, and adaprelora_b1 (the
    # library's momentum: a running mean of the W-gradient in the factors' frames).
    **{name: (lambda s, make=make: make(s, WEIGHT_DECAY)) for name, make in FAMILY.items()},
    **{name: (lambda s: FAMILY["adamw"](s, WEIGHT_DECAY)) for name in REFERENCES},
    # Ablation: EMA of the factor directions AdaPreLoRA outputs.
    "adaprelora_ema_dir": lambda s: optax.chain(
        scale_by_adaprelora(),
        _lora_only(optax.ema(EMA_DECAY, debias=True)),
        optax.add_decayed_weights(WEIGHT_DECAY),
        optax.scale_by_learning_rate(s),
    ),
    # Ablation: EMA of the raw factor gradients, fed to AdaPreLoRA (moments included).
    "adaprelora_ema_grad": lambda s: optax.chain(
        _lora_only(optax.ema(EMA_DECAY, debias=True)), adaprelora(s, weight_decay=WEIGHT_DECAY)
    ),
    # Ablation: SPEC §4 `full` statistics from the probes (benchmarks/minilm.py).
    "adaprelora_full": lambda s: with_weight_stats(
        adaprelora(s, statistics="full", weight_decay=WEIGHT_DECAY)
    ),
}
"""Named optimizers; any name may also be ``adamw:k=v,...`` or ``adaprelora:k=v,...`` (extra keyword arguments)."""

ADAM_GRID = (1e-3, 3e-3, 1e-2, 3e-2)  # per-coordinate normalised factor steps, as AdamW's
LOW_GRID = (3e-4, 1e-3, 3e-3, 1e-2)  # larger W-steps per unit lr (see RESULTS.md)
GRIDS: dict[str, tuple[float, ...]] = {
    "adamw": ADAM_GRID,
    "adafactor": LOW_GRID,  # no momentum: single-step directions, as AdaPreLoRA's
    "lora_plus": LOW_GRID,  # B's lr is 16x the peak lr
    "scaled_adamw": ADAM_GRID,
    "lora_pro": ADAM_GRID,
    "lora_pro_full": LOW_GRID,  # the W-step is a full-matrix Adam step, projected
    "lora_rite": LOW_GRID,  # invariant: W-step independent of the factors' scale
    "adaprelora": LOW_GRID,
    "adaprelora_b1": LOW_GRID,
    "head_only_adamw": (3e-3, 1e-2, 3e-2, 1e-1),  # a linear probe from scratch
    "full_ft_adamw": (3e-5, 1e-4, 3e-4, 1e-3),  # every pretrained weight moves
}
"""Learning-rate grids for ``--sweep``, keyed by :func:`family`; all the same size."""

LADDER: tuple[float, ...] = tuple(float(f"{k}e{e}") for e in range(-7, 1) for k in (1, 3))
"""The 1-3-10 steps the grids are made of; one past a grid's edge is the next rung."""

TUNED_LR: dict[str, float] = {
    "adamw": 1e-2,
    "adafactor": 1e-2,
    "lora_plus": 1e-3,
    "scaled_adamw": 1e-2,
    "lora_pro": 1e-2,
    "lora_pro_full": 3e-3,
    "lora_rite": 1e-2,
    "adaprelora": 3e-3,
    "adaprelora_b1": 3e-3,
    "head_only_adamw": 3e-2,
    "full_ft_adamw": 3e-4,
}
"""Best lr per method in the sweep (seed 0, 150 steps, batch 32; RESULTS.md): the main job's lrs."""


def family(name: str) -> str:
  """The method whose grid and tuned lr ``name`` uses: itself, else ``adamw`` or ``adaprelora``."""
  base = name.split(":")[0]
  if base in GRIDS:
    return base
  return "adamw" if base.startswith("adamw") else "adaprelora"


def train_mode(name: str) -> str:
  """The :data:`TRAIN_MODES` key ``name`` trains in.

  ``lora``, except for the :data:`REFERENCES` and :data:`FULL_STATS`.
  """
  return "lora_stats" if name in FULL_STATS else REFERENCES.get(name, "lora")


def beyond_edge(lr: float, up: bool) -> float:
  """The :data:`LADDER` rung next to ``lr``, above or below it."""
  i = min(range(len(LADDER)), key=lambda j: abs(math.log(LADDER[j] / lr)))
  return LADDER[i + (1 if up else -1)]


def resolve_optimizer(name: str) -> Factory:
  """A registered name, or ``base:k=v,...`` building ``base`` with extra keyword arguments (``v`` a Python literal)."""
  if name in OPTIMIZERS:
    return OPTIMIZERS[name]
  base, _, spec = name.partition(":")
  if base not in ("adamw", "adaprelora") or not spec:
    raise ValueError(
        f"unknown optimizer {name!r}; use one of {sorted(OPTIMIZERS)} or adamw:k=v / adaprelora:k=v"
    )
  kwargs = {"weight_decay": WEIGHT_DECAY}
  for item in spec.split(","):
    key, _, value = item.partition("=")
    kwargs[key.strip()] = ast.literal_eval(value.strip())
  make = optax.adamw if base == "adamw" else adaprelora
  return lambda s: make(s, **kwargs)


# ---------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=1)
def _data() -> tuple[Split, Split]:
  """Train and held-out splits, tokenized once per process (a few seconds)."""
  train, heldout, _ = load_wordnet_nouns(max_len=MAX_LEN)
  return train, heldout


@dataclasses.dataclass(frozen=True)
class EvalChunk:
  """Held-out rows trimmed to a common width; rows past ``real`` are padding."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  labels: np.ndarray
  real: int


def eval_indices(eval_examples: int) -> np.ndarray:
  """The fixed held-out subset: the same rows for every run, optimizer and seed."""
  _, heldout = _data()
  if eval_examples >= len(heldout):
    return np.arange(len(heldout))
  return np.sort(
      np.random.default_rng(EVAL_SEED).choice(len(heldout), eval_examples, replace=False)
  )


@functools.lru_cache(maxsize=4)
def eval_chunks(eval_examples: int) -> tuple[EvalChunk, ...]:
  """The eval subset sorted by length, in chunks trimmed of trailing padding.

  Trailing pad tokens change nothing (keys are masked, pooling skips them),
  and half the definitions are under 15 tokens, so trimming saves about a
  third of the eval compute, at the price of up to four compiled widths.
  """
  _, heldout = _data()
  idx = eval_indices(eval_examples)
  lengths = heldout.attention_mask.sum(1)
  idx = idx[np.argsort(lengths[idx], kind="stable")]
  size = min(EVAL_CHUNK, len(idx))
  chunks = []
  for start in range(0, len(idx), size):
    part = idx[start : start + size]
    width = min(MAX_LEN, LENGTH_QUANTUM * math.ceil(lengths[part].max() / LENGTH_QUANTUM))
    pad = lambda x: np.pad(x[part, :width], ((0, size - len(part)), (0, 0)))
    chunks.append(
        EvalChunk(
            pad(heldout.input_ids), pad(heldout.attention_mask), heldout.labels[part], len(part)
        )
    )
  return tuple(chunks)


def majority_baseline(eval_examples: int) -> float:
  """Accuracy on the eval subset of always predicting the most frequent training class."""
  train, heldout = _data()
  return float(
      np.mean(heldout.labels[eval_indices(eval_examples)] == np.bincount(train.labels).argmax())
  )


def batch_order(seed: int, count: int, size: int) -> np.ndarray:
  """``count`` training indices drawn by ``seed``: consecutive epochs of fresh permutations."""
  rng = np.random.default_rng(seed)
  return np.concatenate([rng.permutation(size) for _ in range(-(-count // size))])[:count]


# --------------------------------------------------------------------------- model


def build_model(
    seed: int, lora_rank: int | None = 8, weight_stats: bool = False
) -> EncoderClassifier:
  """MiniLM + LoRA (none for ``lora_rank=None``) + head; ``seed`` draws the ``A`` and head inits.

  ``weight_stats`` adds the adapters' statistics probes (:func:`load_minilm`).
  """
  rngs = nnx.Rngs(seed)
  encoder, _ = load_minilm(lora_rank, LORA_TARGETS, rngs=rngs, weight_stats=weight_stats)
  return EncoderClassifier(encoder, len(NOUN_LEXNAMES), rngs=rngs)


def lora_factors(tree: Any) -> dict[str, tuple[jax.Array, jax.Array]]:
  """``{"encoder/layers/0/query": (A (in, r), B (r, out)), ...}`` for the ``nnx.LoRA`` adapters in an ``nnx.State``.

  Found from the variable type, not with the library's own pairing, so the
  diagnostics do not depend on the code they measure.
  """
  found: dict[str, dict[str, jax.Array]] = defaultdict(dict)
  for path, var in jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
  ):
    if isinstance(var, nnx.LoRAParam):
      names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
      found["/".join(names[:-2])][names[-1]] = var[...]  # drop ".../lora/lora_a"
  return {key: (f["lora_a"], f["lora_b"]) for key, f in found.items()}


DIAGNOSTICS = ("a_norm", "b_norm", "w1_rms", "w2_rms")


def pair_diagnostics(before: Any, after: Any, scale: float = LORA_SCALE) -> dict[str, jax.Array]:
  """Per LoRA pair, stacked to ``(pairs,)``: factor norms after the step and the W-step's parts.

  With the applied updates ``dA = A' - A``, ``dB = B' - B`` the step is
  ``s(A'B' - AB) = s(dA B + A dB) + s dA dB``: ``w1_rms`` is the RMS of the
  first-order part (what the optimizer's W-space reasoning controls),
  ``w2_rms`` of the second-order part (what it ignores). Dense, 384 x 384.
  """
  old, new = lora_factors(before), lora_factors(after)
  rms = lambda x: jnp.sqrt(jnp.mean(jnp.square(x)))
  rows = []
  for key, (a, b) in old.items():
    a_new, b_new = new[key]
    da, db = a_new - a, b_new - b
    rows.append(
        (
            jnp.linalg.norm(a_new),
            jnp.linalg.norm(b_new),
            rms(scale * (da @ b + a @ db)),
            rms(scale * (da @ db)),
        )
    )
  return {name: jnp.stack(column) for name, column in zip(DIAGNOSTICS, zip(*rows))}


def _make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, diagnostics: bool
) -> Callable:
  """One jitted step over the split state; ``jax.jit`` measured ~10% faster than ``nnx.jit`` here."""

  def loss_fn(trainable, frozen, ids, mask, labels):
    logits = nnx.merge(graphdef, trainable, frozen)(ids, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(trainable, opt_state, frozen, ids, mask, labels):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids, mask, labels)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    new = optax.apply_updates(trainable, updates)
    return new, opt_state, loss, pair_diagnostics(trainable, new) if diagnostics else {}

  return jax.jit(step, donate_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=0)
def _predict(
    graphdef: nnx.GraphDef, trainable: Any, frozen: Any, ids: jax.Array, mask: jax.Array
) -> jax.Array:
  """Class predictions; module-level so its compilations are shared by all runs."""
  return jnp.argmax(nnx.merge(graphdef, trainable, frozen)(ids, mask), -1)


def evaluate(
    graphdef: nnx.GraphDef, trainable: Any, frozen: Any, chunks: Sequence[EvalChunk]
) -> float:
  """Held-out accuracy over ``chunks``."""
  correct = 0
  for c in chunks:
    pred = np.asarray(_predict(graphdef, trainable, frozen, c.input_ids, c.attention_mask))
    correct += int(np.sum(pred[: c.real] == c.labels))
  return correct / sum(c.real for c in chunks)


# ----------------------------------------------------------------------------- run


def adapter_rank(train: str, lora_rank: int) -> int | None:
  """The LoRA rank a model trained in mode ``train`` is built with (``None``: no adapters)."""
  return lora_rank if train in ("lora", "lora_stats") else None


def run(
    optimizer_name: str,
    tx_factory: Factory,
    peak_lr: float,
    seed: int,
    *,
    steps: int = 150,
    batch: int = 32,
    warmup_frac: float = 0.1,
    lora_rank: int = 8,
    train: str = "lora",
    eval_examples: int = 2000,
    eval_every: int = 25,
    diagnostics: bool = False,
    on_params: Callable[[int, Any], None] | None = None,
    progress: bool = True,
) -> dict:
  """Fine-tunes one model with ``tx_factory(family.warmup_cosine(peak_lr, steps, warmup_frac))``.

  ``train`` (a :data:`TRAIN_MODES` key) picks what trains; ``lora_rank`` only
  applies to ``lora``. Held-out accuracy is measured every ``eval_every`` steps
  and after the last one. ``on_params(t, trainable)`` (tests, debugging) sees the trainable
  ``nnx.State`` after ``t`` steps, from ``t = 0``; copy what you keep, the
  buffers are donated to the next step.

  Returns a JSON-ready dict: the settings, ``losses`` (per step),
  ``eval_steps``/``accuracies``, ``final_accuracy``, ``best_accuracy``, wall
  times, and with ``diagnostics`` the per-pair :func:`pair_diagnostics` of
  every step (``diagnostics.per_pair[metric][step][pair]``).
  """
  if diagnostics and train != "lora":
    raise ValueError(f"diagnostics measure LoRA pairs; train={train!r} has none")
  start = time.perf_counter()
  data, _ = _data()
  chunks = eval_chunks(eval_examples)
  rank = adapter_rank(train, lora_rank)
  model = build_model(seed, rank, weight_stats=train == "lora_stats")
  graphdef, trainable, frozen = nnx.split(model, TRAIN_MODES[train], ...)
  tx = tx_factory(warmup_cosine(peak_lr, steps, warmup_frac))
  opt_state = tx.init(trainable)
  train_step = _make_train_step(graphdef, tx, diagnostics)
  order = batch_order(seed, steps * batch, len(data)).reshape(steps, batch)
  eval_at = eval_schedule(steps, eval_every)
  losses, eval_steps, accuracies, per_step = [], [], [], []
  times = {"first_step_s": 0.0, "train_s": 0.0, "eval_s": 0.0}
  if on_params is not None:
    on_params(0, trainable)
  bar = tqdm(
      range(steps),
      desc=f"{optimizer_name} lr={peak_lr:g} seed={seed}",
      leave=False,
      disable=not progress,
  )
  for t in bar:
    rows = order[t]
    tick = time.perf_counter()
    trainable, opt_state, loss, diag = train_step(
        trainable,
        opt_state,
        frozen,
        data.input_ids[rows],
        data.attention_mask[rows],
        data.labels[rows],
    )
    losses.append(float(loss))
    times["train_s"] += time.perf_counter() - tick
    if t == 0:
      times["first_step_s"] = times["train_s"]  # mostly compilation
    if diagnostics:
      per_step.append({k: np.asarray(v).tolist() for k, v in diag.items()})
    if on_params is not None:
      on_params(t + 1, trainable)
    if t + 1 in eval_at:
      tick = time.perf_counter()
      accuracies.append(evaluate(graphdef, trainable, frozen, chunks))
      eval_steps.append(t + 1)
      times["eval_s"] += time.perf_counter() - tick
      bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{accuracies[-1]:.3f}")
  result = dict(
      optimizer=optimizer_name,
      lr=peak_lr,
      seed=seed,
      steps=steps,
      batch=batch,
      warmup_steps=warmup_steps(warmup_frac, steps),
      lora_rank=rank,
      train=train,
      eval_examples=len(eval_indices(eval_examples)),
      losses=losses,
      eval_steps=eval_steps,
      accuracies=accuracies,
      final_accuracy=accuracies[-1],
      best_accuracy=max(accuracies),
      finite=bool(np.all(np.isfinite(losses))),
      wall_s=time.perf_counter() - start,
      **times,
  )
  if diagnostics:
    result["diagnostics"] = dict(
        pairs=list(lora_factors(trainable)),
        per_pair={k: [row[k] for row in per_step] for k in DIAGNOSTICS},
    )
  return result


def diagnostics_summary(result: dict, early: int = 30) -> dict[str, dict[str, float]]:
  """Medians over steps (the first ``early`` and all) of the pair-median and pair-max of each diagnostic.

  ``ratio`` is ``w2_rms / w1_rms`` per pair and step (steps with no update,
  such as step 0 at lr 0, are skipped).
  """
  per = {k: np.asarray(v, dtype=float) for k, v in result["diagnostics"]["per_pair"].items()}
  with np.errstate(divide="ignore", invalid="ignore"):
    per["ratio"] = np.where(per["w1_rms"] > 0, per["w2_rms"] / per["w1_rms"], np.nan)
  out = {}
  for name, values in per.items():
    for span, rows in (("early", values[:early]), ("all", values)):
      rows = rows[~np.all(np.isnan(rows), axis=1)]
      out.setdefault(name, {})[f"{span}_median"] = float(np.median(np.nanmedian(rows, axis=1)))
      out[name][f"{span}_max"] = float(np.median(np.nanmax(rows, axis=1)))
      out[name][f"{span}_peak"] = float(np.nanmax(rows))
  return out


# ------------------------------------------------------------------------ reporting


def ci95(values: Sequence[float]) -> float | None:
  """Half-width of the two-sided 95% Student-t interval for the mean (``None`` for one value)."""
  if len(values) < 2:
    return None
  return float(
      scipy.stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values))
  )


def summarize(runs: Sequence[dict]) -> dict[str, dict]:
  """Per optimizer: per lr the final and best accuracy over seeds, and the best lr.

  ``final_std`` is the population std (``ddof=0``), ``final_ci95`` the
  Student-t half-width. The best lr has the highest mean final accuracy over
  the seeds that every lr of that optimizer ran (seed 0 under ``--sweep``), so
  lrs are compared on the same seeds.
  """
  groups: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
  for r in runs:
    groups[r["optimizer"]][r["lr"]].append(r)
  summary = {}
  for name, by_lr in groups.items():
    stats = {}
    for lr, rs in sorted(by_lr.items()):
      rs = sorted(rs, key=operator.itemgetter("seed"))
      final, best = np.array([r["final_accuracy"] for r in rs]), np.array(
          [r["best_accuracy"] for r in rs]
      )
      stats[lr] = dict(
          seeds=[r["seed"] for r in rs],
          finals=final.tolist(),
          final_mean=final.mean(),
          final_std=final.std(),
          final_ci95=ci95(final),
          final_min=final.min(),
          final_max=final.max(),
          best_mean=best.mean(),
          best_std=best.std(),
      )
    common = set.intersection(*(set(st["seeds"]) for st in stats.values()))
    on_common = lambda lr: np.mean(
        [f for seed, f in zip(stats[lr]["seeds"], stats[lr]["finals"]) if seed in common]
    )
    summary[name] = dict(lrs=stats, best_lr=max(stats, key=on_common))
  return summary


def paired_differences(
    runs: Sequence[dict], summary: dict[str, dict], reference: str = "adaprelora"
) -> dict[str, dict]:
  """Per optimizer, final accuracy minus ``reference``'s, both at their best lr, seed by seed.

  A seed fixes the init and batch order for every optimizer, so the paired
  differences vary less than either accuracy. Empty without ``reference``.
  """
  if reference not in summary:
    return {}
  final = lambda name: {
      r["seed"]: r["final_accuracy"]
      for r in runs
      if r["optimizer"] == name and r["lr"] == summary[name]["best_lr"]
  }
  ref = final(reference)
  out = {}
  for name in summary:
    mine = final(name)
    seeds = sorted(set(mine) & set(ref))
    if name == reference or not seeds:
      continue
    diffs = [mine[s] - ref[s] for s in seeds]
    out[name] = dict(seeds=seeds, diffs=diffs, mean=float(np.mean(diffs)), ci95=ci95(diffs))
  return out


def format_table(summary: dict[str, dict], baseline: float, paired: dict[str, dict]) -> str:
  """Accuracy per optimizer and lr (mean ± std over seeds, best lr starred), then summary lines."""
  lines = [f"{'optimizer':<24} {'lr':>8} {'seeds':>5}  {'final acc':>15}  {'best acc':>15}"]
  for name, s in summary.items():
    for lr, st in s["lrs"].items():
      star = " *" if lr == s["best_lr"] else ""
      lines.append(
          f"{name:<24} {lr:>8.0e} {len(st['seeds']):>5}  {st['final_mean']:.4f} ± {st['final_std']:.4f}"
          f"  {st['best_mean']:.4f} ± {st['best_std']:.4f}{star}"
      )
  lines.append(f"majority-class baseline: {baseline:.4f}")
  for name, s in summary.items():
    st = s["lrs"][s["best_lr"]]
    ci = "" if st["final_ci95"] is None else f", 95% CI ± {st['final_ci95']:.4f}"
    lines.append(
        f"SUMMARY {name}: best lr {s['best_lr']:g}, final held-out accuracy "
        f"{st['final_mean']:.4f} ± {st['final_std']:.4f}{ci} over {len(st['seeds'])} seed(s) "
        f"[{' '.join(f'{f:.4f}' for f in st['finals'])}]"
    )
  for name, d in paired.items():
    ci = "" if d["ci95"] is None else f" ± {d['ci95']:.4f} (95% CI)"
    lines.append(
        f"PAIRED {name} - adaprelora: {d['mean']:+.4f}{ci} over seeds {d['seeds']} "
        f"[{' '.join(f'{x:+.4f}' for x in d['diffs'])}]"
    )
  return "\n".join(lines)


def plot(runs: Sequence[dict], summary: dict[str, dict], baseline: float, path: Path) -> None:
  """Left: accuracy vs step at each optimizer's best lr. Right: final accuracy vs lr.

  Curves average the runs at the best lr with the most evaluations (under
  ``--sweep``, seed 0 ran there as a grid point evaluated at the end only),
  with a min-max band; the legend gives the final accuracy over all seeds.
  Reference lines are black, dashed.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (curves, sweep) = plt.subplots(1, 2, figsize=(15, 5.5))
  colors = itertools.cycle(plt.get_cmap("tab10").colors)
  ref_styles = itertools.cycle(("-.", "--"))
  for name, s in summary.items():
    best = s["lrs"][s["best_lr"]]
    rs = [r for r in runs if r["optimizer"] == name and r["lr"] == s["best_lr"]]
    longest = max(len(r["eval_steps"]) for r in rs)
    rs = [r for r in rs if len(r["eval_steps"]) == longest]
    acc = np.array([r["accuracies"] for r in rs])
    ref = name in REFERENCES
    style = dict(color="black", linestyle=next(ref_styles)) if ref else dict(color=next(colors))
    curves.plot(
        rs[0]["eval_steps"],
        acc.mean(0),
        marker="o",
        markersize=3,
        label=f"{name} (lr={s['best_lr']:g}): {best['final_mean']:.3f}",
        **style,
    )
    curves.fill_between(rs[0]["eval_steps"], acc.min(0), acc.max(0), alpha=0.15, **style)
    lrs = list(s["lrs"])
    mean = np.array([s["lrs"][lr]["final_mean"] for lr in lrs])
    spread = [
        mean - [s["lrs"][lr]["final_min"] for lr in lrs],
        [s["lrs"][lr]["final_max"] for lr in lrs] - mean,
    ]
    sweep.errorbar(lrs, mean, yerr=spread, marker="o", capsize=3, label=name, **style)
  for ax in (curves, sweep):
    ax.axhline(baseline, color="gray", linestyle=":", label="majority class")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  curves.set_xlabel("step")
  curves.set_title("accuracy at the best lr (mean over seeds, min-max band)")
  sweep.set_xscale("log")
  sweep.set_xlabel("peak learning rate")
  sweep.set_title("final accuracy vs lr (mean, min-max over the seeds run)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------------------- jobs

SIZES = {
    # The main job: all eleven methods in about 7 minutes on 2 shared CPU cores.
    "cpu": dict(steps=80, batch=32, eval_examples=1000, eval_every=20),
    "cpu_sweep": dict(steps=150, batch=32, eval_examples=2000, eval_every=25),
    # All 8179 held-out definitions; 0.5 epoch (main) and 1.3 epochs (sweep) of the 73,936
    # training definitions.
    "gpu": dict(steps=600, batch=64, eval_examples=10_000, eval_every=50),
    "gpu_sweep": dict(steps=1500, batch=64, eval_examples=10_000, eval_every=100),
}
"""Defaults of ``--size`` (``_sweep``: with ``--sweep``, the tuning protocol); any flag given overrides its entry."""

Execute = Callable[[str, float, int, int], dict]
"""``execute(optimizer, lr, seed, eval_every)``: one finished run."""


def sweep_jobs(
    names: Sequence[str],
    lrs: dict[str, list[float]],
    seeds: Sequence[int],
    grid_eval_every: int,
    eval_every: int,
    execute: Execute,
) -> None:
  """The tuning protocol, the same for every method, phase by phase so partial results are useful.

  1. every method's grid on ``seeds[0]``, evaluated every ``grid_eval_every``
     steps (final accuracy does not depend on it);
  2. for each method whose best ``seeds[0]`` lr is at an edge of its grid,
     one more lr past that edge (:func:`beyond_edge`), once;
  3. ``seeds[1:]`` at each method's best ``seeds[0]`` lr, evaluated every
     ``eval_every`` steps for the curves.
  """
  first = {n: {lr: execute(n, lr, seeds[0], grid_eval_every) for lr in lrs[n]} for n in names}
  best = lambda n: max(first[n], key=lambda lr: first[n][lr]["final_accuracy"])
  for n in names:
    if len(lrs[n]) > 1 and best(n) in (min(lrs[n]), max(lrs[n])):
      lr = beyond_edge(best(n), up=best(n) == max(lrs[n]))
      first[n][lr] = execute(n, lr, seeds[0], grid_eval_every)
  for n in names:
    for seed in seeds[1:]:
      execute(n, best(n), seed, eval_every)


def _run_key(r: dict) -> tuple:
  """What two runs must share to be interchangeable (eval frequency aside)."""
  fields = ("optimizer", "lr", "seed", "steps", "batch", "warmup_steps", "lora_rank")
  return (*(r[k] for k in fields), r.get("train", "lora"), r["eval_examples"])


def load_reusable(paths: Sequence[Path]) -> dict[tuple, dict]:
  """Runs of earlier ``finetune.json`` files (same weight decay) by :func:`_run_key`; first wins."""
  found = {}
  for path in paths:
    saved = json.loads(path.read_text())
    if saved["weight_decay"] != WEIGHT_DECAY:
      raise SystemExit(f"{path}: weight decay {saved['weight_decay']} != {WEIGHT_DECAY}")
    for r in saved["runs"]:
      found.setdefault(_run_key(r), {**r, "source": r.get("source", str(path))})
  return found


def _parse_lrs(
    values: Sequence[str] | None, names: Sequence[str], sweep: bool
) -> dict[str, list[float]]:
  """``--lrs``: plain floats for every optimizer, or ``name=lr1,lr2`` per optimizer; else grid or tuned lr."""
  plain = [float(v) for v in values or () if "=" not in v]
  named = {
      k: [float(x) for x in v.split(",")]
      for k, _, v in (s.partition("=") for s in values or () if "=" in s)
  }
  unknown = set(named) - set(names)
  if unknown:
    raise SystemExit(f"--lrs names optimizers that are not run: {sorted(unknown)}")
  default = lambda n: list(GRIDS[family(n)]) if sweep else [TUNED_LR[family(n)]]
  return {n: named.get(n) or plain or default(n) for n in names}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The command line, with every size default filled in from ``--size`` (and ``--sweep``)."""
  parser = argparse.ArgumentParser(
      description="MiniLM + LoRA fine-tuning on WordNet noun categories: "
      "held-out accuracy per optimizer and learning rate."
  )
  parser.add_argument(
      "--optimizers",
      nargs="+",
      default=[*FAMILY, *REFERENCES],
      help=f"names from {sorted(OPTIMIZERS)}, or adamw:k=v,... / adaprelora:k=v,...",
  )
  parser.add_argument(
      "--lrs",
      nargs="+",
      help="peak lrs for every optimizer, or name=lr1,lr2 per optimizer "
      "(default: the tuned lr, or the grid with --sweep)",
  )
  parser.add_argument(
      "--sweep",
      action="store_true",
      help=f"the tuning protocol (grids on the first seed, one lr past an edge, the other seeds "
      f"at the best lr), seeds 0 1 2 and {SIZES['cpu_sweep']} at --size cpu unless given",
  )
  parser.add_argument("--size", choices=["cpu", "gpu"], default="cpu")
  parser.add_argument("--seeds", nargs="+", type=int)
  parser.add_argument("--steps", type=int, help=f"default: by --size, {SIZES}")
  parser.add_argument("--batch", type=int)
  parser.add_argument("--warmup-frac", type=float, default=0.1)
  parser.add_argument("--lora-rank", type=int, default=8)
  parser.add_argument("--eval-examples", type=int, help="default: by --size")
  parser.add_argument("--eval-every", type=int, help="default: by --size")
  parser.add_argument(
      "--grid-eval-every",
      type=int,
      help="evaluation interval of --sweep's grid runs (default: at the last step only)",
  )
  parser.add_argument(
      "--reuse",
      nargs="+",
      type=Path,
      default=[],
      help="finetune.json files whose runs with the same settings are taken instead of rerun",
  )
  parser.add_argument(
      "--diagnostics", action="store_true", help="record factor norms and W-step RMS per step"
  )
  parser.add_argument("--out", type=Path, default=Path("benchmarks/out/finetune"))
  args = parser.parse_args(argv)
  fill_defaults(args, SIZES[args.size + ("_sweep" if args.sweep else "")])
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)

  factories = {name: resolve_optimizer(name) for name in args.optimizers}
  lrs = _parse_lrs(args.lrs, args.optimizers, args.sweep)
  seeds = args.seeds or ([0, 1, 2] if args.sweep else [0])
  reusable = load_reusable(args.reuse)
  args.out.mkdir(parents=True, exist_ok=True)
  json_path, png_path = args.out / "finetune.json", args.out / "finetune.png"
  baseline = majority_baseline(args.eval_examples)
  report = dict(
      config=vars(args), weight_decay=WEIGHT_DECAY, majority_baseline=baseline, sources=[], runs=[]
  )

  def save() -> None:
    """JSON and plot of the runs so far: an interrupted job leaves a consistent summary."""
    report["summary"] = summarize(report["runs"])
    report["paired_vs_adaprelora"] = paired_differences(report["runs"], report["summary"])
    report["wall_s"] = time.perf_counter() - start
    json_path.write_text(json.dumps(report, indent=1, default=str))
    plot(report["runs"], report["summary"], baseline, png_path)

  bar = tqdm(desc="runs", unit="run")
  start = time.perf_counter()

  def execute(name: str, lr: float, seed: int, eval_every: int) -> dict:
    mode = train_mode(name)
    planned = dict(
        optimizer=name,
        lr=lr,
        seed=seed,
        steps=args.steps,
        batch=args.batch,
        warmup_steps=warmup_steps(args.warmup_frac, args.steps),
        lora_rank=adapter_rank(mode, args.lora_rank),
        train=mode,
        eval_examples=len(eval_indices(args.eval_examples)),
    )
    result = None if args.diagnostics else reusable.get(_run_key(planned))
    if result is None:
      result = run(
          name,
          factories[name],
          lr,
          seed,
          steps=args.steps,
          batch=args.batch,
          warmup_frac=args.warmup_frac,
          lora_rank=args.lora_rank,
          train=mode,
          eval_examples=args.eval_examples,
          eval_every=eval_every,
          diagnostics=args.diagnostics,
      )
      if args.diagnostics:
        result["diagnostics"]["summary"] = diagnostics_summary(result)
    elif result["source"] not in report["sources"]:
      report["sources"].append(result["source"])
    report["runs"].append(result)
    bar.update()
    tqdm.write(
        f"{name} lr={lr:g} seed={seed}: final {result['final_accuracy']:.4f} "
        f"best {result['best_accuracy']:.4f} "
        + (f"(from {result['source']})" if "source" in result else f"({result['wall_s']:.0f} s)")
    )
    save()
    return result

  if args.sweep:
    grid_eval_every = args.grid_eval_every or args.steps
    sweep_jobs(args.optimizers, lrs, seeds, grid_eval_every, args.eval_every, execute)
  else:
    for name in args.optimizers:
      for lr in lrs[name]:
        for seed in seeds:
          execute(name, lr, seed, args.eval_every)
  bar.close()
  print(format_table(report["summary"], baseline, report["paired_vs_adaprelora"]))
  if args.diagnostics:
    for r in report["runs"]:
      print(
          f"diagnostics {r['optimizer']} lr={r['lr']:g} seed={r['seed']} (median over steps of pair-median"
          f" / pair-max; early = first 30 steps):"
      )
      for metric, v in r["diagnostics"]["summary"].items():
        print(
            f"  {metric:>7}: early {v['early_median']:.3e} / {v['early_max']:.3e}   "
            f"all {v['all_median']:.3e} / {v['all_max']:.3e}   peak {v['all_peak']:.3e}"
        )
  print(f"wrote {json_path} and {png_path} ({report['wall_s']:.0f} s)")
  return report


if __name__ == "__main__":
  main()
