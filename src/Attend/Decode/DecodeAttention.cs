using System.Runtime.Intrinsics;
using Attend.Tensors;

namespace Attend.Decode;

/// <summary>What decode attention computes.</summary>
public sealed record DecodeOptions
{
    /// <summary>Multiplier of q·k; null means 1/√D.</summary>
    public float? Scale { get; init; }

    /// <summary>With several query tokens, token t (of nq) sees keys up to L − nq + t (bottom-right, as in prefill). Default true.</summary>
    public bool Causal { get; init; } = true;

    /// <summary>Which pages each step reads (Quest, StreamingLLM, …); null reads them all. A policy that also implements
    /// <see cref="IAttentionFeedback"/> is told after the step how much attention each page it chose received.</summary>
    public IKvSelectionPolicy? Policy { get; init; }

    /// <summary>Called with (kv head, pages) once the policy has chosen, before the step reads them (for measuring).</summary>
    public Action<int, IReadOnlyList<int>>? OnPagesSelected { get; init; }
}

/// <summary>
/// Attention of a few new query tokens against a <see cref="KvCache"/> sequence, split over pages (flash-decoding:
/// each split runs online softmax over its pages and returns (output, LSE); the splits merge exactly). GQA-aware:
/// a split reads each page of a kv head once for all the query heads that share it.
/// </summary>
public static class DecodeAttention
{

