"""The one schema of the generation options: ``fpengine generate`` builds its click options from
it and ``fpengine serve`` converts a request's JSON values with the same parameter types, so both
take the same values and refuse bad ones with the same messages."""
from __future__ import annotations

import click

# (parameter name = GenerateOptions field, the flag(s), click keyword arguments), in --help order
PROMPT = [
    ("prompt", ("--prompt",), dict(required=True, help="What the video shows.")),
    ("negative_prompt", ("--negative-prompt",), dict(default="", help="What to steer away from.")),
]
SAMPLER = [
    ("num_frames", ("--frames",), dict(type=int, default=None, help="Frames to generate (default: the whole clip).")),
    ("height", ("--height",), dict(type=int, default=None,
                                   help="Video height in pixels, a multiple of 8  [default: the model's; 128 for the demo]")),
    ("width", ("--width",), dict(type=int, default=None,
                                 help="Video width in pixels, a multiple of 8  [default: the model's; 128 for the demo]")),
    ("num_inference_steps", ("--steps",), dict(type=int, default=None,
                                               help="DDIM denoising steps, 1-1000  [default: the model's; 10 for the demo]")),
    ("guidance_scale", ("--guidance",), dict(
        type=float, default=None,
        help="Classifier-free guidance scale (<= 1: off)  [default: the model's; 7.5 for the demo]")),
    ("seed", ("--seed",), dict(type=int, default=0, show_default=True)),
    ("context_length", ("--context-length",), dict(type=int, default=None,
                                                   help="Frames per denoising window (default: the model's).")),
    ("context_stride", ("--context-stride",), dict(type=int, default=None,
                                                   help="Window step (default: 3/4 of the window).")),
    ("deep_cache", ("--deep-cache",), dict(
        type=int, default=1, show_default=True,
        help="DeepCache: a full UNet step every N steps, shallow steps reusing its deep features between "
             "(1 = off; faster, approximate; reference and triton backends).")),
    ("deep_cache_depth", ("--deep-cache-depth",), dict(
        type=int, default=1, show_default=True, help="With --deep-cache: pairs of the last up block the shallow steps recompute.")),
]
OPTIONS = tuple(name for name, _, _ in PROMPT + SAMPLER)  # the request's option names (diffusers' names)


def _decorator(specs):
    def apply(f):
        for name, flags, kw in reversed(specs):
            f = click.option(*flags, name, **kw)(f)
        return f

    return apply


prompt_options = _decorator(PROMPT)
sampler_options = _decorator(SAMPLER)


def params() -> dict[str, click.Option]:
    """The options as click parameters, by name."""
    return {name: click.Option([*flags, name], **kw) for name, flags, kw in PROMPT + SAMPLER}
