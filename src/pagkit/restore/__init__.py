"""Restoration with guidance: measurements y = A(x₀) + σ_y·n, DPS posterior sampling, and its evaluation.

* ``operators``: the measurement operators and their tasks (``TASKS``, ``make_operator``).
* ``dps``: DPS (Chung et al. 2022) with the guided prediction ε̃ of any pagkit terms (``dps``).
* ``task``: the restoration evaluation (``restore_eval``, a task of ``pagkit.runner``), its tables and grids,
  and restoring given images (``restore_inputs``).

Every name is importable from ``pagkit.restore`` itself.
"""
from .operators import (TASKS, BoxInpaint, GaussianBlur, MotionBlur, Operator, RandomInpaint, SuperResolution,
                        check_task, make_operator, motion_kernel, task_parameters)
from .task import (RestoreEval, describe, grid_rows, guidance_label, psnr_ssim, restore_batch, restore_eval,
                   restore_inputs, run_config, write_tables)
# last, so that ``pagkit.restore.dps`` is the function (as before the split), not its module of the same name
from .dps import DEFAULT_STEP_SIZE, dps

__all__ = ["TASKS", "BoxInpaint", "DEFAULT_STEP_SIZE", "GaussianBlur", "MotionBlur", "Operator", "RandomInpaint",
           "RestoreEval", "SuperResolution", "check_task", "describe", "dps", "grid_rows", "guidance_label",
           "make_operator", "motion_kernel", "psnr_ssim", "restore_batch", "restore_eval", "restore_inputs",
           "run_config", "task_parameters", "write_tables"]
