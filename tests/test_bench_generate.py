"""benchmarks/bench_generate.py's per-kernel breakdown, run on the CPU's profiler (on the GPU the
same code reads the device's kernel times)."""
import pytest

from benchmarks.bench_generate import top_kernels
from finephys.model.assembly import assemble
from finephys.model.demo import load_demo
from finephys.sampler.options import GenerateOptions


@pytest.fixture(scope="module")
def demo():
    return assemble(load_demo())


def test_top_kernels_lists_the_costliest_first_and_sums_to_the_total(demo, walk_clip):
    opts = GenerateOptions("a person walking", num_frames=4, height=64, width=64, num_inference_steps=1, seed=0)
    rows = top_kernels(demo, walk_clip, opts, 5, device="cpu")
    top, total = rows[:-1], rows[-1]
    assert len(top) == 5 and total["name"] == "(all kernels)" and total["share"] == 1.0
    assert [r["ms"] for r in top] == sorted((r["ms"] for r in top), reverse=True)
    assert all(0 < r["share"] <= 1 and r["calls"] >= 1 for r in top)
    assert sum(r["ms"] for r in top) <= total["ms"] + 0.05
    assert any("conv" in r["name"] or "mm" in r["name"] or "linear" in r["name"] for r in top), top
