"""Counters of the HTTP front end, rendered in the Prometheus text format (``GET /metrics``)."""
from __future__ import annotations

import time
from collections import Counter, deque

import numpy as np


class Metrics:
    def __init__(self, window: int = 1000):
        self.started = time.time()
        self.answers: Counter = Counter()  # (route, HTTP status) -> answers, every endpoint
        self.waiting = 0  # accepted, waiting for a replica or a batch (no video bytes yet)
        self.in_flight = 0
        self.frames = 0
        self.stream_errors = 0  # videos cut off after their 200 was sent
        self.batch_sizes: Counter = Counter()
        self.latency = deque(maxlen=window)  # seconds, request in -> last byte out, 200s only
        self.first_byte = deque(maxlen=window)  # seconds to the first video bytes

    def answered(self, route: str, status: int) -> None:
        self.answers[route, status] += 1

    @property
    def requests(self) -> dict:
        """POST /generate answers by status."""
        return {code: n for (route, code), n in sorted(self.answers.items()) if route == "/generate"}

    def video(self, seconds: float, first_byte: float | None, frames: int, batch_size: int) -> None:
        self.latency.append(seconds)
        if first_byte is not None:
            self.first_byte.append(first_byte)
        self.frames += frames
        self.batch_sizes[batch_size] += 1

    def snapshot(self) -> dict:
        q = lambda xs, p: float(np.percentile(list(xs), p)) if xs else None  # noqa: E731
        return {
            "uptime_s": time.time() - self.started, "requests": self.requests, "waiting": self.waiting, "in_flight": self.in_flight,
            "frames": self.frames, "stream_errors": self.stream_errors, "batch_sizes": dict(self.batch_sizes),
            "latency_p50_s": q(self.latency, 50), "latency_p95_s": q(self.latency, 95),
            "first_byte_p50_s": q(self.first_byte, 50),
        }

    def prometheus(self, extra: dict | None = None) -> str:
        lines = [
            "# HELP fpengine_requests_total Finished POST /generate requests by HTTP status.",
            "# TYPE fpengine_requests_total counter",
        ]
        lines += [f'fpengine_requests_total{{code="{code}"}} {n}' for code, n in self.requests.items()]
        lines += ["# HELP fpengine_responses_total Answers of every endpoint by route and HTTP status.",
                  "# TYPE fpengine_responses_total counter"]
        lines += [f'fpengine_responses_total{{route="{route}",code="{code}"}} {n}'
                  for (route, code), n in sorted(self.answers.items())]
        lines += [
            "# HELP fpengine_requests_waiting Accepted requests waiting for a replica or a batch.",
            "# TYPE fpengine_requests_waiting gauge", f"fpengine_requests_waiting {self.waiting}",
            "# HELP fpengine_requests_in_flight Videos being streamed now.",
            "# TYPE fpengine_requests_in_flight gauge", f"fpengine_requests_in_flight {self.in_flight}",
            "# HELP fpengine_stream_errors_total Videos cut off after their 200 was sent.",
            "# TYPE fpengine_stream_errors_total counter", f"fpengine_stream_errors_total {self.stream_errors}",
            "# HELP fpengine_frames_total Frames streamed out.",
            "# TYPE fpengine_frames_total counter", f"fpengine_frames_total {self.frames}",
            "# HELP fpengine_batch_size_total Videos by the size of the batch they were denoised in.",
            "# TYPE fpengine_batch_size_total counter",
        ]
        lines += [f'fpengine_batch_size_total{{size="{b}"}} {n}' for b, n in sorted(self.batch_sizes.items())]
        for name, values, help_ in (
            ("fpengine_latency_seconds", self.latency, "Time to the last byte of a video (recent requests)."),
            ("fpengine_first_byte_seconds", self.first_byte, "Time to the first video bytes (recent requests)."),
        ):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} summary"]
            if values:
                arr = np.asarray(values)
                lines += [f'{name}{{quantile="{q}"}} {np.quantile(arr, q):.6f}' for q in (0.5, 0.95)]
            lines += [f"{name}_count {len(values)}", f"{name}_sum {float(sum(values)):.6f}"]
        for key, value in (extra or {}).items():
            lines += [f"# TYPE fpengine_{key} gauge", f"fpengine_{key} {value}"]
        return "\n".join(lines) + "\n"


METRICS = Metrics()  # the HTTP front end's (one per process)
