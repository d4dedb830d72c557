"""The `triton` backend's UNet path: fp16 weights, channels-last activations, fused QKV
projections, torch.compile (Inductor's Triton kernels) and one CUDA graph per shape."""
from __future__ import annotations

import torch

from fpkernels.temporal_attention import temporal_attention


class TemporalAttnProcessor:
    """diffusers attention processor for the motion modules' self-attention over frames: the
    projections as diffusers does them (fused QKV when fused), the attention itself through
    ``fpkernels.temporal_attention`` (whole short sequences per program) instead of SDPA."""

    def __init__(self, use_kernel=None):
        self.use_kernel = use_kernel

    @staticmethod
    def supports(attn) -> bool:
        return (attn.spatial_norm is None and attn.group_norm is None and attn.norm_q is None
                and attn.norm_k is None and not attn.is_cross_attention)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.dim() != 3:
            raise ValueError("TemporalAttnProcessor: expected (N,F,C) self-attention without a mask")
        residual = hidden_states
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        out = temporal_attention(q, k, v, attn.heads, use_kernel=self.use_kernel)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def use_temporal_kernel(unet, use_kernel=None) -> int:
    """Give every motion-module self-attention of ``unet`` (a UNetMotionModel) the
    TemporalAttnProcessor; returns how many were switched."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    count = 0
    for module in unet.modules():
        if isinstance(module, AnimateDiffTransformer3D):
            for attn in module.modules():
                if isinstance(attn, Attention) and TemporalAttnProcessor.supports(attn):
                    attn.set_processor(TemporalAttnProcessor(use_kernel))
                    count += 1
    return count


def prepare_unet(unet, channels_last: bool = True, fuse_qkv: bool = True, temporal_kernel: bool | str = True):
    """In place on a PoseGuidedUNet (CUDA, fp16): fused QKV, channels-last, the temporal kernel
    (``"aot"``: its operator for ahead-of-time compiles, see ``fpkernels.temporal_attention``)."""
    inner = unet.unet
    if fuse_qkv:
        inner.fuse_qkv_projections()
    if temporal_kernel:
        use_temporal_kernel(inner, "aot" if temporal_kernel == "aot" else None)
    if channels_last:
        inner.to(memory_format=torch.channels_last)
    return unet


def compile_call(fn, compile_mode: str | None = "default"):
    """torch.compile of a module or a function (None: as it is), static shapes."""
    if compile_mode is None:
        return fn
    return torch.compile(fn, mode=None if compile_mode == "default" else compile_mode, dynamic=False, fullgraph=False)


def load_precompiled(data: bytes):
    """A function saved by ``precompile(...).save_compiled_function``."""
    load = getattr(torch.compiler, "load_compiled_function", None)
    if load is not None:
        import io

        return load(io.BytesIO(data))
    from torch._dynamo.aot_compile import AOTCompiledFunction

    return AOTCompiledFunction.deserialize(data)


def optimise_unet(unet, channels_last: bool = True, fuse_qkv: bool = True, compile_mode: str | None = "default",
                  temporal_kernel: bool = True):
    """unet: a PoseGuidedUNet on CUDA in fp16. Returns a callable with the same signature."""
    prepare_unet(unet, channels_last, fuse_qkv, temporal_kernel)
    return compile_call(unet, compile_mode)
