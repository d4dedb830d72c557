"""Training: the generator (``fpengine train``), the pose stack (``train-pose``), the judge, and the
figure renderer that makes their data."""
