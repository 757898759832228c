using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace Attend.Diagnostics;

/// <summary>
/// Ceilings measured on this machine, in the same run as the kernels they judge (MEASURING.md): the FMA peak
/// from a register-only loop, and the memory bandwidth of a large copy.
/// </summary>
public static class PeakProbe
{
    /// <summary>Peak f32 FMA rate in GFLOPS (2 FLOPs per lane per FMA) on <paramref name="threads"/> threads, best of a few tries.</summary>
    public static double FmaGflops(int threads, TimeSpan? duration = null)
    {
        long iterations = 2_000_000;
        double seconds = (duration ?? TimeSpan.FromMilliseconds(300)).TotalSeconds;
        // Calibrate to about the requested duration per try.
        double t = Time(threads, iterations);
        iterations = Math.Max(100_000, (long)(iterations * seconds / Math.Max(t, 1e-6)));
        double best = 0;
        for (int i = 0; i < 3; i++)
        {
            double time = Time(threads, iterations);
            best = Math.Max(best, threads * iterations * FlopsPerIteration / time / 1e9);
        }
        return best;
    }

    private static int Lanes => Vector512.IsHardwareAccelerated ? 16 : Vector256.IsHardwareAccelerated ? 8 : 4;

    // 12 independent FMA chains hide the FMA latency (4 cycles) at 2 FMAs per cycle and still fit in 16 registers.
    private const int Chains = 12;

    private static double FlopsPerIteration => Chains * Lanes * 2.0;

    private static double Time(int threads, long iterations)
    {
        var sw = Stopwatch.StartNew();
        Parallel.For(0, threads, new ParallelOptions { MaxDegreeOfParallelism = threads }, i =>
        {
            float r = Vector512.IsHardwareAccelerated ? Loop512(iterations, i) : Vector256.IsHardwareAccelerated ? Loop256(iterations, i) : Loop128(iterations, i);
            if (r == 42.4242f) Console.Write(""); // keeps the loop observable
        });
        return sw.Elapsed.TotalSeconds;
    }

    [MethodImpl(MethodImplOptions.NoInlining | MethodImplOptions.AggressiveOptimization)]
    private static float Loop512(long n, int seed)
    {
        Vector512<float> m = Vector512.Create(0.999999f), a = Vector512.Create(1e-7f);
        Vector512<float> x0 = Vector512.Create(seed + 0f), x1 = x0 + a, x2 = x1 + a, x3 = x2 + a, x4 = x3 + a, x5 = x4 + a;
        Vector512<float> x6 = x5 + a, x7 = x6 + a, x8 = x7 + a, x9 = x8 + a, x10 = x9 + a, x11 = x10 + a;
        for (long i = 0; i < n; i++)
        {
            x0 = Vector512.FusedMultiplyAdd(x0, m, a); x1 = Vector512.FusedMultiplyAdd(x1, m, a); x2 = Vector512.FusedMultiplyAdd(x2, m, a);
            x3 = Vector512.FusedMultiplyAdd(x3, m, a); x4 = Vector512.FusedMultiplyAdd(x4, m, a); x5 = Vector512.FusedMultiplyAdd(x5, m, a);
            x6 = Vector512.FusedMultiplyAdd(x6, m, a); x7 = Vector512.FusedMultiplyAdd(x7, m, a); x8 = Vector512.FusedMultiplyAdd(x8, m, a);
            x9 = Vector512.FusedMultiplyAdd(x9, m, a); x10 = Vector512.FusedMultiplyAdd(x10, m, a); x11 = Vector512.FusedMultiplyAdd(x11, m, a);
        }
        return Vector512.Sum(x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7 + x8 + x9 + x10 + x11);
    }

