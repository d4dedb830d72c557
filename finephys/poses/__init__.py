"""Pose input and output: the clip format, joint layouts, BVH motion, cameras and drawing
(detection, which makes clips from videos, is ``engine.detect``)."""
