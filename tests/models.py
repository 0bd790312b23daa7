"""Tiny random-weight diffusers models built from configs (no hub, CPU, seconds)."""
from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler, DiTTransformer2DModel,
                       PixArtTransformer2DModel, UNet2DConditionModel, UNet2DModel)


def unet2d(seed=0, num_class_embeds=None, **overrides) -> UNet2DModel:
    torch.manual_seed(seed)
    config = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32),
                  layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                  num_class_embeds=num_class_embeds)
    config.update(overrides)
    return UNet2DModel(**config).eval()


def sd_unet(seed=0, **overrides) -> UNet2DConditionModel:
    """SD1.5-shaped UNet2DConditionModel, tiny."""
    torch.manual_seed(seed)
    config = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                  layers_per_block=1, norm_num_groups=8, cross_attention_dim=24, attention_head_dim=4,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def sdxl_unet(seed=0, **overrides) -> UNet2DConditionModel:
    """SDXL-shaped; Kolors-shaped with ``encoder_hid_dim=D, encoder_hid_dim_type="text_proj"``."""
    torch.manual_seed(seed)
    config = dict(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=24, attention_head_dim=(2, 4), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 24)
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def vae(seed=0, **overrides) -> AutoencoderKL:
    """Latents at 1/2 of the image size (SD3 and Flux pipelines also need ``shift_factor=``)."""
    torch.manual_seed(seed)
    config = dict(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8)
    config.update(overrides)
    return AutoencoderKL(**config).eval()


def controlnet(unet: UNet2DConditionModel, seed=1) -> ControlNetModel:
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    for p in net.parameters():  # from_unet zero-initialises the output convs; make them matter
        torch.nn.init.normal_(p, std=0.02)
    return net.eval()


def dit(seed=0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=12, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                 norm_num_groups=8).eval()


def pixart(seed=0, num_layers=3) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=num_layers, sample_size=8, patch_size=2, cross_attention_dim=16,
                                    caption_channels=24, norm_num_groups=8).eval()


def hunyuandit(seed=0, num_layers=4):
    """HunyuanDiT-shaped (2-D RoPE, skip connections: an even ``num_layers``); text lengths 5 (BERT), 6 (T5)."""
    from diffusers import HunyuanDiT2DModel
    torch.manual_seed(seed)
    return HunyuanDiT2DModel(sample_size=8, num_layers=num_layers, patch_size=2, attention_head_dim=8,
                             num_attention_heads=2, in_channels=4, cross_attention_dim=24, cross_attention_dim_t5=24,
                             pooled_projection_dim=16, hidden_size=16, text_len=5, text_len_t5=6,
                             activation_fn="gelu-approximate").eval()


