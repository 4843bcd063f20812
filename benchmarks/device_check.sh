#!/usr/bin/env bash
# The checks that need a GPU, in one script of under 8 minutes on one H100-class
# GPU, each writing JSON into the folder given as the argument:
#
#   bash benchmarks/device_check.sh OUT            # on a GPU machine
#   bash benchmarks/device_check.sh --smoke OUT    # the same steps, tiny, on CPU (CI)
#
#   update_cost.json     update_cost --size gpu's main table at 32 layers of 7B
#                        shapes (time / AdamW, state, peak device memory), no sweeps
#   model_r16.json,      AdamW and AdaPreLoRA (with and without b1) at the
#   model_r64.json       accelerator model's configurations: 32 layers (main
#                        table) and 2 (layer sweep) at r = 16 and 64, the
#                        measured ratios to set beside benchmarks/accelerator_model.py
#   scan_tests.json      the scanned-model tests (nnx.scan, nn.scan, stacked
#                        statistics), run on the device (--smoke: collected only)
#   full_stats_cost.json benchmarks.full_stats_cost --size gpu's tables (stdout)
#   finetune/            one MiniLM fine-tune at --size gpu (AdaPreLoRA, tuned lr)
#   steps.json           every step: command, exit status, seconds, device
#
# A failing step is recorded and the next one runs; the script exits non-zero
# if any failed. Each step has a time limit (STEP_LIMIT_S overrides them all)
# so the whole run stays inside its budget. Run it from the repository root with the project's
# environment (scripts/setup.sh) active or as PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
out="${1:?usage: device_check.sh [--smoke] OUT}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
failed=0
steps_json="$out/steps.jsonl"
: > "$steps_json"

# step NAME LIMIT_S CMD...: runs CMD with a time limit, output to OUT/NAME.log,
# and appends {name, command, rc, seconds} to steps.jsonl.
step() {
  local name="$1" limit="$2"; shift 2
  local start end rc
  echo "== $name: $*" >&2
  start=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  tail -n 5 "$out/$name.log" >&2
  "$python" - "$steps_json" "$name" "$rc" "$start" "$end" "$*" <<'EOF'
import json, sys
path, name, rc, start, end, command = sys.argv[1:]
with open(path, "a") as f:
  f.write(json.dumps({"name": name, "command": command, "rc": int(rc),
                      "seconds": round(float(end) - float(start), 1)}) + "\n")
EOF
  [ "$rc" -eq 0 ] || { echo "== $name failed ($rc)" >&2; failed=1; }
}

# Per-step time limits (s) keep the GPU run under 8 minutes in all (470 s);
# a step that runs out is recorded as failed (124) and the next one starts.
if [ "$smoke" = 1 ]; then
  export JAX_PLATFORMS=cpu
  cost=(--shrink 64 --layers 1 --repeats 2 --evict-mib 0 --optimizers adamw adaprelora)
  model=(--shrink 64 --repeats 2 --evict-mib 0 --layers 2 --layer-counts 1
         --optimizers adamw adaprelora)
  ranks=(4)
  scan=(--collect-only)  # they run in the test suite already; here: that they exist
  stats=(--tokens 64 --features 64 --layers 2 --repeats 2 --variants nnx.LoRALinear "stats (auto)")
  tune=(--steps 2 --batch 4 --eval-examples 16 --eval-every 1)
  limits=(120 120 120 120 120)
else
  cost=(--size gpu --optimizers adamw adafactor lora_plus scaled_adamw lora_pro lora_rite
        adaprelora adaprelora_b1)
  model=(--size gpu --repeats 20 --layers 32 --layer-counts 2
         --optimizers adamw adaprelora adaprelora_b1)
  ranks=(16 64)
  scan=()
  stats=(--size gpu)
  tune=(--size gpu)
  limits=(120 75 45 45 110)  # update_cost, each model_r*, scan_tests, full_stats_cost, finetune
fi
[ -n "${STEP_LIMIT_S:-}" ] && limits=("$STEP_LIMIT_S" "$STEP_LIMIT_S" "$STEP_LIMIT_S" \
  "$STEP_LIMIT_S" "$STEP_LIMIT_S")

step update_cost "${limits[0]}" "$python" -m benchmarks.update_cost "${cost[@]}" --no-scaling \
  --out "$out/update_cost"
# The accelerator model's configurations: 32 layers (main table) and 2 (sweep) per rank.
for rank in "${ranks[@]}"; do
  step "model_r$rank" "${limits[1]}" "$python" -m benchmarks.update_cost "${model[@]}" \
    --rank "$rank" --ranks --out "$out/model_r$rank"
done
step scan_tests "${limits[2]}" "$python" -m pytest -q -p no:cacheprovider -m "slow or not slow" ${scan[@]+"${scan[@]}"} \
  tests/test_flax_models.py::test_nnx_vmap_created_scan_applied_stack \
  tests/test_flax_models.py::test_linen_nn_scan_stack \
  tests/test_flax_stats.py::test_scanned_layers_give_stacked_statistics \
  --junitxml "$out/scan_tests.xml"
step full_stats_cost "${limits[3]}" "$python" -m benchmarks.full_stats_cost "${stats[@]}"
step finetune "${limits[4]}" "$python" -m benchmarks.finetune "${tune[@]}" \
  --optimizers adaprelora --seeds 0 --out "$out/finetune"

# One JSON per check, plus the steps and the device they ran on.
"$python" - "$out" <<'EOF'
import json, pathlib, shutil, sys
import xml.etree.ElementTree as ET
out = pathlib.Path(sys.argv[1])
steps = [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines() if l]
try:
  import jax
  device = jax.devices()[0].device_kind
except Exception as e:  # the record still says which steps ran
  device = f"unknown ({e})"
(out / "steps.json").write_text(json.dumps({"device": device, "steps": steps}, indent=1))
for src in out.glob("*/update_cost.json"):  # update_cost/, model_r16/, model_r64/
  shutil.copy(src, out / f"{src.parent.name}.json")
if (out / "scan_tests.xml").exists():
  suite = ET.parse(out / "scan_tests.xml").getroot().iter("testcase")
  cases = [{"test": f"{c.get('classname')}::{c.get('name')}", "seconds": float(c.get("time")),
            "outcome": next((t.tag for t in c if t.tag in ("failure", "error", "skipped")),
                            "passed")} for c in suite]
  if not cases:  # --smoke collects only
    cases = [{"test": l.strip(), "outcome": "collected"}
             for l in (out / "scan_tests.log").read_text().splitlines() if "::" in l]
  (out / "scan_tests.json").write_text(json.dumps(cases, indent=1))
log = out / "full_stats_cost.log"
if log.exists():
  (out / "full_stats_cost.json").write_text(json.dumps({"stdout": log.read_text()}, indent=1))
print(json.dumps({"device": device, "steps": steps}, indent=1))
EOF
exit "$failed"