    [MethodImpl(MethodImplOptions.NoInlining | MethodImplOptions.AggressiveOptimization)]
    private static float Loop256(long n, int seed)
    {
        Vector256<float> m = Vector256.Create(0.999999f), a = Vector256.Create(1e-7f);
        Vector256<float> x0 = Vector256.Create(seed + 0f), x1 = x0 + a, x2 = x1 + a, x3 = x2 + a, x4 = x3 + a, x5 = x4 + a;
        Vector256<float> x6 = x5 + a, x7 = x6 + a, x8 = x7 + a, x9 = x8 + a, x10 = x9 + a, x11 = x10 + a;
        for (long i = 0; i < n; i++)
        {
            x0 = Vector256.FusedMultiplyAdd(x0, m, a); x1 = Vector256.FusedMultiplyAdd(x1, m, a); x2 = Vector256.FusedMultiplyAdd(x2, m, a);
            x3 = Vector256.FusedMultiplyAdd(x3, m, a); x4 = Vector256.FusedMultiplyAdd(x4, m, a); x5 = Vector256.FusedMultiplyAdd(x5, m, a);
            x6 = Vector256.FusedMultiplyAdd(x6, m, a); x7 = Vector256.FusedMultiplyAdd(x7, m, a); x8 = Vector256.FusedMultiplyAdd(x8, m, a);
            x9 = Vector256.FusedMultiplyAdd(x9, m, a); x10 = Vector256.FusedMultiplyAdd(x10, m, a); x11 = Vector256.FusedMultiplyAdd(x11, m, a);
        }
        return Vector256.Sum(x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7 + x8 + x9 + x10 + x11);
    }

    [MethodImpl(MethodImplOptions.NoInlining | MethodImplOptions.AggressiveOptimization)]
    private static float Loop128(long n, int seed)
    {
        Vector128<float> m = Vector128.Create(0.999999f), a = Vector128.Create(1e-7f);
        Vector128<float> x0 = Vector128.Create(seed + 0f), x1 = x0 + a, x2 = x1 + a, x3 = x2 + a, x4 = x3 + a, x5 = x4 + a;
        Vector128<float> x6 = x5 + a, x7 = x6 + a, x8 = x7 + a, x9 = x8 + a, x10 = x9 + a, x11 = x10 + a;
        for (long i = 0; i < n; i++)
        {
            x0 = Vector128.FusedMultiplyAdd(x0, m, a); x1 = Vector128.FusedMultiplyAdd(x1, m, a); x2 = Vector128.FusedMultiplyAdd(x2, m, a);
            x3 = Vector128.FusedMultiplyAdd(x3, m, a); x4 = Vector128.FusedMultiplyAdd(x4, m, a); x5 = Vector128.FusedMultiplyAdd(x5, m, a);
            x6 = Vector128.FusedMultiplyAdd(x6, m, a); x7 = Vector128.FusedMultiplyAdd(x7, m, a); x8 = Vector128.FusedMultiplyAdd(x8, m, a);
            x9 = Vector128.FusedMultiplyAdd(x9, m, a); x10 = Vector128.FusedMultiplyAdd(x10, m, a); x11 = Vector128.FusedMultiplyAdd(x11, m, a);
        }
        return Vector128.Sum(x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7 + x8 + x9 + x10 + x11);
    }

    /// <summary>Copy bandwidth in GB/s (bytes read + bytes written) over a buffer far larger than the caches.</summary>
    public static unsafe double CopyGBps(int threads, long bytes = 256L << 20)
    {
        byte* src = (byte*)NativeMemory.AlignedAlloc((nuint)bytes, 64);
        byte* dst = (byte*)NativeMemory.AlignedAlloc((nuint)bytes, 64);
        try
        {
            NativeMemory.Fill(src, (nuint)bytes, 1);
            NativeMemory.Fill(dst, (nuint)bytes, 2);
            long chunk = bytes / threads;
            double best = 0;
            for (int t = 0; t < 4; t++)
            {
                var sw = Stopwatch.StartNew();
                Parallel.For(0, threads, new ParallelOptions { MaxDegreeOfParallelism = threads }, i =>
                    Buffer.MemoryCopy(src + i * chunk, dst + i * chunk, chunk, chunk));
                best = Math.Max(best, 2.0 * chunk * threads / sw.Elapsed.TotalSeconds / 1e9);
            }
            return best;
        }
        finally
        {
            NativeMemory.AlignedFree(src);
            NativeMemory.AlignedFree(dst);
        }
    }
}
