"""Scaling sweeps: a YAML grid of ordinary runs (presets x data fractions x budgets x seeds), run here one
after another or emitted as deepspeed commands / a SLURM array, then collected into a CSV and a plot.

    vaemo-sweep plan configs/sweeps/tiny.yaml [--emit table|commands|slurm]
    vaemo-sweep run configs/sweeps/tiny.yaml
    vaemo-sweep report configs/sweeps/tiny.yaml

Format and workflow: docs/scaling.md.
"""

from vaemo_dist.sweep.plan import Point, Status, SweepError, SweepSpec, build_points, load_spec, point_status

__all__ = ["Point", "Status", "SweepError", "SweepSpec", "build_points", "load_spec", "point_status"]
