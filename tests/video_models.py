"""Tiny random-weight diffusers video models built from configs (no hub, CPU, seconds).

Each ``<family>_inputs`` returns (x, t, cond) as the family's pipeline calls the model, with an odd number
of frames and a non-square grid so that every axis of F×H×W is told apart.
"""
from __future__ import annotations

import torch


def wan(seed=0, num_layers=2):
    from diffusers import WanTransformer3DModel
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=num_layers,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def wan_inputs(batch=2, seed=1, frames=3, h=8, w=12, text=5):
    """Latents (B, C, F, H, W): a 3 × 4 × 6 token grid."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, frames, h, w, generator=g), torch.tensor([500.0] * batch),
            dict(encoder_hidden_states=torch.randn(batch, text, 16, generator=g)))