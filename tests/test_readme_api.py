"""The README's API table against the real signatures.

Every backticked `name(args)` in the first column of the table under
`## API` must list every parameter of `inspect.signature(name)`: the same
names in the same order, the same kinds (`/`, `*`, `*args`, `**kwargs`), and a
default exactly where the function has one, written as a Python expression
that evaluates (in the module that defines the name) to a value equal to the
real default (`1e-4` for 0.0001, `JOINED` for `Layout()`). Annotations are not
compared. `name(...)` means "see above" and is skipped. `name` resolves in
`adaprelora_jax`; a dotted name (`adaprelora_jax.restore_state`)
in its module; a cell that starts with a module (`` `adaprelora_jax.baselines`: ``)
resolves its bare names there.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import pathlib
import re
from typing import Any, Callable, NamedTuple

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
PACKAGE = "adaprelora_jax"
_CALL = re.compile(r"^([A-Za-z_][\w.]*)\((.*)\)$", re.DOTALL)
_MODULE_PREFIX = re.compile(r"^`([A-Za-z_][\w.]*)`\s*:")
_MISSING = object()


class Entry(NamedTuple):
  line: int     # 1-based line of the table row in the README
  module: str   # where `name` resolves
  name: str
  args: str     # the text between the parentheses


class Param(NamedTuple):
  name: str
  kind: str     # "positional-only", "positional or keyword", "*args", ...
  default: str  # the default as written (README) or its repr (signature); "" if none


def api_section(text: str) -> list[tuple[int, str]]:
  """(line number, line) of the `## API` section, up to the next `## `."""
  lines = text.splitlines()
  start = next((i for i, l in enumerate(lines) if l.strip() == "## API"), None)
  if start is None:
    raise AssertionError("README.md has no '## API' section")
  out = []
  for i in range(start + 1, len(lines)):
    if lines[i].startswith("## "):
      break
    out.append((i + 1, lines[i]))
  return out


def split_row(line: str) -> list[str]:
  """A Markdown table row's cells; `\\|` is a literal pipe, not a separator."""
  cells, cell, i, s = [], [], 0, line.strip()
  if s.startswith("|"):
    s = s[1:]
  if s.endswith("|") and not s.endswith("\\|"):
    s = s[:-1]
  while i < len(s):
    if s[i] == "\\" and i + 1 < len(s) and s[i + 1] == "|":
      cell.append("|")
      i += 2
      continue
    if s[i] == "|":
      cells.append("".join(cell).strip())
      cell = []
    else:
      cell.append(s[i])
    i += 1
  cells.append("".join(cell).strip())
  return cells


def table_entries(text: str) -> list[Entry]:
  """Every `name(args)` in the first column of the API section's table."""
  entries = []
  for number, line in api_section(text):
    if not line.lstrip().startswith("|"):
      continue
    first = split_row(line)[0]
    if not first or set(first) <= set("-: ") or first == "name":
      continue
    prefix = _MODULE_PREFIX.match(first)
    module = prefix.group(1) if prefix else PACKAGE
    for span in re.findall(r"`([^`]*)`", first):
      call = _CALL.match(span.strip())
      if not call:
        continue
      name, args = call.groups()
      where = module
      if name.startswith(PACKAGE + "."):
        where, _, name = name.rpartition(".")
      entries.append(Entry(number, where, name, args))
  return entries


def resolve(entry: Entry) -> Callable[..., Any]:
  return getattr(importlib.import_module(entry.module), entry.name)


def readme_params(entry: Entry) -> list[Param]:
  """The README's parameter list, read by Python's own parser."""
  source = f"def _f({entry.args}): pass"
  try:
    fn = ast.parse(source).body[0]
  except SyntaxError as e:
    raise AssertionError(
        f"README.md:{entry.line}: `{entry.name}({entry.args})` is not a "
        f"parameter list: {e.msg}") from None
  a = fn.args
  seg = lambda node: ast.get_source_segment(source, node) if node is not None else ""
  positional = a.posonlyargs + a.args
  defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
  out = []
  for i, (p, d) in enumerate(zip(positional, defaults)):
    kind = "positional-only" if i < len(a.posonlyargs) else "positional or keyword"
    out.append(Param(p.arg, kind, seg(d)))
  if a.vararg:
    out.append(Param(a.vararg.arg, "*args", ""))
  for p, d in zip(a.kwonlyargs, a.kw_defaults):
    out.append(Param(p.arg, "keyword-only", seg(d)))
  if a.kwarg:
    out.append(Param(a.kwarg.arg, "**kwargs", ""))
  return out


