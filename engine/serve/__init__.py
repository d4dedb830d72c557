"""``fpengine serve``: the engine as an HTTP service on Ray Serve.

``config`` (what a service is: ModelSpec, Limits, ServeConfig), ``parse`` (request body ->
options and clip, with the CLI's checks), ``batching`` (requests of one shape denoised together),
``mp4`` (a streamable mp4), ``app`` (the Ray Serve deployments), ``launch`` (start/stop Ray and
Serve). Only ``app`` and ``launch`` import Ray, so parsing and batching work without it.
"""
