"""Shared-memory bank model of the PhysNet kernel's gather (fpkernels/physnet.py, two warps per slot).

    python -m benchmarks.physnet_bank_model [--joints 17]

For every gather instruction it counts the wavefronts a 32-bank shared memory needs: the most
distinct 4-byte words that fall on one bank. Prints the wavefronts per slot (two solves) for the
kernel's two layouts and the ones they replaced:

- 16-bit inputs: element p of the forward and the reverse triangle share one int32 word, so one
  gather per (row k, column i) fetches both matrices; lanes hold columns i (i = lane + 32 warp).
- fp32: both triangles side by side, the reverse one from element r0; lanes hold (direction
  d = lane % 2, column i = lane // 2 + 16 warp + 32 rep).

Checked against Nsight Compute (benchmarks/RESULTS.md): conflict wavefronts per slot, model against
measured, 161/162 (16-bit side by side), 97/99 (16-bit, 16-bank offset), 44/45 (16-bit interleaved),
221/231 (fp32 side by side) and 39/51 (fp32, 16-bank offset).
"""
import argparse
import functools

from fpkernels.physnet import _reverse_start, _tril_index


@functools.lru_cache(maxsize=None)
def _index(D):
    return _tril_index(D, "cpu").tolist()


def _packed(D, k, i):
    """M[k, i] = L[max, min] in the packed lower triangle (the reference's index); rows and columns
    past D repeat the last one."""
    return _index(D)[min(k, D - 1)][min(i, D - 1)]


def _wavefronts(addresses):
    """Wavefronts of one warp instruction: the most distinct 4-byte words on one of 32 banks."""
    banks = {}
    for word in addresses:
        banks.setdefault(word % 32, set()).add(word)
    return max(len(words) for words in banks.values())


def gather_wavefronts(D, esize, r0):
    """Side-by-side layout: wavefronts per slot; ``esize`` bytes per element, ``r0`` the reverse
    triangle's first element in the shared copy."""
    return sum(
        _wavefronts([(lane % 2 * r0 + _packed(D, k, lane // 2 + 16 * warp + 32 * rep)) * esize // 4
                     for lane in range(32)])
        for k in range(D) for warp in range(2) for rep in range(2))


def interleaved_wavefronts(D):
    """Interleaved 16-bit layout (one word per element pair): wavefronts per slot."""
    return sum(_wavefronts([_packed(D, k, lane + 32 * warp) for lane in range(32)])
               for k in range(D) for warp in range(2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--joints", type=int, default=17)
    args = ap.parse_args(argv)
    D = 3 * args.joints
    if not 32 < D <= 64:
        ap.error(f"--joints: the model follows the lane layout of 33 <= 3J <= 64 (J = 11..21), got J={args.joints}")
    P = D * (D + 1) // 2
    side = D * 4  # side by side: D rows x 2 warps x 2 reps, one wavefront each without conflicts
    print(f"J={args.joints} D={D}")
    inter = interleaved_wavefronts(D)
    print(f"16-bit, interleaved (the kernel): {inter} wavefronts for {2 * D} instructions "
          f"(conflicts {inter - 2 * D})")
    plain, shifted = gather_wavefronts(D, 2, P), gather_wavefronts(D, 2, 2 * _reverse_start(P // 2, 1))
    print(f"16-bit, side by side (before): {plain} (conflicts {plain - side}); reverse triangle 16 banks later "
          f"{shifted} (conflicts {shifted - side}), for {side} instructions")
    plain, shifted = gather_wavefronts(D, 4, P), gather_wavefronts(D, 4, _reverse_start(P, 1))
    print(f"  fp32, side by side: {plain} (conflicts {plain - side}); reverse triangle 16 banks later (the kernel) "
          f"{shifted} (conflicts {shifted - side}), for {side} instructions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
