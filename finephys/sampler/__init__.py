"""The sampler: options and checks, the pose stages, the window loop and the streamed result."""