    /// <summary>
    /// q [nq, H, D] → output [nq, H, Dv] (and optional lse [nq, H]) against (sequence, layer) of the cache.
    /// Returns the pages read, summed over kv heads (what a policy saved against reading them all).
    /// </summary>
    public static long Forward(TensorView<float> q, KvCache cache, int sequence, int layer, TensorView<float> output,
        DecodeOptions? options = null, TensorView<float> lse = default, KernelTuning? tuning = null)
    {
        ArgumentNullException.ThrowIfNull(cache);
        options ??= new DecodeOptions();
        tuning ??= KernelTuning.Default;
        List<KvCache.Page> pages = cache.Pages(sequence, layer);
        int length = pages.Sum(p => p.Count);
        if (length == 0) throw new InvalidOperationException($"sequence {sequence} has no cached tokens in layer {layer}: nothing to attend to");
        if (q.Rank != 3 || q.Dim(2) != cache.HeadDim || q.Dim(1) % cache.KvHeads != 0 || q.Dim(0) < 1)
            throw new ArgumentException($"q must have shape [nq, H (a multiple of Hkv={cache.KvHeads}), D={cache.HeadDim}]; got {q.ShapeString()}", nameof(q));
        int nq = q.Dim(0), heads = q.Dim(1), group = heads / cache.KvHeads, dv = cache.ValueDim, d = cache.HeadDim;
        if (output.Rank != 3 || output.Dim(0) != nq || output.Dim(1) != heads || output.Dim(2) != dv)
            throw new ArgumentException($"output must have shape [nq={nq}, H={heads}, Dv={dv}]; got {output.ShapeString()}", nameof(output));
        if (!lse.IsDefault && (lse.Rank != 2 || lse.Dim(0) != nq || lse.Dim(1) != heads))
            throw new ArgumentException($"lse must have shape [nq={nq}, H={heads}]; got {lse.ShapeString()}", nameof(lse));
        float scale = options.Scale ?? 1f / MathF.Sqrt(d);
        if (!float.IsFinite(scale) || scale < 0) throw new ArgumentException($"Scale must be finite and ≥ 0; got {scale}", nameof(options));

        int rows = nq * group;                                  // query rows per kv head
        // Pages each kv head reads: the policy's choice from the scaled query rows of its group.
        // With a token policy each kv head reads its selected tokens gathered into chunks of PageSize ("units" below
        // are chunks); otherwise the units are the selected pages.
        var selected = new IReadOnlyList<int>[cache.KvHeads];
        var tokenLists = options.Policy is ITokenSelectionPolicy ? new int[cache.KvHeads][] : null;
        var scaledQueries = new float[cache.KvHeads][];    // [rows × D] per kv head, gathered once for the policy and the splits
        int ps = cache.PageSize;
        for (int hk = 0; hk < cache.KvHeads; hk++)
        {
            var scaled = scaledQueries[hk] = new float[rows * d];
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < d; c++) scaled[r * d + c] = q[r / group, hk * group + r % group, c] * scale;
            if (tokenLists is not null)
            {
                int[] tokens = [.. ((ITokenSelectionPolicy)options.Policy!).SelectTokens(cache, sequence, layer, hk, scaled, rows)];
                if (tokens.Length == 0 || tokens.Any(t => t < 0 || t >= length)) throw new InvalidOperationException($"the policy selected no token or one outside 0..{length - 1}");
                tokenLists[hk] = tokens;
                selected[hk] = Enumerable.Range(0, (tokens.Length + ps - 1) / ps).ToArray();
                options.OnPagesSelected?.Invoke(hk, tokens.Select(t => t / ps).Distinct().Order().ToArray());
                continue;
            }
            selected[hk] = (options.Policy ?? DensePolicy.Instance).SelectPages(cache, sequence, layer, hk, scaled, rows);
            if (selected[hk].Any(p => p < 0 || p >= pages.Count)) throw new InvalidOperationException($"the policy selected a page outside 0..{pages.Count - 1}");
            options.OnPagesSelected?.Invoke(hk, selected[hk]);
        }
        // Per page read and query row, log2 of its softmax mass before normalization (for IAttentionFeedback).
        var feedback = tokenLists is null ? options.Policy as IAttentionFeedback : null;
        float[][]? pageLog2 = feedback is null ? null : [.. selected.Select(x =>
        {
            var a = new float[x.Count * rows];
            Array.Fill(a, float.NegativeInfinity);
            return a;
        })];
        long pagesRead = tokenLists is null ? selected.Sum(x => (long)x.Count) : tokenLists.Sum(t => (long)t.Select(x => x / ps).Distinct().Count());
        // Split the selected pages so every thread has work even for one sequence and a few heads.
        int threads = tuning.EffectiveThreads;
        int splits = Math.Clamp(threads * 4 / cache.KvHeads, 1, Math.Max(1, selected.Min(x => x.Count)));
        var partO = new float[splits * cache.KvHeads * rows * dv];
        var partM = new float[splits * cache.KvHeads * rows];
        var partL = new float[splits * cache.KvHeads * rows];
        const float log2e = 1.4426950408889634f;
        Cpu.WorkQueue.Run(splits * cache.KvHeads, threads, () => new Scratch(ps, d, dv, rows), (item, w) =>
        {
            int split = item / cache.KvHeads, hk = item % cache.KvHeads;
            IReadOnlyList<int> mine = selected[hk];
            int i0 = (int)((long)split * mine.Count / splits), i1 = (int)((long)(split + 1) * mine.Count / splits);
            // Queries scaled by scale·log2(e): the softmax below runs on exp2 (m is kept in log2 units).
            float[] scaledRows = scaledQueries[hk];
            for (int i = 0; i < scaledRows.Length; i++) w.Q[i] = scaledRows[i] * log2e;
            int baseIndex = item * rows;
            Span<float> m = partM.AsSpan(baseIndex, rows), l = partL.AsSpan(baseIndex, rows);
            Span<float> o = partO.AsSpan(baseIndex * dv, rows * dv);
            m.Fill(float.NegativeInfinity);
            for (int i = i0; i < i1; i++)
            {
                int count, first;
                int[]? gathered = tokenLists?[hk];
                if (gathered is null)
                {
                    KvCache.Page page = pages[mine[i]];
                    count = page.Count;
                    first = mine[i] * ps;
                    page.ReadKeys(hk, w.K);
                    page.ReadValues(hk, w.V);
                }
                else
                {
                    // A chunk of gathered tokens: rows copied from their pages.
                    first = mine[i] * ps;
                    count = Math.Min(ps, gathered.Length - first);
                    for (int j = 0; j < count; j++)
                    {
                        int token = gathered[first + j];
                        pages[token / ps].ReadKey(hk, token % ps, w.K.AsSpan(j * d, d));
                        pages[token / ps].ReadValue(hk, token % ps, w.V.AsSpan(j * dv, dv));
                    }
                }
                // S[r, j] = q_r · k_j for the whole page, 4 query rows per pass over each key row; causal rows drop
                // keys past their position.
                PageScores(w.Q, w.K, w.S, rows, count, d, ps);
                if (options.Causal && nq > 1)
                {
                    for (int r = 0; r < rows; r++)
                        for (int j = 0; j < count; j++)
                            if ((gathered is null ? first + j : gathered[first + j]) > length - nq + r / group) w.S[r * ps + j] = float.NegativeInfinity;
                }
                for (int r = 0; r < rows; r++)
                {
                    Span<float> srow = w.S.AsSpan(r * ps, count);
                    float blockMax = float.NegativeInfinity;
                    foreach (float x in srow) blockMax = MathF.Max(blockMax, x);
                    float newMax = MathF.Max(m[r], blockMax);
                    if (float.IsNegativeInfinity(newMax))
                    {
                        // Nothing visible yet: zero weights, nothing to rescale.
                        srow.Clear();
                        w.Alpha[r] = 1f;
                        continue;
                    }
                    float alpha = float.IsNegativeInfinity(m[r]) ? 0f : float.Exp2(m[r] - newMax);
                    float sum = Exp2Rows(srow, newMax);
                    if (pageLog2 is not null) pageLog2[hk][(i * rows) + r] = sum > 0 ? newMax + MathF.Log2(sum) : float.NegativeInfinity;
                    l[r] = l[r] * alpha + sum;
                    m[r] = newMax;
                    w.Alpha[r] = alpha;
                }
                PageValues(w.S, w.V, o, w.Alpha, rows, count, dv, ps);
            }
        });