def sd_pipeline(seed=0):
    """A plain StableDiffusionPipeline on ``sd_unet`` without text encoder (callers pass prompt_embeds)."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(unet=sd_unet(seed), vae=vae(), scheduler=ddim(), text_encoder=None, tokenizer=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ddim(**kw) -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1, **kw)


def sd3(seed=0, qk_norm=None, dual_attention_layers=(), num_layers=3):
    """SD3 (qk_norm=None) or SD3.5-shaped (qk_norm="rms_norm", dual attention) MMDiT, tiny."""
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=num_layers,
                                 attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                 joint_attention_dim=24, pooled_projection_dim=12, out_channels=4, qk_norm=qk_norm,
                                 dual_attention_layers=dual_attention_layers).eval()


def sd3_inputs(batch=2, seed=1, size=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor([500.0] * batch),
            dict(encoder_hidden_states=torch.randn(batch, 5, 24, generator=g),
                 pooled_projections=torch.randn(batch, 12, generator=g)))


def flux(seed=0, guidance_embeds=False):
    """Flux.1-shaped; ``guidance_embeds=True`` as the guidance-distilled Flux.1-dev."""
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                  pooled_projection_dim=12, axes_dims_rope=(2, 2, 4),
                                  guidance_embeds=guidance_embeds).eval()


def flux_inputs(batch=2, seed=1, h=4, w=6, text=5):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return (torch.randn(batch, h * w, 8, generator=g), torch.tensor([0.5] * batch),
            dict(encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
                 pooled_projections=torch.randn(batch, 12, generator=g), img_ids=img_ids.reshape(-1, 3),
                 txt_ids=torch.zeros(text, 3)))


def qwenimage(seed=0, zero_cond_t=False):
    """``zero_cond_t``: Qwen-Image-Edit-2511's convention, the reference image's tokens modulated at t = 0."""
    from diffusers import QwenImageTransformer2DModel
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                       axes_dims_rope=(2, 2, 4), zero_cond_t=zero_cond_t).eval()


def qwenimage_edit_inputs(batch=2, seed=1, h=4, w=6, text=5):
    """As ``qwenimage_inputs``, with a reference image's tokens after the target's (Qwen-Image-Edit's packing)."""
    x, t, kwargs = qwenimage_inputs(batch, seed, h, w, text)
    reference = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    return torch.cat([x, reference], dim=1), t, {**kwargs, "img_shapes": [[(1, h, w), (1, h, w)]] * batch}


def qwenimage_inputs(batch=2, seed=1, h=4, w=6, text=5):
    """Packed latents; the last sample's text has two padding tokens (boolean text mask)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text, dtype=torch.bool)
    mask[-1, -2:] = False
    return (torch.randn(batch, h * w, 16, generator=g), torch.tensor([0.5] * batch),
            dict(encoder_hidden_states=torch.randn(batch, text, 16, generator=g), encoder_hidden_states_mask=mask,
                 img_shapes=[[(1, h, w)]] * batch))


def chroma(seed=0):
    from diffusers import ChromaTransformer2DModel
    torch.manual_seed(seed)
    return ChromaTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                    axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
                                    approximator_hidden_dim=16, approximator_layers=1).eval()


def chroma_inputs(batch=2, seed=1, h=4, w=6, text=5):
    """As ChromaPipeline builds them: a float [text; image] mask, the last sample's text with padding."""
    x, t, cond = flux_inputs(batch, seed, h, w, text)
    cond.pop("pooled_projections")
    text_mask = torch.ones(batch, text)
    text_mask[-1, -2:] = 0.0
    cond["attention_mask"] = torch.cat([text_mask, torch.ones(batch, h * w, dtype=torch.bool)], dim=1)
    return x, t, cond


def auraflow(seed=0):
    from diffusers import AuraFlowTransformer2DModel
    torch.manual_seed(seed)
    model = AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2,
                                       num_single_dit_layers=2, attention_head_dim=8, num_attention_heads=2,
                                       caption_projection_dim=16, joint_attention_dim=24, out_channels=4,
                                       pos_embed_max_size=64)
    for p in model.parameters():  # its default init leaves the attention blocks almost without effect
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def auraflow_inputs(batch=2, seed=1, h=8, w=12, text=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, h, w, generator=g), torch.tensor([0.5] * batch),
            dict(encoder_hidden_states=torch.randn(batch, text, 24, generator=g)))


def cogview4(seed=0):
    from diffusers import CogView4Transformer2DModel
    torch.manual_seed(seed)
    return CogView4Transformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                      attention_head_dim=8, num_attention_heads=2, text_embed_dim=24,
                                      time_embed_dim=8, condition_dim=4, sample_size=8).eval()


def cogview4_inputs(batch=2, seed=1, h=8, w=12, text=5):
    """The last sample's text has two padding tokens (CogView4's text attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text)
    mask[-1, -2:] = 0.0
    size = torch.tensor([[h * 8.0, w * 8.0]] * batch)
    return (torch.randn(batch, 4, h, w, generator=g), torch.tensor([500.0] * batch),
            dict(encoder_hidden_states=torch.randn(batch, text, 24, generator=g), original_size=size,
                 target_size=size, crop_coords=torch.zeros(batch, 2), attention_mask=mask))


def lumina2(seed=0):
    from diffusers import Lumina2Transformer2DModel
    torch.manual_seed(seed)
    return Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=2,
                                     num_refiner_layers=1, num_attention_heads=3, num_kv_heads=1, multiple_of=2,
                                     norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=(4, 2, 2),
                                     axes_lens=(64, 64, 64), cap_feat_dim=8).eval()


def lumina2_inputs(batch=2, seed=1, h=8, w=12, text=5, valid=3):
    """Every caption has ``valid`` real tokens, then padding (masked, as Lumina2Pipeline pads prompts)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, text, dtype=torch.bool)
    mask[:, :valid] = True
    return (torch.randn(batch, 4, h, w, generator=g), torch.tensor([0.5] * batch),
            dict(encoder_hidden_states=torch.randn(batch, text, 8, generator=g), encoder_attention_mask=mask))


def flux2(seed=0):
    from diffusers import Flux2Transformer2DModel
    torch.manual_seed(seed)
    return Flux2Transformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                   timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
                                   guidance_embeds=False).eval()


