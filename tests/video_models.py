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


def cogvideox(seed=0, patch_size_t=None, num_layers=2):
    """CogVideoX-5b-shaped (3-D RoPE, no sincos positions); ``patch_size_t=2``: CogVideoX 1.5-shaped."""
    from diffusers import CogVideoXTransformer3DModel
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                       time_embed_dim=8, text_embed_dim=16, num_layers=num_layers, sample_width=12,
                                       sample_height=8, sample_frames=9, patch_size=2, patch_size_t=patch_size_t,
                                       temporal_compression_ratio=4, max_text_seq_length=5,
                                       use_rotary_positional_embeddings=True,
                                       use_learned_positional_embeddings=False).eval()


def cogvideox_rotary(model, frames, h, w):
    """The rotary table CogVideoXPipeline builds (its _prepare_rotary_positional_embeddings), latent sizes."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
    c = model.config
    p, p_t = c.patch_size, c.patch_size_t
    gh, gw = h // p, w // p
    if p_t is None:
        crops = get_resize_crop_region_for_grid((gh, gw), c.sample_width // p, c.sample_height // p)
        return get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=crops, grid_size=(gh, gw),
                                       temporal_size=frames)
    return get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=None, grid_size=(gh, gw),
                                   temporal_size=(frames + p_t - 1) // p_t, grid_type="slice",
                                   max_size=(c.sample_height // p, c.sample_width // p))


def cogvideox_inputs(batch=2, seed=1, frames=3, h=8, w=12, text=5, model=None):
    """Latents (B, F, C, H, W): a 3 × 4 × 6 token grid (CogVideoX 1.5, p_t = 2: pass frames=6)."""
    g = torch.Generator().manual_seed(seed)
    model = model or cogvideox()
    return (torch.randn(batch, frames, 4, h, w, generator=g), torch.tensor([500.0] * batch),
            dict(encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
                 image_rotary_emb=cogvideox_rotary(model, frames, h, w)))


def cogvideox15():
    return cogvideox(patch_size_t=2)


def cogvideox15_inputs(batch=2, seed=1):
    return cogvideox_inputs(batch, seed, frames=6, model=cogvideox15())


def hunyuan_video(seed=0):
    """HunyuanVideo-shaped (guidance-distilled: a guidance embedding), one refiner layer."""
    from diffusers import HunyuanVideoTransformer3DModel
    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                          num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=2,
                                          patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                                          pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)).eval()


def hunyuan_video_inputs(batch=2, seed=1, frames=3, h=8, w=12, text=5):
    """Latents (B, C, F, H, W): a 3 × 4 × 6 token grid; the last sample's text has two padding tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text, dtype=torch.long)
    mask[-1, -2:] = 0
    return (torch.randn(batch, 4, frames, h, w, generator=g), torch.tensor([500.0] * batch),
            dict(encoder_hidden_states=torch.randn(batch, text, 16, generator=g), encoder_attention_mask=mask,
                 pooled_projections=torch.randn(batch, 8, generator=g), guidance=torch.tensor([6000.0] * batch)))


def ltx(seed=0, num_layers=2):
    from diffusers import LTXVideoTransformer3DModel
    torch.manual_seed(seed)
    return LTXVideoTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
                                      num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24,
                                      num_layers=num_layers, caption_channels=16,
                                      qk_norm="rms_norm_across_heads").eval()


def ltx_inputs(batch=2, seed=1, frames=3, h=4, w=6, text=5):
    """Packed latents (B, F·H·W, C) as LTXPipeline passes them; the last sample's text has two padding tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text)
    mask[-1, -2:] = 0
    return (torch.randn(batch, frames * h * w, 4, generator=g), torch.tensor([500.0] * batch),
            dict(encoder_hidden_states=torch.randn(batch, text, 16, generator=g), encoder_attention_mask=mask,
                 num_frames=frames, height=h, width=w, rope_interpolation_scale=(8 / 25, 32, 32)))


def mochi(seed=0, num_layers=2):
    from diffusers import MochiTransformer3DModel
    torch.manual_seed(seed)
    return MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=num_layers,
                                   pooled_projection_dim=16, in_channels=4, out_channels=None, qk_norm="rms_norm",
                                   text_embed_dim=16, time_embed_dim=4, activation_fn="swiglu",
                                   max_sequence_length=16).eval()


def mochi_inputs(batch=2, seed=1, frames=3, h=8, w=12, text=5):
    """Latents (B, C, F, H, W): a 3 × 4 × 6 token grid; the last sample's text has two padding tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text, dtype=torch.long)
    mask[-1, -2:] = 0
    return (torch.randn(batch, 4, frames, h, w, generator=g), torch.tensor([500.0] * batch),
            dict(encoder_hidden_states=torch.randn(batch, text, 16, generator=g), encoder_attention_mask=mask))


def animatediff(seed=0):
    """AnimateDiff-shaped UNetMotionModel: a cross-attention down block, a plain one, a motion mid block; motion
    modules (temporal attention) after every resnet."""
    from diffusers import UNetMotionModel
    torch.manual_seed(seed)
    return UNetMotionModel(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
                           down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                           up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), num_attention_heads=2,
                           motion_num_attention_heads=2, motion_max_seq_length=8, sample_size=8).eval()


