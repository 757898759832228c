namespace Attend.Decode;

/// <summary>
/// Chooses which pages of a cached sequence one decode step reads, per kv head. Pages are indices into the
/// sequence's page list (page p holds tokens [p·PageSize, (p+1)·PageSize)); return them ascending.
/// </summary>
public interface IKvSelectionPolicy
{
    /// <summary>
    /// Pages to read for kv head <paramref name="kvHead"/>, given the scaled query rows [rows × D] of the query heads
    /// that share it.
    /// </summary>
    IReadOnlyList<int> SelectPages(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows);
}

/// <summary>Every page: exact attention.</summary>
public sealed class DensePolicy : IKvSelectionPolicy
{
    /// <summary>The shared instance.</summary>
    public static DensePolicy Instance { get; } = new();

    /// <inheritdoc/>
    public IReadOnlyList<int> SelectPages(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows)
    {
        ArgumentNullException.ThrowIfNull(cache);
        return Enumerable.Range(0, cache.Pages(sequence, layer).Count).ToArray();
    }
}

/// <summary>
/// StreamingLLM (Xiao et al., arXiv:2309.17453): the pages holding the first <c>sinkTokens</c> (attention sinks) and
/// the last <c>windowTokens</c> tokens.
/// </summary>
public sealed class StreamingPolicy : IKvSelectionPolicy
{
    private readonly int _sink, _window;

    /// <summary>Sink and recent-window sizes in tokens.</summary>
    public StreamingPolicy(int sinkTokens, int windowTokens)
    {
        if (sinkTokens < 0) throw new ArgumentOutOfRangeException(nameof(sinkTokens), sinkTokens, "sink tokens must be ≥ 0");
        if (windowTokens < 1) throw new ArgumentOutOfRangeException(nameof(windowTokens), windowTokens, "window tokens must be ≥ 1");
        _sink = sinkTokens;
        _window = windowTokens;
    }

    /// <inheritdoc/>
    public IReadOnlyList<int> SelectPages(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows)
    {
        ArgumentNullException.ThrowIfNull(cache);
        int length = cache.Length(sequence, layer), ps = cache.PageSize, pages = (length + ps - 1) / ps;
        var set = new SortedSet<int>();
        for (int p = 0; p < Math.Min(pages, (_sink + ps - 1) / ps); p++) set.Add(p);
        for (int p = Math.Max(0, (length - _window) / ps); p < pages; p++) set.Add(p);
        return [.. set];
    }
}

/// <summary>
/// Quest (Tang et al., arXiv:2406.10774): an upper bound of q·k per page from its channel-wise key min/max,
/// Σ_c max(q_c·min_c, q_c·max_c); the best-scoring pages within <c>tokenBudget</c> tokens are read, the last page always.
/// With grouped heads a page scores the maximum bound over the group's query rows. Optionally the pages holding the
/// first <c>sinkTokens</c> and the last <c>recentTokens</c> tokens are always read (inside the budget), as
/// StreamingLLM-style systems combine with Quest: byte- and subword-level models lean on the immediate context,
/// which a page bound can rank below distant pages when the current page has just begun.
/// </summary>
public sealed class QuestPolicy : IKvSelectionPolicy
{
    private readonly int _budget, _sink, _recent;
    private readonly bool _perQueryHead;

    /// <summary>
    /// Tokens to read per step and kv head (rounded down to whole pages, at least one). With
    /// <paramref name="perQueryHead"/>, each query head of a GQA group picks its own best pages (Quest is defined per
    /// head) from an equal share of the budget and the group reads their union; otherwise a page scores the maximum
    /// bound over the group.
    /// </summary>
    public QuestPolicy(int tokenBudget, int sinkTokens = 0, int recentTokens = 0, bool perQueryHead = false)
    {
        if (tokenBudget < 1) throw new ArgumentOutOfRangeException(nameof(tokenBudget), tokenBudget, "token budget must be ≥ 1");
        if (sinkTokens < 0 || recentTokens < 0) throw new ArgumentOutOfRangeException(nameof(sinkTokens), "sink and recent tokens must be ≥ 0");
        _budget = tokenBudget;
        _sink = sinkTokens;
        _recent = recentTokens;
        _perQueryHead = perQueryHead;
    }

