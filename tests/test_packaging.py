"""The declared dependency floors are the versions CI's oldest set tests."""

import pathlib
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = pathlib.Path(__file__).parent.parent


def _pins(path: pathlib.Path) -> dict[str, Version]:
  pins = {}
  for line in path.read_text().splitlines():
    line = line.split("#")[0].strip()
    if "==" in line:
      name, version = line.split("==")
      pins[name.strip().lower().replace("_", "-")] = Version(version.strip())
  return pins


def test_every_floor_is_the_oldest_tested_version():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  oldest = _pins(ROOT / "scripts" / "constraints-oldest.txt")
  floors = {}
  for line in project["dependencies"]:
    req = Requirement(line)
    for spec in req.specifier:
      if spec.operator == ">=":
        floors[req.name.lower()] = Version(spec.version)
  assert floors, "no dependency declares a floor"
  wrong = {name: (str(floor), str(oldest.get(name))) for name, floor in floors.items()
           if oldest.get(name) != floor}
  assert not wrong, f"floor != version in constraints-oldest.txt: {wrong}"
