namespace Attend;

/// <summary>The instruction width a CPU kernel runs with. Every path gives the same result up to rounding.</summary>
public enum KernelPath
{
    /// <summary>The widest path the processor accelerates.</summary>
    Auto,
    /// <summary>One float at a time (no SIMD).</summary>
    Scalar,
    /// <summary>128-bit vectors (SSE/NEON).</summary>
    Vector128,
    /// <summary>256-bit vectors (AVX2).</summary>
    Vector256,
    /// <summary>512-bit vectors (AVX-512); emulated (slowly) where the processor lacks it.</summary>
    Vector512,
}

/// <summary>How a kernel runs: performance knobs only. Results never depend on these beyond rounding.</summary>
public sealed record KernelTuning
{
    /// <summary>Default tuning: widest SIMD path, all cores.</summary>
    public static KernelTuning Default { get; } = new();

    /// <summary>The SIMD path; forcing one lets tests run every path on any machine.</summary>
    public KernelPath Path { get; init; } = KernelPath.Auto;

    /// <summary>Worker threads; 0 means <see cref="Environment.ProcessorCount"/>.</summary>
    public int Threads { get; init; }

    /// <summary>
    /// Query rows per work item (multiple of 4, 4–256). Keys are walked in blocks of 64. 128 halves the K/V panel
    /// traffic of 64 per FLOP; on the 16-core Xeon it was 1.04–1.20× PyTorch's CPU flash kernel where 64 gave
    /// 0.97–1.11× (docs/perf/cpu-dense.md).
    /// </summary>
    public int BlockQ { get; init; } = 128;

    /// <summary>Tokens per chunk of causal linear attention (Lightning's block size).</summary>
    public int ChunkSize { get; init; } = 64;

    internal int EffectiveThreads => Threads > 0 ? Threads : Environment.ProcessorCount;

    internal KernelPath EffectivePath => Path != KernelPath.Auto ? Path
        : System.Runtime.Intrinsics.Vector512.IsHardwareAccelerated ? KernelPath.Vector512
        : System.Runtime.Intrinsics.Vector256.IsHardwareAccelerated ? KernelPath.Vector256
        : System.Runtime.Intrinsics.Vector128.IsHardwareAccelerated ? KernelPath.Vector128
        : KernelPath.Scalar;
}