_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional-only",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional or keyword",
    inspect.Parameter.VAR_POSITIONAL: "*args",
    inspect.Parameter.KEYWORD_ONLY: "keyword-only",
    inspect.Parameter.VAR_KEYWORD: "**kwargs",
}


def real_params(fn: Callable[..., Any]) -> list[tuple[Param, Any]]:
  """(Param with the default's repr, the default itself or _MISSING)."""
  out = []
  for p in inspect.signature(fn).parameters.values():
    has = p.default is not inspect.Parameter.empty
    out.append((Param(p.name, _KINDS[p.kind], repr(p.default) if has else ""),
                p.default if has else _MISSING))
  return out


def _same_default(written: str, real: Any, namespace: dict[str, Any]) -> bool:
  if real is _MISSING or not written:
    return real is _MISSING and not written
  try:
    value = eval(written, dict(namespace))  # noqa: S307 - README text, tests only
  except Exception:  # noqa: BLE001 - a default that does not evaluate differs
    return False
  if isinstance(value, bool) != isinstance(real, bool):
    return False  # True == 1, but `True` is not the default 1
  try:
    return bool(value == real)
  except Exception:  # noqa: BLE001 - e.g. arrays: compare by identity only
    return value is real


def render(p: Param) -> str:
  return f"{p.name}: {p.kind}" + (f", default {p.default}" if p.default else ", no default")


def compare(entry: Entry, fn: Callable[..., Any]) -> str:
  """'' when the README row matches the signature, else a readable diff."""
  written = readme_params(entry)
  real = real_params(fn)
  namespace = vars(importlib.import_module(fn.__module__)) if getattr(
      fn, "__module__", None) else {}
  namespace = {**vars(importlib.import_module(entry.module)), **namespace}
  ok = len(written) == len(real) and all(
      w.name == r.name and w.kind == r.kind
      and _same_default(w.default, value, namespace)
      for w, (r, value) in zip(written, real))
  if ok:
    return ""
  # Show each default as written where it evaluates to the real one, so that
  # the diff only marks the parameters that differ.
  shown = []
  for i, (r, value) in enumerate(real):
    w = written[i] if i < len(written) else None
    if w and w.name == r.name and _same_default(w.default, value, namespace):
      r = r._replace(default=w.default)
    shown.append(r)
  diff = difflib.unified_diff(
      [render(p) for p in written], [render(p) for p in shown],
      fromfile=f"README.md:{entry.line} {entry.name}(...)",
      tofile=f"inspect.signature({entry.module}.{entry.name})", lineterm="")
  return "\n".join(diff)


def check(text: str) -> list[str]:
  """Every mismatch between the table and the code, one diff each."""
  problems = []
  for entry in table_entries(text):
    if entry.args.strip() == "...":
      continue
    try:
      fn = resolve(entry)
    except (ImportError, AttributeError) as e:
      problems.append(f"README.md:{entry.line}: `{entry.name}` is not in "
                      f"{entry.module}: {e}")
      continue
    try:
      diff = compare(entry, fn)
    except AssertionError as e:
      diff = str(e)
    if diff:
      problems.append(diff)
  return problems


# --- the README ------------------------------------------------------------

def test_readme_api_table_matches_signatures():
  text = README.read_text(encoding="utf-8")
  entries = [e for e in table_entries(text) if e.args.strip() != "..."]
  assert len(entries) >= 8, f"found too few signatures in the API table: {entries}"
  problems = check(text)
  assert not problems, (
      "README.md's API table differs from the code (fix the README row):\n\n"
      + "\n\n".join(problems))


