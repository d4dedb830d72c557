"""Shared-memory bank model of the PhysNet kernel's gather (kernels/physnet.py, two warps per slot).

    python -m benchmarks.physnet_bank_model [--joints 17]

For every gather instruction (register row k, lanes (direction d = lane % 2, column i = lane // 2 + 16
warp + 32 rep)) it counts the wavefronts a 32-bank shared memory needs: the most distinct 4-byte words
that fall on one bank. Prints the wavefronts per slot (two solves) for 16-bit and fp32 inputs with
the reverse triangle right after the forward one and with the kernel's 16-bank offset. Checked
against Nsight Compute on an H100 (benchmarks/RESULTS.md): the model's 161 (16-bit) and 221 (fp32)
conflict wavefronts per slot without the offset matched the measured 162 and 231.
"""
import argparse

from kernels.physnet import _reverse_start


def gather_wavefronts(D, esize, r0):
    """Wavefronts per slot of the gather; ``esize`` bytes per element, ``r0`` the reverse triangle's
    first element in the shared copy."""
    last = D - 1

    def packed(k, i):  # M[k, i] = L[max, min]; rows and columns past D repeat the last one
        k, i = min(k, last), min(i, last)
        return i * (i + 1) // 2 + k if k < i else k * (k + 1) // 2 + i

    total = 0
    for k in range(D):
        for warp in range(2):
            for rep in range(2):
                banks = {}
                for lane in range(32):
                    d, i = lane % 2, lane // 2 + 16 * warp + 32 * rep
                    word = (d * r0 + packed(k, i)) * esize // 4
                    banks.setdefault(word % 32, set()).add(word)
                total += max(len(words) for words in banks.values())
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--joints", type=int, default=17)
    args = ap.parse_args(argv)
    D = 3 * args.joints
    if not 32 < D <= 64:
        ap.error(f"--joints: the model follows the lane layout of 33 <= 3J <= 64 (J = 11..21), got J={args.joints}")
    P = D * (D + 1) // 2
    ideal = D * 4  # one wavefront per instruction: D rows x 2 warps x 2 reps
    print(f"J={args.joints} D={D}: {ideal} gather instructions per slot (= wavefronts without conflicts)")
    for name, esize in (("16-bit", 2), ("fp32", 4)):
        # the kernel's copy: 16-bit triangles travel as words when P is even; r0 as in _physnet_fused_triton
        units = P // 2 if esize == 2 and P % 2 == 0 else P
        r0 = _reverse_start(units, 2 if esize == 2 and P % 2 else 1)
        per_unit = 2 if esize == 2 and P % 2 == 0 else 1  # elements per copy unit
        plain = gather_wavefronts(D, esize, P)
        shifted = gather_wavefronts(D, esize, r0 * per_unit)
        print(f"{name:>6}: reverse triangle right after the forward one {plain} "
              f"(conflicts {plain - ideal}); 16 banks later {shifted} (conflicts {shifted - ideal})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