        // Merge the splits exactly in log-sum-exp space.
        var acc = new float[dv];
        var rowLog2 = new float[cache.KvHeads * rows];
        for (int hk = 0; hk < cache.KvHeads; hk++)
            for (int r = 0; r < rows; r++)
            {
                float max = float.NegativeInfinity;
                for (int sp = 0; sp < splits; sp++) max = MathF.Max(max, partM[(sp * cache.KvHeads + hk) * rows + r]);
                Array.Clear(acc);
                float total = 0;
                if (!float.IsNegativeInfinity(max))
                {
                    for (int sp = 0; sp < splits; sp++)
                    {
                        int idx = (sp * cache.KvHeads + hk) * rows + r;
                        if (float.IsNegativeInfinity(partM[idx])) continue;
                        float wgt = float.Exp2(partM[idx] - max);
                        total += partL[idx] * wgt;
                        Linear.Vectors.Axpy(wgt, partO.AsSpan(idx * dv, dv), acc);
                    }
                }
                int t = r / group, h = hk * group + r % group;
                float inv = total == 0 ? 0 : 1 / total;
                for (int c = 0; c < dv; c++) output[t, h, c] = acc[c] * inv;
                rowLog2[hk * rows + r] = total == 0 ? float.NegativeInfinity : max + MathF.Log2(total);
                if (!lse.IsDefault) lse[t, h] = rowLog2[hk * rows + r] * 0.6931471805599453f;
            }
        if (feedback is not null)
        {
            for (int hk = 0; hk < cache.KvHeads; hk++)
            {
                var mass = new float[selected[hk].Count];
                int live = 0;
                for (int r = 0; r < rows; r++)
                {
                    float total = rowLog2[hk * rows + r];
                    if (float.IsNegativeInfinity(total) || float.IsNaN(total)) continue;
                    live++;
                    for (int i = 0; i < mass.Length; i++) mass[i] += float.Exp2(pageLog2![hk][(i * rows) + r] - total);
                }
                if (live > 1) for (int i = 0; i < mass.Length; i++) mass[i] /= live;
                feedback.Observe(cache, sequence, layer, hk, selected[hk], mass);
            }
        }
        return pagesRead;
    }

    /// <summary>x ← 2^(x − max) in place (−∞ → 0), vectorized; returns the sum.</summary>
    private static float Exp2Rows(Span<float> x, float max)
    {
        int i = 0;
        float sum = 0;
        if (System.Runtime.Intrinsics.Vector256.IsHardwareAccelerated)
        {
            var mv = System.Runtime.Intrinsics.Vector256.Create(max);
            var acc = System.Runtime.Intrinsics.Vector256<float>.Zero;
            for (; i <= x.Length - 8; i += 8)
            {
                var e = Cpu.V256Ops.Exp2(System.Runtime.Intrinsics.Vector256.Create((ReadOnlySpan<float>)x.Slice(i, 8)) - mv);
                System.Runtime.Intrinsics.Vector256.StoreUnsafe(e, ref System.Runtime.InteropServices.MemoryMarshal.GetReference(x), (nuint)i);
                acc += e;
            }
            sum = System.Runtime.Intrinsics.Vector256.Sum(acc);
        }
        for (; i < x.Length; i++)
        {
            x[i] = float.Exp2(x[i] - max);
            sum += x[i];
        }
        return sum;
    }

    private sealed class Scratch(int pageSize, int d, int dv, int rows)
    {
        public readonly float[] Q = new float[rows * d];
        public readonly float[] K = new float[pageSize * d];
        public readonly float[] V = new float[pageSize * dv];
        public readonly float[] S = new float[rows * pageSize];
        public readonly float[] Alpha = new float[rows];
    }

    /// <summary>S[r, j] = Q[r] · K[j] for r &lt; rows, j &lt; count: each key row is loaded once per 4 query rows.</summary>
    private static unsafe void PageScores(float[] q, float[] k, float[] s, int rows, int count, int d, int ld)
    {
        fixed (float* qp = q, kp = k, sp = s)
        {
            for (int r0 = 0; r0 < rows; r0 += 4)
            {
                int n = Math.Min(4, rows - r0);
                float* q0 = qp + r0 * d, q1 = q0 + (n > 1 ? d : 0), q2 = q0 + (n > 2 ? 2 * d : 0), q3 = q0 + (n > 3 ? 3 * d : 0);
                for (int j = 0; j < count; j++)
                {
                    float* kj = kp + (long)j * d;
                    var a0 = System.Runtime.Intrinsics.Vector256<float>.Zero;
                    var a1 = a0;
                    var a2 = a0;
                    var a3 = a0;
                    int c = 0;
                    for (; c <= d - 8; c += 8)
                    {
                        var kv = System.Runtime.Intrinsics.Vector256.Load(kj + c);
                        a0 = System.Runtime.Intrinsics.Vector256.FusedMultiplyAdd(System.Runtime.Intrinsics.Vector256.Load(q0 + c), kv, a0);
                        a1 = System.Runtime.Intrinsics.Vector256.FusedMultiplyAdd(System.Runtime.Intrinsics.Vector256.Load(q1 + c), kv, a1);
                        a2 = System.Runtime.Intrinsics.Vector256.FusedMultiplyAdd(System.Runtime.Intrinsics.Vector256.Load(q2 + c), kv, a2);
                        a3 = System.Runtime.Intrinsics.Vector256.FusedMultiplyAdd(System.Runtime.Intrinsics.Vector256.Load(q3 + c), kv, a3);
                    }
                    float s0 = System.Runtime.Intrinsics.Vector256.Sum(a0), s1 = System.Runtime.Intrinsics.Vector256.Sum(a1);
                    float s2 = System.Runtime.Intrinsics.Vector256.Sum(a2), s3 = System.Runtime.Intrinsics.Vector256.Sum(a3);
                    for (; c < d; c++)
                    {
                        s0 += q0[c] * kj[c];
                        s1 += q1[c] * kj[c];
                        s2 += q2[c] * kj[c];
                        s3 += q3[c] * kj[c];
                    }
                    sp[r0 * ld + j] = s0;
                    if (n > 1) sp[(r0 + 1) * ld + j] = s1;
                    if (n > 2) sp[(r0 + 2) * ld + j] = s2;
                    if (n > 3) sp[(r0 + 3) * ld + j] = s3;
                }
            }
        }
    }

    /// <summary>O[r] = α[r]·O[r] + Σ_j P[r, j]·V[j], with the output chunk of 4 rows held in registers over the page.</summary>
    private static unsafe void PageValues(float[] p, float[] v, Span<float> o, float[] alpha, int rows, int count, int dv, int ld)
    {
        fixed (float* pp = p, vp = v, op = o)
        {
            for (int r0 = 0; r0 < rows; r0 += 4)
            {
                int n = Math.Min(4, rows - r0);
                float* p0 = pp + r0 * ld, p1 = p0 + (n > 1 ? ld : 0), p2 = p0 + (n > 2 ? 2 * ld : 0), p3 = p0 + (n > 3 ? 3 * ld : 0);
                float* o0 = op + r0 * dv, o1 = o0 + (n > 1 ? dv : 0), o2 = o0 + (n > 2 ? 2 * dv : 0), o3 = o0 + (n > 3 ? 3 * dv : 0);
                float al0 = alpha[r0], al1 = n > 1 ? alpha[r0 + 1] : 0f, al2 = n > 2 ? alpha[r0 + 2] : 0f, al3 = n > 3 ? alpha[r0 + 3] : 0f;
                int c = 0;
                for (; c <= dv - 8; c += 8)
                {
                    var a0 = System.Runtime.Intrinsics.Vector256.Load(o0 + c) * al0;
                    var a1 = System.Runtime.Intrinsics.Vector256.Load(o1 + c) * al1;
                    var a2 = System.Runtime.Intrinsics.Vector256.Load(o2 + c) * al2;
                    var a3 = System.Runtime.Intrinsics.Vector256.Load(o3 + c) * al3;
                    for (int j = 0; j < count; j++)
                    {
                        var vv = System.Runtime.Intrinsics.Vector256.Load(vp + (long)j * dv + c);
                        a0 = System.Runtime.Intrinsics.Vector256.FusedMultiplyAdd(System.Runtime.Intrinsics.Vector256.Create(p0[j]), vv, a0);
                        a1 = System.Runtime.Intrinsics.Vector256.FusedMultiplyAdd(System.Runtime.Intrinsics.Vector256.Create(p1[j]), vv, a1);
                        a2 = System.Runtime.Intrinsics.Vector256.FusedMultiplyAdd(System.Runtime.Intrinsics.Vector256.Create(p2[j]), vv, a2);
                        a3 = System.Runtime.Intrinsics.Vector256.FusedMultiplyAdd(System.Runtime.Intrinsics.Vector256.Create(p3[j]), vv, a3);
                    }
                    a0.Store(o0 + c);
                    if (n > 1) a1.Store(o1 + c);
                    if (n > 2) a2.Store(o2 + c);
                    if (n > 3) a3.Store(o3 + c);
                }
                for (; c < dv; c++)
                {
                    float b0 = o0[c] * al0, b1 = o1[c] * al1, b2 = o2[c] * al2, b3 = o3[c] * al3;
                    for (int j = 0; j < count; j++)
                    {
                        float x = vp[(long)j * dv + c];
                        b0 += p0[j] * x;
                        b1 += p1[j] * x;
                        b2 += p2[j] * x;
                        b3 += p3[j] * x;
                    }
                    o0[c] = b0;
                    if (n > 1) o1[c] = b1;
                    if (n > 2) o2[c] = b2;
                    if (n > 3) o3[c] = b3;
                }
            }
        }
    }
}
