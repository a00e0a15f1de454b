"""Deprecated alias: this research command moved to :mod:`stackgan.studies.judge_ceiling`.

``python -m stackgan.metrics.judge_ceiling ...`` still works (with a note) and runs
``python -m stackgan.studies.judge_ceiling`` (started by name: metrics/ does not import studies/).
"""
import runpy
import sys

if __name__ == "__main__":
    print("note: `python -m stackgan.metrics.judge_ceiling` is deprecated; use "
          "`python -m stackgan.studies.judge_ceiling`", file=sys.stderr)
    runpy.run_module("stackgan.studies.judge_ceiling", run_name="__main__", alter_sys=True)
