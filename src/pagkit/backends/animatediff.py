"""AnimateDiff: ``UNetMotionModel`` (an SD-shaped UNet with motion modules after its spatial transformers).

Two kinds of sites:

* **spatial**: ``attn1`` of the image transformers (``*.attentions.N.transformer_blocks.M.attn1``), one frame's
  H×W tokens. The model folds the frames into the batch, ``(b f)``: an attention call holds batch × frames rows,
  the F rows of each sample together.
* **temporal**: the motion modules' self-attention (``*.motion_modules.N.transformer_blocks.M.attn1``/``attn2``,
  both self-attention), one position's F frames. Its batch is batch × H×W positions, ``(b h w)``.

Both fold with the sample outermost, so ``attention_rows`` maps attention row r to model row
r ÷ (attention rows per sample). The short aliases (``mid``, ``down.1``, …) select the spatial sites of a block
only (layers.py: temporal sites are reached by name or glob, e.g. ``mid_block.motion_modules.*``); diffusers'
AnimateDiff PAG default ``"mid_block.*attn1"`` also takes the mid block's temporal ``attn1``.

The call convention folds frames into ``encoder_hidden_states`` too (the pipeline repeats each prompt F times,
(b f) order): ``per_sample_inputs`` unfolds it to (B, F, S, C), one row per sample, and ``call`` folds it back.
Skippable blocks (SLG, STG-R) are the spatial transformers and the motion modules; they too run on the folded
batch (``module_rows``). The stages are the UNet's (``conv_in``, the down blocks, the mid block, the up blocks),
each on the folded (b f) batch (sample, time embedding and text all repeated per frame, sample outermost); a
stage mixes a sample's frames (motion modules) but never two samples, so prefix sharing runs the stages before the
first perturbed site on the shared samples' F rows each and copies them, F rows a sample (``module_rows``).
Latents are (B, C, F, H, W).
"""
from __future__ import annotations

from . import ForwardInfo, register
from .unet import UNetBackend, attention_site, is_self_attention


@register
class AnimateDiffBackend(UNetBackend):
    name = "animatediff"
    model_classes = ("UNetMotionModel",)
    tested_against = ("diffusers' AnimateDiffPAGPipeline (spatial sites), and a reference at the model's attention "
                      "call for spatial and temporal sites")

    def sites(self, model):
        factors = self._factors(model)
        rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
        found = [(n, m) for n, m in model.named_modules() if is_self_attention(m)]
        found.sort(key=lambda item: rank.get(item[0].split(".")[0], 0))
        return [attention_site(n, m, "temporal" if ".motion_modules." in n else "spatial",
                               downsampling=factors[max((p for p in factors if n.startswith(p)), key=len)])
                for n, m in found]

    def forward_info(self, model, x, kwargs):
        if x.ndim != 5:
            return ForwardInfo()
        return ForwardInfo(hw=tuple(x.shape[-2:]), frames=x.shape[2])

    def sample_info(self, model):
        size = model.config.get("sample_size")
        if size is None:
            return None
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return ForwardInfo(hw=hw, frames=16)  # AnimateDiff's default num_frames

    def attention_rows(self, site, call, attention_batch, model_batch):
        return _fold(f"site {site.name}", attention_batch, model_batch)

    def skip_blocks(self, model):
        """The blocks holding a site, in forward order: the spatial transformers (``*.attentions.N``) and the
        motion modules (``*.motion_modules.N``, temporal); each maps its input to an output of the same shape."""
        out = []
        for site in self.sites(model):
            parts = site.name.split(".")
            for segment in ("attentions", "motion_modules"):
                if segment in parts and parts.index(segment) + 1 < len(parts):
                    out.append(".".join(parts[:parts.index(segment) + 2]))
        return list(dict.fromkeys(out))

    def module_rows(self, name, module_batch, model_batch):
        return _fold(f"block {name}", module_batch, model_batch)

    def per_sample_inputs(self, model, x, kwargs):
        ehs = kwargs.get("encoder_hidden_states")
        frames = x.shape[2] if x.ndim == 5 else None
        if frames and ehs is not None and ehs.ndim == 3 and ehs.shape[0] == x.shape[0] * frames:
            kwargs = {**kwargs, "encoder_hidden_states": ehs.unflatten(0, (x.shape[0], frames))}
        return kwargs

    def call(self, forward, x, t, kwargs):
        ehs = kwargs.get("encoder_hidden_states")
        if ehs is not None and ehs.ndim == 4:
            kwargs = {**kwargs, "encoder_hidden_states": ehs.flatten(0, 1)}
        return super().call(forward, x, t, kwargs)

    def sample_shape(self, model, batch_size, height, width):
        raise ValueError("AnimateDiff is a video model: sample through diffusers' AnimateDiffPipeline with "
                         "pagkit.attach(pipe, ...)")


def _fold(what: str, rows: int, model_batch: int | None):
    """Model row of each row of a (b f) or (b h w) folded batch: the sample is outermost."""
    if model_batch is None:
        return None
    if rows % model_batch:
        raise ValueError(f"AnimateDiff {what}: {rows} rows do not fold {model_batch} samples")
    per = rows // model_batch
    return [r // per for r in range(rows)]
