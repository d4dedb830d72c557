"""Make a contact sheet (one row of frames) from a video: examples/demo_walk.png in the README.

    python examples/contact_sheet.py VIDEO.mp4 OUT.png [--every 3]
"""
from __future__ import annotations

from pathlib import Path

import click
import numpy as np
from PIL import Image

from engine.video import read_video


@click.command()
@click.argument("video", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--every", type=int, default=3, show_default=True, help="Take every N-th frame.")
def main(video: Path, out: Path, every: int) -> None:
    if every < 1:
        raise click.BadParameter("expected >= 1", param_hint="--every")
    frames = read_video(video)[::every]
    gap = np.full((frames.shape[1], 2, 3), 255, np.uint8)
    row = np.concatenate([x for f in frames for x in (f, gap)][:-1], axis=1)
    Image.fromarray(row).save(out, optimize=True)
    click.echo(f"wrote {out}: {len(frames)} frames of {video}")


if __name__ == "__main__":
    main()