def flux2_inputs(batch=2, seed=1, h=4, w=6, text=5):
    """Flux.2's (t, h, w, l) position ids."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(h, w, 4)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    txt_ids = torch.zeros(text, 4)
    txt_ids[:, 3] = torch.arange(text)
    return (torch.randn(batch, h * w, 8, generator=g), torch.tensor([0.5] * batch),
            dict(encoder_hidden_states=torch.randn(batch, text, 24, generator=g), img_ids=img_ids.reshape(-1, 4),
                 txt_ids=txt_ids))


def flux2_klein_kv_pipeline(seed=0):
    """Flux2KleinKVPipeline with ``models.flux2()`` (8 = 4 × 2 latent channels) and a tiny AutoencoderKLFlux2
    (1/8 scale, so a 64×64 reference image, the pipeline's smallest, is 4×4 tokens); no text encoder: give it
    ``prompt_embeds`` (…, 24)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinKVPipeline
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=2,
                             norm_num_groups=4, sample_size=64).eval()
    return Flux2KleinKVPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                tokenizer=None, transformer=flux2(seed))


def sana(seed=0, qk_norm=None, num_layers=2, patch_size=1):
    """Sana-shaped (linear self-attention, cross-attention); Sana 1.5 with ``qk_norm="rms_norm_across_heads"``."""
    from diffusers import SanaTransformer2DModel
    torch.manual_seed(seed)
    return SanaTransformer2DModel(patch_size=patch_size, in_channels=4, out_channels=4, num_layers=num_layers,
                                  attention_head_dim=4, num_attention_heads=2, num_cross_attention_heads=2,
                                  cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                  sample_size=8, qk_norm=qk_norm).eval()


def sana_inputs(batch=2, seed=1, h=6, w=8, text=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, h, w, generator=g), torch.tensor([500.0] * batch),
            dict(encoder_hidden_states=torch.randn(batch, text, 8, generator=g),
                 encoder_attention_mask=torch.ones(batch, text)))


def dc_vae(seed=0):
    """A tiny AutoencoderDC (Sana's autoencoder): latents at 1/2 of the image size, 4 channels."""
    from diffusers import AutoencoderDC
    torch.manual_seed(seed)
    return AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                         encoder_block_types=("ResBlock", "EfficientViTBlock"),
                         decoder_block_types=("ResBlock", "EfficientViTBlock"),
                         encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                         encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                         encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                         downsample_block_type="conv", upsample_block_type="interpolate",
                         decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407).eval()


def hidream(seed=0):
    """HiDream-shaped: one double-stream and two single-stream blocks, MoE feed-forward, Llama layers (0, 1)."""
    from diffusers import HiDreamImageTransformer2DModel
    torch.manual_seed(seed)
    return HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                          num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                                          caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2,
                                          num_activated_experts=2, axes_dims_rope=(4, 2, 2),
                                          max_resolution=(16, 16), llama_layers=(0, 1, 0),
                                          force_inference_output=True).eval()


def hidream_inputs(batch=2, seed=1, h=8, w=8, text=3, native=True):
    """``native``: the Llama states as the model takes them, (layers, batch, tokens, dim); else batch first."""
    g = torch.Generator().manual_seed(seed)
    llama = torch.randn(2, batch, text, 4, generator=g)
    return (torch.randn(batch, 4, h, w, generator=g), torch.tensor([500.0] * batch),
            dict(encoder_hidden_states_t5=torch.randn(batch, text + 1, 8, generator=g),
                 encoder_hidden_states_llama3=llama if native else llama.transpose(0, 1),
                 pooled_embeds=torch.randn(batch, 8, generator=g)))


def zimage(seed=0, caption_positions=256):
    """Z-Image-shaped: two image-only refiner blocks, one caption-only refiner block, two single-stream blocks.
    ``caption_positions``: the RoPE table's first axis, which bounds the caption length (the real model's: 1536)."""
    from diffusers import ZImageTransformer2DModel
    torch.manual_seed(seed)
    return ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                                    n_refiner_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=8,
                                    axes_dims=[4, 6, 6], axes_lens=[caption_positions, 32, 32]).eval()


def zimage_inputs(batch=2, seed=1, h=8, w=12, text=(5, 37), native=False):
    """Latents (B, C, 1, H, W) and captions of ``text`` tokens (cycled over the batch: 5 and 37 pad to 32 and 64
    tokens, so the single-stream rows differ in length and are masked); 24 image tokens pad to 32.
    ``native``: x and cap_feats as the model takes them (lists); else as pagkit holds them (stacked, padded)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [text[i % len(text)] for i in range(batch)] if isinstance(text, (tuple, list)) else [text] * batch
    x = torch.randn(batch, 4, 1, h, w, generator=g)
    caps = [torch.randn(n, 8, generator=g) for n in lengths]
    t = torch.tensor([0.5] * batch)
    if native:
        return list(x.unbind(0)), t, dict(cap_feats=caps)
    from pagkit.backends.zimage import ZImageBackend
    return x, t, ZImageBackend().per_sample_inputs(None, x, dict(cap_feats=caps))
