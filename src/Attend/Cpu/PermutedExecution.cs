using System.Runtime.InteropServices;
using Attend.Masks;
using Attend.Tensors;

namespace Attend.Cpu;

/// <summary>
/// Runs a plan expressed over a <see cref="TokenPermutation"/>: gathers q, k, v into permuted contiguous copies,
/// runs the shared executor on them, and scatters output and LSE back to the original positions.
/// </summary>
internal static class PermutedExecution
{
    public static void Forward<T>(TensorView<T> q, TensorView<T> k, TensorView<T> v, TensorView<T> output, TensorView<float> lse,
        AttentionShape shape, float scale, AttentionOptions options, KernelTuning tuning) where T : unmanaged
    {
        SparsityPlan plan = options.Plan!;
        TokenPermutation p = plan.Permutation!;
        int b = shape.Batch, h = shape.Heads, sq = shape.QueryLength;
        TensorView<T> qp = Gather(q, p, keys: false, tuning);
        TensorView<T> kp = Gather(k, p, keys: true, tuning);
        TensorView<T> vp = Gather(v, p, keys: true, tuning);
        var op = new TensorView<T>(new T[output.ElementCount], b, sq, h, shape.ValueDim);
        TensorView<float> lp = lse.IsDefault ? default : new TensorView<float>(new float[lse.ElementCount], b, sq, h);
        var inner = options with { Plan = new SparsityPlan(plan.Blocks, plan.Tokens), Scale = scale };
        FlashAttentionCpu.Forward(qp, kp, vp, op, lp, shape, scale, inner, tuning);
        Parallel.For(0, b * h, Options(tuning), bh =>
        {
            int bi = bh / h, hi = bh % h;
            ReadOnlySpan<int> order = p.QueryOrder(bi, hi);
            for (int i = 0; i < sq; i++)
            {
                CopyRow(op, bi, i, hi, output, bi, order[i], hi);
                if (!lse.IsDefault) lse[bi, order[i], hi] = lp[bi, i, hi];
            }
        });
    }

    private static ParallelOptions Options(KernelTuning tuning) =>
        new() { MaxDegreeOfParallelism = tuning.Threads > 0 ? tuning.Threads : Environment.ProcessorCount };

    /// <summary>A contiguous [B, S, heads, D] copy of q (or of k/v with <paramref name="keys"/>) in the permutation's order.</summary>
    private static TensorView<T> Gather<T>(TensorView<T> source, TokenPermutation p, bool keys, KernelTuning tuning) where T : unmanaged
    {
        int batch = source.Dim(0), length = source.Dim(1), heads = source.Dim(2), d = source.Dim(3);
        var gathered = new TensorView<T>(new T[(long)batch * length * heads * d], batch, length, heads, d);
        Parallel.For(0, batch * heads, Options(tuning), bh =>
        {
            int bi = bh / heads, hi = bh % heads;
            ReadOnlySpan<int> positions = keys ? p.KeyOrder(bi, hi) : p.QueryOrder(bi, hi);
            for (int i = 0; i < length; i++) CopyRow(source, bi, positions[i], hi, gathered, bi, i, hi);
        });
        return gathered;
    }

    private static void CopyRow<T>(TensorView<T> from, int fb, int fs, int fh, TensorView<T> to, int tb, int ts, int th) where T : unmanaged
    {
        int d = from.Dim(3);
        if (from.Stride(3) == 1 && to.Stride(3) == 1)
        {
            MemoryMarshal.CreateReadOnlySpan(ref from[fb, fs, fh, 0], d).CopyTo(MemoryMarshal.CreateSpan(ref to[tb, ts, th, 0], d));
            return;
        }
        for (int x = 0; x < d; x++) to[tb, ts, th, x] = from[fb, fs, fh, x];
    }
}