PUBLIC_MODULES = ("adaprelora_jax", "adaprelora_jax.functional", "adaprelora_jax.baselines",
                  "adaprelora_jax.flax")


def test_readme_api_section_names_every_public_name():
  section = "\n".join(line for _, line in api_section(README.read_text(encoding="utf-8")))
  missing = [f"{module}.{name}" for module in PUBLIC_MODULES
             for name in importlib.import_module(module).__all__
             if not re.search(rf"\b{re.escape(name)}\b", section)]
  assert not missing, f"README.md's API section does not mention {missing}"


# --- the parser and the check, on tables written here ----------------------

_TABLE = """# t

## API

| name | what it is |
|---|---|
| {row} | the thing |
| `scale_by_adaprelora(...)` | see above |

## Next
| `not_in_the_api(x)` | after the section |
"""


def _table(row: str) -> str:
  return _TABLE.format(row=row)


def test_parser_reads_rows_pipes_modules_and_skips_ellipsis():
  text = _table("`lora_pairs(params, rule=None)`, `adaprelora_jax.functional."
                "w_step_rms(a)`, `Layout`")
  entries = table_entries(text)
  assert [(e.module, e.name, e.args) for e in entries] == [
      ("adaprelora_jax", "lora_pairs", "params, rule=None"),
      ("adaprelora_jax.functional", "w_step_rms", "a"),
      ("adaprelora_jax", "scale_by_adaprelora", "..."),
  ]
  assert entries[0].line == 7
  assert split_row(r'| `f(x="a"\|"b")` | y |') == ['`f(x="a"|"b")`', "y"]
  text = _table("`adaprelora_jax.baselines`: `lora_plus(learning_rate)`")
  assert [(e.module, e.name) for e in table_entries(text)][0] == (
      "adaprelora_jax.baselines", "lora_plus")


def test_correct_row_passes():
  row = ("`lora_pairs(params, rule=None)`, `adaprelora_jax.functional.w_step_rms(a, b, delta_a, delta_b, *, "
         "scale=1.0)`, `restore_state(path, tx, params, "
         "shardings=None, *, checkpointer=None)`")
  assert check(_table(row)) == []


def test_defaults_compare_as_values():
  row = ("`adaprelora(learning_rate, *, b1=None, decay_rate=0.8, b2=None, "
         "eps=1e-30, damping=1e-4, lora_scale=1.0, clipping_threshold=1.0, "
         "weight_decay=0.0, mask=None, statistics=\"auto\", fallback=None, "
         "pairing=None, balancing=1.0, factor_clipping=3.0, layout=JOINED)`")
  assert check(_table(row)) == []
  assert check(_table(row.replace("damping=1e-4", "damping=1e-3")))


@pytest.mark.parametrize("row, expected", [
    # a parameter left out
    ("`lora_pairs(params)`", "+rule: positional or keyword, default None"),
    # a default that is not the code's
    ("`adaprelora_jax.functional.w_step_rms(a, b, delta_a, delta_b, *, scale=2.0)`",
     "-scale: keyword-only, default 2.0"),
    # a default the code does not have written as none
    ("`adaprelora_jax.functional.w_step_rms(a, b, delta_a, delta_b, *, scale)`",
     "-scale: keyword-only, no default"),
    # the keyword-only marker missing
    ("`adaprelora_jax.functional.w_step_rms(a, b, delta_a, delta_b, scale=1.0)`",
     "-scale: positional or keyword, default 1.0"),
    # a wrong name
    ("`skipped_steps(opt_state)`", "-opt_state: positional or keyword"),
    # the order
    ("`lora_pairs(rule=None, params=None)`",
     "-params: positional or keyword, default None"),
])
def test_wrong_row_fails_with_a_diff(row, expected):
  problems = check(_table(row))
  assert len(problems) == 1, problems
  assert expected in problems[0], problems[0]
  assert "README.md:7" in problems[0] and "inspect.signature(" in problems[0]


def test_unknown_name_and_bad_syntax_fail():
  assert "is not in adaprelora_jax" in check(_table("`no_such_function(x)`"))[0]
  assert "is not a parameter list" in check(_table("`lora_pairs(params, rule=)`"))[0]
