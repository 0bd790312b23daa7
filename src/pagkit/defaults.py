"""The shipped defaults: the models the command uses and the guidance settings chosen for them.

One place, so that re-choosing a setting (docs/results.md) is one edit: the ``pagkit`` command's options
and docs/make_results.py's tables both read these. Nothing here imports anything.
"""

DEFAULT_UNCOND, DEFAULT_COND = "fmnist", "fmnist-cond"  # the shipped models (src/pagkit/models)
NUM_CLASSES = 10  # Fashion-MNIST's
NULL_CLASS = NUM_CLASSES  # the "no label" class of the conditional model (CFG's ∅)

# From the evaluation map (docs/results.md, chosen on seed set 0): PAG helps FD only on the 8x8 encoder
# attention at small scales; larger scales and other layers oversaturate.
DEFAULT_PAG_LAYERS = ["down.2"]
DEFAULT_PAG_SCALE = 0.5
DEFAULT_SEG_LAYERS = ["mid"]
DEFAULT_SEG_SCALE = 1.0  # SEG σ=inf on mid: gamma 1 and 3 tie on FD (both -7%); 1 chosen on FD
DEFAULT_SAG_LAYER = "mid"
DEFAULT_SAG_SCALE = 0.75  # diffusers' default; no SAG scale helped on the map (table 7)
DEFAULT_CFG_SCALE = 1.5  # w=3 oversaturates fmnist-cond (FD 49 -> 164); w=1.5 lowers FD

# pagkit restore's PAG setting, chosen on test images 9000-9099 by docs/tune_restore.py (its scale search ran on
# down.2, so the restoration layers are their own setting: re-choosing the sampling layers does not move them)
DEFAULT_RESTORE_PAG_LAYERS = ["down.2"]
DEFAULT_RESTORE_PAG_SCALE = 1.0