    /// <summary>Σ_c max(q_c·min_c, q_c·max_c): the largest q·k any key inside the per-channel box can give.</summary>
    private static float UpperBound(ReadOnlySpan<float> q, ReadOnlySpan<float> min, ReadOnlySpan<float> max)
    {
        int c = 0;
        float sum = 0;
        if (System.Runtime.Intrinsics.Vector256.IsHardwareAccelerated)
        {
            var acc = System.Runtime.Intrinsics.Vector256<float>.Zero;
            for (; c <= q.Length - 8; c += 8)
            {
                var qv = System.Runtime.Intrinsics.Vector256.Create(q.Slice(c, 8));
                acc += System.Runtime.Intrinsics.Vector256.Max(qv * System.Runtime.Intrinsics.Vector256.Create(min.Slice(c, 8)), qv * System.Runtime.Intrinsics.Vector256.Create(max.Slice(c, 8)));
            }
            sum = System.Runtime.Intrinsics.Vector256.Sum(acc);
        }
        for (; c < q.Length; c++) sum += MathF.Max(q[c] * min[c], q[c] * max[c]);
        return sum;
    }

    /// <inheritdoc/>
    public IReadOnlyList<int> SelectPages(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows)
    {
        ArgumentNullException.ThrowIfNull(cache);
        List<KvCache.Page> pages = cache.Pages(sequence, layer);
        int keep = Math.Max(1, _budget / cache.PageSize);
        if (keep >= pages.Count) return Enumerable.Range(0, pages.Count).ToArray();
        int d = cache.HeadDim;
        // Forced pages: the last one always; those holding the first _sink and the last _recent tokens.
        var forced = new SortedSet<int> { pages.Count - 1 };
        for (int p = 0, start = 0; p < pages.Count && start < _sink; start += pages[p].Count, p++) forced.Add(p);
        for (int p = pages.Count - 1, covered = 0; p >= 0 && covered < _recent; covered += pages[p].Count, p--) forced.Add(p);
        int free = Math.Max(0, keep - forced.Count);
        var candidates = new List<int>(pages.Count);
        for (int p = 0; p < pages.Count; p++)
        {
            if (!forced.Contains(p)) candidates.Add(p);
        }
        if (_perQueryHead && rows > 1)
        {
            // Each query head ranks the pages by its own bound; heads take turns adding their next best page.
            var orders = new int[rows][];
            for (int r = 0; r < rows; r++)
            {
                float[] bounds = new float[candidates.Count];
                int[] order = [.. candidates];
                for (int i = 0; i < order.Length; i++)
                {
                    int p = order[i];
                    bounds[i] = -UpperBound(queries.Slice(r * d, d), pages[p].Min.AsSpan(kvHead * d, d), pages[p].Max.AsSpan(kvHead * d, d));
                }
                Array.Sort(bounds, order);
                orders[r] = order;
            }
            var chosen = new HashSet<int>(forced);
            for (int rank = 0; chosen.Count - forced.Count < free && rank < candidates.Count; rank++)
            {
                for (int r = 0; r < rows && chosen.Count - forced.Count < free; r++) chosen.Add(orders[r][rank]);
            }
            return [.. chosen.Order()];
        }
        var keys = new float[candidates.Count];
        int[] best = [.. candidates];
        for (int i = 0; i < best.Length; i++)
        {
            float top = float.NegativeInfinity;
            ReadOnlySpan<float> min = pages[best[i]].Min.AsSpan(kvHead * d, d), max = pages[best[i]].Max.AsSpan(kvHead * d, d);
            for (int r = 0; r < rows; r++) top = MathF.Max(top, UpperBound(queries.Slice(r * d, d), min, max));
            keys[i] = -top;                      // ascending sort of −bound = best pages first
        }
        Array.Sort(keys, best);
        return [.. best.Take(free).Concat(forced).Order()];
    }
}
