using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace Attend.Cpu;

/// <summary>
/// 8 × 8 float tile transposes (8 row loads, 24 shuffles, 8 column stores), shared by the executor's key pack and the
/// selectors' key panels. For the selectors' panels at S 32768, D 128 they took 3.4 ms a head, where AVX2 gathers took
/// 7.4 and an element-by-element scatter 5.4 (docs/perf/sparse.md, session 12).
/// </summary>
internal static unsafe class Transpose
{
    /// <summary>Writes the 8 × 8 tile at <paramref name="x"/> (row stride <paramref name="ldx"/> floats) transposed to <paramref name="y"/> (row stride <paramref name="ldy"/>). Needs AVX.</summary>
    public static void Tile8(float* x, long ldx, float* y, long ldy) =>
        Tile8(x, x + ldx, x + (2 * ldx), x + (3 * ldx), x + (4 * ldx), x + (5 * ldx), x + (6 * ldx), x + (7 * ldx), y, ldy);

    /// <summary>As <see cref="Tile8(float*, long, float*, long)"/> with each of the 8 rows anywhere (gathered key rows).</summary>
    public static void Tile8(float* x0, float* x1, float* x2, float* x3, float* x4, float* x5, float* x6, float* x7, float* y, long ldy)
    {
        Vector256<float> r0 = Avx.LoadVector256(x0), r1 = Avx.LoadVector256(x1), r2 = Avx.LoadVector256(x2), r3 = Avx.LoadVector256(x3);
        Vector256<float> r4 = Avx.LoadVector256(x4), r5 = Avx.LoadVector256(x5), r6 = Avx.LoadVector256(x6), r7 = Avx.LoadVector256(x7);
        Vector256<float> t0 = Avx.UnpackLow(r0, r1), t1 = Avx.UnpackHigh(r0, r1), t2 = Avx.UnpackLow(r2, r3), t3 = Avx.UnpackHigh(r2, r3);
        Vector256<float> t4 = Avx.UnpackLow(r4, r5), t5 = Avx.UnpackHigh(r4, r5), t6 = Avx.UnpackLow(r6, r7), t7 = Avx.UnpackHigh(r6, r7);
        Vector256<float> u0 = Avx.Shuffle(t0, t2, 0x44), u1 = Avx.Shuffle(t0, t2, 0xEE), u2 = Avx.Shuffle(t1, t3, 0x44), u3 = Avx.Shuffle(t1, t3, 0xEE);
        Vector256<float> u4 = Avx.Shuffle(t4, t6, 0x44), u5 = Avx.Shuffle(t4, t6, 0xEE), u6 = Avx.Shuffle(t5, t7, 0x44), u7 = Avx.Shuffle(t5, t7, 0xEE);
        Avx.Store(y, Avx.Permute2x128(u0, u4, 0x20));
        Avx.Store(y + ldy, Avx.Permute2x128(u1, u5, 0x20));
        Avx.Store(y + (2 * ldy), Avx.Permute2x128(u2, u6, 0x20));
        Avx.Store(y + (3 * ldy), Avx.Permute2x128(u3, u7, 0x20));
        Avx.Store(y + (4 * ldy), Avx.Permute2x128(u0, u4, 0x31));
        Avx.Store(y + (5 * ldy), Avx.Permute2x128(u1, u5, 0x31));
        Avx.Store(y + (6 * ldy), Avx.Permute2x128(u2, u6, 0x31));
        Avx.Store(y + (7 * ldy), Avx.Permute2x128(u3, u7, 0x31));
    }
}
