"""The offline demo (``segray demo``): generated aerial-like scenes, training, inference, report.

Two kinds of module live here:

- scene generators, pure numpy/PIL (never Ray, never training code), also used by tests and
  benchmarks: :mod:`segray.demo.scenes` (``make_scene``, ``write_demo_dataset``,
  ``DEMO_CLASSES``: scenes with pixel-exact class masks) and :mod:`segray.demo.instance_scenes`
  (``make_instance_scene``, ``write_instance_demo_dataset``, ``INSTANCE_DEMO_CLASSES``: the same
  scenes with separate buildings, fields and vehicles);
- runners, which drive Ray Train and Ray Data: :mod:`segray.demo.semantic` (U-Net) and
  :mod:`segray.demo.instance` (Mask R-CNN, COCO metrics and export).

Importing this package imports nothing heavy; :func:`run_demo` loads its runner when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segray.config import DemoJobConfig

__all__ = ["run_demo"]


def run_demo(cfg: DemoJobConfig) -> dict[str, Any]:
    """The demo of ``cfg.task``: semantic (U-Net on class maps) or instance (Mask R-CNN)."""
    if cfg.task == "instance":
        from segray.demo.instance import run_instance_demo

        return run_instance_demo(cfg)
    from segray.demo.semantic import run_semantic_demo

    return run_semantic_demo(cfg)
