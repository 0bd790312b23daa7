"""TPG, token perturbation guidance (Rajabi, Mehraban, Sadat, Taati; NeurIPS 2025, arXiv 2506.10036).

The perturbed branch applies a norm-preserving perturbation matrix to intermediate tokens: the tokens entering
each chosen block are shuffled by a random permutation P (‖Px‖ = ‖x‖), and the block runs on them. Condition-free,
like PAG: ε̃ = ε + s·(ε − ε_tpg); with CFG ε̃ = ε_u + w(ε_c − ε_u) + s(ε_c − ε_tpg,c) (the official code's
ε_c + (w − 1)(ε_c − ε_u) + s(ε_c − ε_tpg), the same). ``scale`` is s, the official ``tpg_scale`` (0 = off).

What the official code does (TaatiTeam/Token-Perturbation-Guidance, ``pipeline_sdxl_tpg.py``, commit 6ee5a2b),
and pagkit with it:

* **Where**: at the input of SDXL's ``BasicTransformerBlock``\\ s (inside each Transformer2DModel, after its norm
  and proj_in: (B, H·W, C) tokens): ``x[:, torch.randperm(n)]``. The block's output is not un-permuted; the
  Transformer2DModel's outer residual is not permuted. pagkit's blocks are the backend's ``token_blocks``: those
  ``BasicTransformerBlock``\\ s on UNet2DConditionModel, the ``Attention`` block (input (B, C, H, W), its H·W
  positions permuted) on UNet2DModel, and a transformer family's blocks (their image-token input
  ``hidden_states``; text tokens, in ``encoder_hidden_states`` or outside the image span, untouched).
* **When**: a fresh permutation at every call of every chosen block (every step). pagkit draws them from one CPU
  generator per bound term, seeded with ``seed``, so two runs with one seed are equal (the official code uses the
  global RNG).
* **Batch**: one permutation for every sample of the perturbed rows.
* **Defaults**: ``tpg_scale=3.0`` and blocks d6–d23, the down-block transformer blocks 6 to 23 of SDXL (indices
  6–23 of SDXL's ``token_blocks``, which lists its 24 down-block ones first). On other models, choose ``layers``.

On an MMDiT without RoPE (SD3) every block after the positional embedding is permutation-equivariant over the
image tokens, so shuffling a block's input permutes the output patches: ε_tpg is a permutation of ε_c's patches.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..routing import TokenShuffle
from .base import Contrast, ContrastTerm
from .slg import _items, resolve_blocks


@dataclass
class TPG(ContrastTerm):
    """Token Perturbation Guidance: ε̃ = CFG + s(ε_c − ε_tpg), ε_tpg with the tokens entering ``layers`` shuffled.

    ``layers``: block indices into the backend's ``token_blocks`` (default: the official SDXL blocks 6–23), block
    names or globs over them, or layer selections of ``pagkit.layers`` (``"mid"``, ``"down.1"``, ``"blocks.3"``),
    which select the blocks holding those sites. ``seed``: the permutations' RNG (one stream per bound term; a
    fresh permutation at each block call).
    """

    scale: float = 3.0
    layers: int | str | tuple | list = tuple(range(6, 24))
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        items = _items(self.layers)
        if not items:
            raise ValueError("TPG needs at least one block whose tokens to shuffle")
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, str)) or \
                    (isinstance(item, int) and item < 0) or (isinstance(item, str) and not item.strip()):
                raise ValueError(f"TPG layers are block indices (>= 0), block names or layer selections; got {item!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"TPG seed must be an int, got {self.seed!r}")

    def bind(self, key, context):
        blocks = context.backend.token_blocks(context.model)
        chosen = resolve_blocks(context.model, context.backend, self.layers, blocks=blocks or [], method="TPG")
        shuffle = TokenShuffle(self.seed)  # one generator per bound term
        return Contrast(self, key, {name: shuffle for name in chosen})
