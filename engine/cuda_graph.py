"""A call replayed as a CUDA graph (the triton backend's UNet steps, compiled just in time or
from packages). Imports only torch."""
from __future__ import annotations

import torch


class CudaGraphCall:
    """Replays ``fn`` as a CUDA graph, one graph per input signature (shapes and dtypes).

    Inputs are copied into static buffers and the returned tensor is the graph's own output
    buffer: consume (or copy) it before the next call. Tensors in nested lists are flattened.
    """

    def __init__(self, fn, warmup: int = 3):
        self.fn, self.warmup, self.graphs = fn, warmup, {}

    @staticmethod
    def _flatten(args):
        flat = []
        for a in args:
            if isinstance(a, (list, tuple)):
                flat.extend(a)
            else:
                flat.append(a)
        return flat

    def _rebuild(self, args, flat):
        it = iter(flat)
        return [[next(it) for _ in a] if isinstance(a, (list, tuple)) else next(it) for a in args]

    def __call__(self, *args):
        flat = self._flatten(args)
        key = tuple((tuple(t.shape), t.dtype) for t in flat)
        entry = self.graphs.get(key)
        if entry is None:
            static = [t.clone() for t in flat]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(self.warmup):
                    self.fn(*self._rebuild(args, static))
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.fn(*self._rebuild(args, static))
            entry = self.graphs[key] = (graph, static, out)
        graph, static, out = entry
        for s, t in zip(static, flat):
            s.copy_(t)
        graph.replay()
        return out
