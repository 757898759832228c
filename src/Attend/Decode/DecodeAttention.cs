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

    /// <summary>
    /// With a file-tier cache (<see cref="KvOffload"/>), whether the step hands its reads to the tier's background threads:
    /// the selected pages not in memory are loaded ahead of the workers (which take over any a thread has not started),
    /// and a policy that ranks pages (<see cref="IPrefetchingPolicy"/>: Quest, Landmark) names its next-best pages, loaded
    /// for the next step while the caller does other work. Default true; without a file tier it changes nothing.
    /// </summary>
    public bool Prefetch { get; init; } = true;

    /// <summary>How many next-best pages a ranking policy names for the next step, as a share of the pages it selects
    /// by score (rounded up). Default 0.25.</summary>
    public double PrefetchShare { get; init; } = 0.25;

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

        using KvCache.ReadScope reading = cache.BeginRead();
        int rows = nq * group;                                  // query rows per kv head
        // Pages each kv head reads: the policy's choice from the scaled query rows of its group. A token policy's
        // tokens are read page by page: the page's keys are scored whole (by channel, a token's key is spread over
        // 128 cache lines: scoring the page streams them, gathering one token touches them all) and only the chosen
        // slots keep their scores and have their values gathered.
        var selected = new IReadOnlyList<int>[cache.KvHeads];
        var tokenLists = options.Policy is ITokenSelectionPolicy ? new int[cache.KvHeads][] : null;
        var tokenStarts = tokenLists is null ? null : new int[cache.KvHeads][];   // per selected page: its first token
        var scaledQueries = new float[cache.KvHeads][];    // [rows × D] per kv head, gathered once for the policy and the splits
        int ps = cache.PageSize;
        bool prefetch = options.Prefetch && cache.HasFileTier;
        if (prefetch && !(options.PrefetchShare >= 0)) throw new ArgumentException($"PrefetchShare must be ≥ 0; got {options.PrefetchShare}", nameof(options));
        for (int hk = 0; hk < cache.KvHeads; hk++)
        {
            var scaled = scaledQueries[hk] = new float[rows * d];
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < d; c++) scaled[r * d + c] = q[r / group, hk * group + r % group, c] * scale;
        }
        // The policy chooses per kv head: tokens (a token policy), or pages — with prefetching, a ranking policy also
        // names its next-best pages. The built-in policies that keep no state across heads (page scoring: stateless;
        // token policies: state per kv head) choose for the kv heads in parallel, one head per worker: Quest's
        // selection at 131072 tokens took 1.5–4.9 ms as eight parallel regions, TokenSelect scored every head's keys on
        // one thread (session 10).
        var nextOfHead = prefetch ? new List<int>[cache.KvHeads] : null;
        var tokensOfHead = new IReadOnlyList<int>[cache.KvHeads];
        void Choose(int hk)
        {
            float[] scaled = scaledQueries[hk];
            List<int>? next = nextOfHead is null || tokenLists is not null ? null : nextOfHead[hk] = [];
            switch (options.Policy)
            {
                case ITokenSelectionPolicy tokens:
                    tokensOfHead[hk] = tokens.SelectTokens(cache, sequence, layer, hk, scaled, rows);
                    break;
                case PageScoringPolicy scoring:
                    selected[hk] = scoring.Select(cache, sequence, layer, hk, scaled, rows, options.PrefetchShare, next, parallel: false);
                    break;
                case IPrefetchingPolicy ranking when next is not null:
                    selected[hk] = ranking.SelectPages(cache, sequence, layer, hk, scaled, rows, options.PrefetchShare, next);
                    break;
                default:
                    selected[hk] = (options.Policy ?? DensePolicy.Instance).SelectPages(cache, sequence, layer, hk, scaled, rows);
                    break;
            }
        }
        if (options.Policy is PageScoringPolicy or TokenSelectionPolicy) Cpu.WorkQueue.Run(cache.KvHeads, tuning.EffectiveThreads, () => 0, (hk, _) => Choose(hk));
        else
            for (int hk = 0; hk < cache.KvHeads; hk++) Choose(hk);
        for (int hk = 0; hk < cache.KvHeads; hk++)
        {
            if (tokenLists is not null)
            {
                int[] tokens = [.. tokensOfHead[hk]];
                if (tokens.Length == 0 || tokens.Any(t => t < 0 || t >= length)) throw new InvalidOperationException($"the policy selected no token or one outside 0..{length - 1}");
                Array.Sort(tokens);
                tokens = [.. tokens.Distinct()];
                tokenLists[hk] = tokens;
                var pageList = new List<int>();
                var starts = new List<int>();
                for (int i = 0; i < tokens.Length; i++)
                    if (i == 0 || tokens[i] / ps != tokens[i - 1] / ps)
                    {
                        pageList.Add(tokens[i] / ps);
                        starts.Add(i);
                    }
                starts.Add(tokens.Length);
                selected[hk] = pageList;
                tokenStarts![hk] = [.. starts];
                options.OnPagesSelected?.Invoke(hk, pageList);
                continue;
            }
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
        long pagesRead = selected.Sum(x => (long)x.Count);
        // The reads of the step — (page, kv head) pairs — in page order, split into contiguous runs. Walking a page's
        // kv heads one after another reads its keys (and values) as one stream: on the 2-core EPYC, reading every
        // page of one head before the next head's (16 KB pieces 128 KB apart) streamed 12 GB/s, page order 28 GB/s
        // (docs/perf/decode.md). Ordered by counting pages (linear): the comparison sort it replaces took
        // 3.6–8.7 ms for the 16384 reads of a dense step in a stand-alone loop (not isolated inside the step).
        var firstRead = new int[pages.Count + 1];
        foreach (IReadOnlyList<int> list in selected)
            foreach (int page in list) firstRead[page + 1]++;
        for (int page = 0; page < pages.Count; page++) firstRead[page + 1] += firstRead[page];
        var reads = new (int Page, int Head, int Index)[firstRead[^1]];
        int[] fill = (int[])firstRead.Clone();
        for (int hk = 0; hk < cache.KvHeads; hk++)
            for (int i = 0; i < selected[hk].Count; i++) reads[fill[selected[hk][i]]++] = (selected[hk][i], hk, i);
        if (prefetch)
        {
            // The step's own pages in the order the workers will reach them, then the next step's likely ones.
            int[] likelyNext = [.. nextOfHead!.Where(x => x is not null).SelectMany(x => x).Distinct()];
            if (likelyNext.Any(p => p < 0 || p >= pages.Count)) throw new InvalidOperationException($"the policy named a next page outside 0..{pages.Count - 1}");
            var own = new List<KvCache.Page>();
            for (int page = 0; page < pages.Count; page++)
                if (firstRead[page + 1] > firstRead[page] && !pages[page].IsResident) own.Add(pages[page]);
            cache.PrefetchPages(own.Concat(likelyNext.Select(p => pages[p])));
        }
        int threads = tuning.EffectiveThreads;
        int splits = Math.Clamp(threads * 4, 1, Math.Max(1, reads.Length));
        var partO = new float[splits * cache.KvHeads * rows * dv];
        var partM = new float[splits * cache.KvHeads * rows];
        var partL = new float[splits * cache.KvHeads * rows];
        Array.Fill(partM, float.NegativeInfinity);
        // Queries scaled by scale·log2(e): the softmax below runs on exp2 (m is kept in log2 units).
        const float log2e = 1.4426950408889634f;
        float[][] log2Queries = [.. scaledQueries.Select(x => x.Select(v => v * log2e).ToArray())];
        bool wide = PageKernels.WideSupported(cache, tuning);
        Cpu.WorkQueue.Run(splits, threads, () => new PageKernels.Scratch(ps, d, dv, rows), (split, w) =>
        {
            int r0 = (int)((long)split * reads.Length / splits), r1 = (int)((long)(split + 1) * reads.Length / splits);
            for (int ri = r0; ri < r1; ri++)
            {
                (int pageIndex, int hk, int i) = reads[ri];
                float[] q = log2Queries[hk];
                int baseIndex = (split * cache.KvHeads + hk) * rows;
                Span<float> m = partM.AsSpan(baseIndex, rows), l = partL.AsSpan(baseIndex, rows);
                Span<float> o = partO.AsSpan(baseIndex * dv, rows * dv);
                KvCache.Page page = pages[pageIndex];
                int first = pageIndex * ps, count = page.Count;
                int[]? gathered = tokenLists?[hk];
                // The next read, prefetched while this one is scored (2 reads ahead measured slower: docs/perf/decode.md).
                (int nextPage, int nextHead, _) = ri + 1 < r1 ? reads[ri + 1] : (-1, 0, 0);
                PageKernels.Scores(cache, page, hk, q, w, rows, wide, nextPage >= 0 ? pages[nextPage] : null, nextHead);
                int tokenStart = 0;
                if (gathered is not null)
                {
                    // Keep the chosen slots' scores, compacted to the front of each row (slots ascend: in place).
                    tokenStart = tokenStarts![hk][i];
                    count = tokenStarts[hk][i + 1] - tokenStart;
                    for (int r = 0; r < rows; r++)
                        for (int j = 0; j < count; j++) w.S[r * ps + j] = w.S[r * ps + (gathered[tokenStart + j] - first)];
                }
                // Causal rows drop keys past their position.
                if (options.Causal && nq > 1)
                {
                    for (int r = 0; r < rows; r++)
                        for (int j = 0; j < count; j++)
                            if ((gathered is null ? first + j : gathered[tokenStart + j]) > length - nq + r / group) w.S[r * ps + j] = float.NegativeInfinity;
                }
                for (int r = 0; r < rows; r++)
                {
                    Span<float> srow = w.S.AsSpan(r * ps, count);
                    float newMax = MathF.Max(m[r], PageKernels.Max(srow));
                    if (float.IsNegativeInfinity(newMax))
                    {
                        // Nothing visible yet: zero weights, nothing to rescale.
                        srow.Clear();
                        w.Alpha[r] = 1f;
                        continue;
                    }
                    float alpha = float.IsNegativeInfinity(m[r]) ? 0f : float.Exp2(m[r] - newMax);
                    float sum = PageKernels.Exp2Sum(srow, newMax);
                    if (pageLog2 is not null) pageLog2[hk][(i * rows) + r] = sum > 0 ? newMax + MathF.Log2(sum) : float.NegativeInfinity;
                    l[r] = l[r] * alpha + sum;
                    m[r] = newMax;
                    w.Alpha[r] = alpha;
                }
                if (gathered is null) PageKernels.Values(cache, page, hk, w, o, rows, wide);
                else if (PageKernels.GatherValues(cache, page, hk, gathered.AsSpan(tokenStart, count), w, wide)) PageKernels.GatheredValues(cache.Storage, w, o, rows, count, dv, ps);
                else PageKernels.WidenedValues(w, o, rows, count, dv, ps, wide);
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
            for (int hk = 0; hk < cache.KvHeads; hk++)
            {
                double norm = 0;
                for (int r = 0; r < rows; r++)
                {
                    double sq = 0;
                    for (int c = 0; c < dv; c++) sq += (double)output[r / group, (hk * group) + (r % group), c] * output[r / group, (hk * group) + (r % group), c];
                    norm += Math.Sqrt(sq) / rows;
                }
                feedback.ObserveOutput(cache, sequence, layer, hk, (float)norm);
            }
        }
        return pagesRead;
    }
}
