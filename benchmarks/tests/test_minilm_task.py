"""The MiniLM task and the main job (benchmarks/finetune.py) at a tiny size."""

from __future__ import annotations

import pytest
from flax import nnx

from adaprelora_jax.functional import split_weight_stats
from benchmarks import finetune, minilm_wordnet, record, tasks
from benchmarks.family import FAMILY

TINY = dict(steps=3, batch=4, eval_examples=16, eval_every=2)


def test_run_records_the_schedule_and_the_held_out_accuracy():
  task = tasks.get("minilm")
  size = {**task.sizes["cpu"], **TINY}
  runs = [task.run(task.methods[n].factory, 1e-3, 0, size, progress=False) for n in ("adamw", "adaprelora")]
  for run in runs:
    assert run.eval_steps == [2, 3] and len(run.losses) == 3 and run.final == run.values[-1]
    assert all(0 <= v <= 1 for v in run.values) and run.best == max(run.values)
    assert run.settings == size and not run.diverged
  # Same seed, same init and batches: the first loss (before any update) is the same.
  assert runs[0].losses[0] == pytest.approx(runs[1].losses[0], rel=1e-6)
  assert runs[0].losses[1:] != runs[1].losses[1:]


def _trainable_paths(train: str) -> set[str]:
  model = minilm_wordnet.build_model(0, minilm_wordnet.adapter_rank(train, 8))
  _, trainable, _ = nnx.split(model, minilm_wordnet.TRAIN_MODES[train], ...)
  return {"/".join(map(str, path[:-1] if path[-1] == "value" else path))
          for path, _ in nnx.to_flat_state(trainable)}


def test_reference_modes_train_what_they_say():
  methods = tasks.get("minilm").methods
  assert methods["head_only_adamw"].overrides == {"train": "head"}
  assert methods["full_ft_adamw"].overrides == {"train": "full"}
  assert _trainable_paths("head") == {"head/kernel", "head/bias"}
  full = _trainable_paths("full")
  # Every pretrained weight (6 layers x 16, 5 embedding leaves) plus the head, no adapters.
  assert "encoder/word_embeddings" in full and len(full) == 6 * 16 + 5 + 2
  assert not any("lora" in p for p in full | _trainable_paths("head"))


def test_full_statistics_come_from_the_probes():
  """``adaprelora_full`` trains with probes, and its optimizer is fed their statistics."""
  seen = []
  method = tasks.get("minilm").methods["adaprelora_full"]

  def spy(schedule, weight_decay):
    tx = method.factory(schedule, weight_decay)

    def update(grads, state, params=None, **extra):
      seen.append(sorted(split_weight_stats(grads)[1]))
      return tx.update(grads, state, params, **extra)

    return tx._replace(update=update)

  size = {**tasks.get("minilm").sizes["cpu"], **TINY, **method.overrides}
  run = minilm_wordnet.run(spy, 3e-3, 0, size, progress=False)
  assert size["train"] == "lora_stats" and len(run.losses) == 3 and not run.diverged
  assert seen and seen[0] == [f"encoder/layers/{i}/{p}/lora" for i in range(6) for p in ("query", "value")]


def test_main_job_runs_the_default_comparison_at_the_tuned_lrs(tmp_path, capsys):
  tiny = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
  finetune.main([*tiny, "--out", str(tmp_path)])
  out = tmp_path / "finetune.json"
  saved = record.read(out)
  assert [(r.optimizer, r.lr, r.seed) for r in saved["runs"]] == [
      (name, finetune.TUNED_LR[name], 0) for name in finetune.DEFAULT]
  assert out.with_suffix(".png").stat().st_size > 0
  printed = capsys.readouterr().out
  assert f"wrote {out}" in printed and " ± " not in printed  # one seed shows no spread


def test_main_job_family_flag_runs_every_method_and_the_references(monkeypatch):
  plans = []
  monkeypatch.setattr(finetune, "sweep", lambda task, size, plan, *a, **k: plans.append(plan))
  finetune.main(["--family"])
  assert list(plans[0].lrs) == [*FAMILY, *finetune.REFERENCES]
  assert all(lrs == [finetune.TUNED_LR[n]] for n, lrs in plans[0].lrs.items())
  with pytest.raises(SystemExit, match="no tuned lr"):
    finetune.main(["--optimizers", "sgd"])