def animatediff_inputs(batch=2, seed=1, frames=3, h=8, w=12, text=5):
    """Latents (B, C, F, H, W); the text repeated per frame, (b f), as AnimateDiffPipeline passes it."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, frames, h, w, generator=g), torch.tensor(500),
            dict(encoder_hidden_states=torch.randn(batch, text, 24, generator=g).repeat_interleave(frames, dim=0)))


def hunyuan_video15(seed=0, num_layers=2, in_channels=4):
    """HunyuanVideo 1.5-shaped: double-stream blocks only, one refiner layer, ByT5 and image context.
    ``in_channels=9`` for its pipeline, which concatenates [latents; condition latents; mask]."""
    from diffusers import HunyuanVideo15Transformer3DModel
    torch.manual_seed(seed)
    return HunyuanVideo15Transformer3DModel(in_channels=in_channels, out_channels=4, num_attention_heads=2,
                                            attention_head_dim=10, num_layers=num_layers, num_refiner_layers=1,
                                            patch_size=2, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
                                            image_embed_dim=12, rope_axes_dim=(2, 4, 4)).eval()


def hunyuan_video15_vae():
    """A tiny AutoencoderKLHunyuanVideo15 (4 latent channels, ÷16 spatial, ÷4 temporal): the pipeline reads its
    compression ratios and latent channels even for latent output."""
    from diffusers import AutoencoderKLHunyuanVideo15
    torch.manual_seed(0)
    return AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1)


def hunyuan_video15_inputs(batch=2, seed=1, frames=3, h=8, w=12, text=5, text_2=4, image=3):
    """Latents (B, C, F, H, W): a 3 × 4 × 6 token grid; the last sample's MLLM text has two padding tokens and its
    ByT5 text one; text-to-video, so the image embeddings are zeros (the model then masks them all)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text, dtype=torch.long)
    mask[-1, -2:] = 0
    mask_2 = torch.ones(batch, text_2, dtype=torch.long)
    mask_2[-1, -1:] = 0
    return (torch.randn(batch, 4, frames, h, w, generator=g), torch.tensor([500.0] * batch),
            dict(encoder_hidden_states=torch.randn(batch, text, 16, generator=g), encoder_attention_mask=mask,
                 encoder_hidden_states_2=torch.randn(batch, text_2, 8, generator=g), encoder_attention_mask_2=mask_2,
                 image_embeds=torch.zeros(batch, image, 12)))


def ltx2(seed=0, num_layers=2, perturbed_attn=True):
    """LTX-2-shaped: video and audio streams in every block; ``perturbed_attn``: the processors of LTX-2.3, which
    carry the model's own STG (``spatio_temporal_guidance_blocks``); with no mask given they are LTX-2.0's."""
    from diffusers import LTX2VideoTransformer3DModel
    torch.manual_seed(seed)
    return LTX2VideoTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
                                       num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                       audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
                                       audio_attention_head_dim=4, audio_cross_attention_dim=8,
                                       num_layers=num_layers, caption_channels=16, rope_type="split",
                                       rope_double_precision=False, vae_scale_factors=(2, 2, 2),
                                       perturbed_attn=perturbed_attn).eval()


def ltx2_inputs(batch=2, seed=1, frames=3, h=4, w=6, text=5, audio=5):
    """Packed video latents (B, F·H·W, C) and audio latents (B, T_a, C_a) as LTX2Pipeline passes them; the last
    sample's text has two padding tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text)
    mask[-1, -2:] = 0
    return (torch.randn(batch, frames * h * w, 4, generator=g), torch.tensor([500.0] * batch),
            dict(audio_hidden_states=torch.randn(batch, audio, 4, generator=g),
                 encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
                 audio_encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
                 encoder_attention_mask=mask, audio_encoder_attention_mask=mask,
                 num_frames=frames, height=h, width=w, audio_num_frames=audio, fps=24.0))


def ltx2_pipeline():
    """A tiny LTX2Pipeline with no text encoder (prompt embeddings are given): 32×64 px, 5 frames → 3×16×32 video
    latent tokens of 4 channels; the audio VAE's 2 latent channels × 4 mel bins → 8 audio features per token."""
    from diffusers import (AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler,
                           LTX2Pipeline, LTX2VideoTransformer3DModel)
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    torch.manual_seed(0)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, caption_channels=16,
        rope_type="split", rope_double_precision=False, perturbed_attn=True).eval()
    connectors = LTX2TextConnectors(
        caption_channels=16, text_proj_in_factor=2, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8, video_connector_num_layers=1, video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, rope_double_precision=False).eval()
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), decoder_block_out_channels=(8,),
        layers_per_block=(1,), decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False), downsample_type=("spatial",),
        upsample_residual=(False,), upsample_factor=(1,), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False)
    audio_vae = AutoencoderKLLTX2Audio(base_channels=8, ch_mult=(1, 2), num_res_blocks=1, latent_channels=2,
                                       mel_bins=16)
    pipe = LTX2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae, text_encoder=None,
                        tokenizer=None, connectors=connectors, transformer=transformer, vocoder=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, 5, dtype=torch.long)
    kwargs = dict(prompt_embeds=torch.randn(1, 5, 32, generator=g), prompt_attention_mask=mask,
                  negative_prompt_embeds=torch.randn(1, 5, 32, generator=g), negative_prompt_attention_mask=mask,
                  height=32, width=64, num_frames=5, frame_rate=8.0, num_inference_steps=3, output_type="latent",
                  guidance_rescale=0.0, audio_guidance_rescale=0.0, use_cross_timestep=False)
    return pipe, kwargs
