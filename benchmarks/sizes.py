"""``--size``: each benchmark's CPU-sized defaults, or its GPU-sized ones."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any


def fill_defaults(args: argparse.Namespace, defaults: Mapping[str, Any]) -> None:
  """Sets each flag in ``defaults`` that was not given (``None``) to its size's value."""
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
