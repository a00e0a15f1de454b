"""Deprecated alias: this research command moved to :mod:`stackgan.studies.text_probe`.

``python -m stackgan.metrics.text_probe ...`` still works (with a note) and runs
``python -m stackgan.studies.text_probe`` (started by name: metrics/ does not import studies/).
"""
import runpy
import sys

if __name__ == "__main__":
    print("note: `python -m stackgan.metrics.text_probe` is deprecated; use "
          "`python -m stackgan.studies.text_probe`", file=sys.stderr)
    runpy.run_module("stackgan.studies.text_probe", run_name="__main__", alter_sys=True)
