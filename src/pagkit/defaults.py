"""The shipped defaults: the models the command uses and the guidance settings chosen for them.

One place, so that re-choosing a setting (docs/results.md) is one edit: the ``pagkit`` command's options
and docs/make_results.py's tables both read these. Nothing here imports anything.
"""

DEFAULT_UNCOND, DEFAULT_COND = "fmnist", "fmnist-cond"  # the shipped models (src/pagkit/models)
NUM_CLASSES = 10  # Fashion-MNIST's
NULL_CLASS = NUM_CLASSES  # the "no label" class of the conditional model (CFG's ∅)

# From the completed map (docs/results.md, table 9a: every site at every small scale, seed set 0, chosen by a rule
# fixed before its rows that needs both feature networks to agree): PAG on the second 8x8 decoder attention,
# FD -8.8% / -9.2% (the first map's down.2: -2.8% / +0.4%); SEG (σ = ∞) on the first 16x16 decoder attention,
# -7.6% / -9.9% (the first map's mid: -7.5% / -1.8%). Larger scales oversaturate.
DEFAULT_PAG_LAYERS = ["up.0.attentions.1"]
DEFAULT_PAG_SCALE = 0.5
DEFAULT_SEG_LAYERS = ["up.1.attentions.0"]
DEFAULT_SEG_SCALE = 1.0
DEFAULT_SAG_LAYER = "mid"
DEFAULT_SAG_SCALE = 0.75  # diffusers' default; no SAG scale helped on the map (table 7)
DEFAULT_CFG_SCALE = 1.5  # w=3 oversaturates fmnist-cond (FD 49 -> 164); w=1.5 lowers FD

# pagkit restore's PAG setting, chosen on test images 9000-9099 by docs/tune_restore.py (its scale search ran on
# down.2, so the restoration layers are their own setting: re-choosing the sampling layers does not move them)
DEFAULT_RESTORE_PAG_LAYERS = ["down.2"]
DEFAULT_RESTORE_PAG_SCALE = 1.0
