"""Action classes of the evaluation motions (``fpengine eval-pose`` groups its tables by them).

A motion's class comes from its file stem, CMU ``SS_TT`` (subject, trial; the trials of
data/motion/cmu/README.md and ``131_01``):

- walk: 05_01, 06_01, 07_*, 08_*, 09_12 (walk forwards, backwards, sideways), 131_01
- run: 09_01 ... 09_11
- jump: 01_01, 01_14 (playground jumps)
- climb: 01_08, 01_10 (playground climbing, hanging)
- dance: 05_02 ... 05_20
- sport: 06_02 ... 06_15 (basketball)
- other: anything else (Panoptic bodies, user files)
"""
from __future__ import annotations

import re
from pathlib import Path

CLASSES = ("walk", "run", "jump", "climb", "dance", "sport", "other")
_CMU = re.compile(r"(\d+)_(\d+)")


def action_class(motion_name: str) -> str:
    """The action class (one of ``CLASSES``) of a motion, from the stem of its file name."""
    found = _CMU.fullmatch(Path(str(motion_name)).stem)
    if found is None:
        return "other"
    subject, trial = int(found.group(1)), int(found.group(2))
    if (subject, trial) in ((5, 1), (6, 1), (9, 12), (131, 1)) or subject in (7, 8):
        return "walk"
    if subject == 9 and 1 <= trial <= 11:
        return "run"
    if subject == 1 and trial in (1, 14):
        return "jump"
    if subject == 1 and trial in (8, 10):
        return "climb"
    if subject == 5 and 2 <= trial <= 20:
        return "dance"
    if subject == 6 and 2 <= trial <= 15:
        return "sport"
    return "other"
