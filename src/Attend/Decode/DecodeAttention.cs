using Attend.Tensors;

namespace Attend.Decode;

/// <summary>What decode attention computes.</summary>
public sealed record DecodeOptions
{
    /// <summary>Multiplier of q·k; null means 1/√D.</summary>
    public float? Scale { get; init; }

    /// <summary>With several query tokens, token t (of nq) sees keys up to L − nq + t (bottom-right, as in prefill). Default true.</summary>
    public bool Causal { get; init; } = true;

    /// <summary>Which pages each step reads (Quest, StreamingLLM, …); null reads them all.</summary>
    public IKvSelectionPolicy? Policy { get; init; }
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
        var selected = new IReadOnlyList<int>[cache.KvHeads];
        var scaled = new float[rows * d];
        for (int hk = 0; hk < cache.KvHeads; hk++)
        {
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < d; c++) scaled[r * d + c] = q[r / group, hk * group + r % group, c] * scale;
            selected[hk] = (options.Policy ?? DensePolicy.Instance).SelectPages(cache, sequence, layer, hk, scaled, rows);
            if (selected[hk].Any(p => p < 0 || p >= pages.Count)) throw new InvalidOperationException($"the policy selected a page outside 0..{pages.Count - 1}");
        }
        long pagesRead = selected.Sum(x => (long)x.Count);
        // Split the selected pages so every thread has work even for one sequence and a few heads.
        int threads = tuning.EffectiveThreads;
        int splits = Math.Clamp(threads * 4 / cache.KvHeads, 1, Math.Max(1, selected.Min(x => x.Count)));
        var partO = new float[splits * cache.KvHeads * rows * dv];
        var partM = new float[splits * cache.KvHeads * rows];
        var partL = new float[splits * cache.KvHeads * rows];
        TensorView<float> qv = q;
        Cpu.WorkQueue.Run(splits * cache.KvHeads, threads, () => (K: new float[d], V: new float[dv], Q: new float[rows * d]), (item, w) =>
        {
            int split = item / cache.KvHeads, hk = item % cache.KvHeads;
            IReadOnlyList<int> mine = selected[hk];
            int i0 = (int)((long)split * mine.Count / splits), i1 = (int)((long)(split + 1) * mine.Count / splits);
            for (int r = 0; r < rows; r++)
            {
                int t = r / group, h = hk * group + r % group;
                for (int c = 0; c < d; c++) w.Q[r * d + c] = qv[t, h, c] * scale;
            }
            int baseIndex = item * rows;
            Span<float> m = partM.AsSpan(baseIndex, rows), l = partL.AsSpan(baseIndex, rows);
            Span<float> o = partO.AsSpan(baseIndex * dv, rows * dv);
            m.Fill(float.NegativeInfinity);
            for (int i = i0; i < i1; i++)
            {
                KvCache.Page page = pages[mine[i]];
                int position = mine[i] * cache.PageSize;
                for (int slot = 0; slot < page.Count; slot++, position++)
                {
                    page.ReadKey(hk, slot, w.K);
                    bool valueRead = false;
                    for (int r = 0; r < rows; r++)
                    {
                        int t = r / group;
                        if (options.Causal && position > length - nq + t) continue;
                        float s = Linear.Vectors.Dot(w.Q.AsSpan(r * d, d), w.K);
                        if (!valueRead)
                        {
                            page.ReadValue(hk, slot, w.V);
                            valueRead = true;
                        }
                        Span<float> or = o.Slice(r * dv, dv);
                        if (s > m[r])
                        {
                            float alpha = float.IsNegativeInfinity(m[r]) ? 0f : MathF.Exp(m[r] - s);
                            for (int c = 0; c < dv; c++) or[c] = or[c] * alpha + w.V[c];
                            l[r] = l[r] * alpha + 1f;
                            m[r] = s;
                        }
                        else
                        {
                            float e = MathF.Exp(s - m[r]);
                            Linear.Vectors.Axpy(e, w.V, or);
                            l[r] += e;
                        }
                    }
                }
            }
        });

        // Merge the splits exactly in log-sum-exp space.
        var acc = new float[dv];
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
                        float wgt = MathF.Exp(partM[idx] - max);
                        total += partL[idx] * wgt;
                        Linear.Vectors.Axpy(wgt, partO.AsSpan(idx * dv, dv), acc);
                    }
                }
                int t = r / group, h = hk * group + r % group;
                float inv = total == 0 ? 0 : 1 / total;
                for (int c = 0; c < dv; c++) output[t, h, c] = acc[c] * inv;
                if (!lse.IsDefault) lse[t, h] = total == 0 ? float.NegativeInfinity : max + MathF.Log(total);
            }
        return pagesRead;
    }
}
