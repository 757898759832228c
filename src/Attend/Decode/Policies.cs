using System.Runtime.Intrinsics;

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

/// <summary>
/// A page policy that can also name the pages it would read next: the best-ranked pages just outside its budget. With a
/// file-tier cache a decode step loads them in the background (<see cref="DecodeOptions.Prefetch"/>), since a policy's
/// choice moves little from one token to the next and what enters next comes mostly from just below the cut.
/// </summary>
public interface IPrefetchingPolicy : IKvSelectionPolicy
{
    /// <summary>
    /// As <see cref="IKvSelectionPolicy.SelectPages"/> (the same pages), and adds to <paramref name="likelyNext"/> the
    /// next-best pages it did not select, best first: <paramref name="nextShare"/> × the pages it selected by score, rounded up
    /// (none when <paramref name="likelyNext"/> is null).
    /// </summary>
    IReadOnlyList<int> SelectPages(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows, double nextShare, List<int>? likelyNext);
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
/// The shared shape of page-scoring policies (Quest, Landmark): every page gets a score from the group's query rows;
/// the best pages within <c>tokenBudget</c> tokens are read, the last page always, and optionally the pages holding
/// the first <c>sinkTokens</c> and the last <c>recentTokens</c> tokens (inside the budget), as StreamingLLM-style
/// systems combine with page selection: byte- and subword-level models lean on the immediate context, which a page
/// score can rank below distant pages when the current page has just begun.
/// </summary>
public abstract class PageScoringPolicy : IPrefetchingPolicy
{
    private readonly int _budget, _sink, _recent;
    private readonly bool _perQueryHead;

    /// <summary>
    /// Tokens to read per step and kv head (rounded down to whole pages, at least one). With
    /// <paramref name="perQueryHead"/>, each query head of a GQA group picks its own best pages from an equal share of
    /// the budget and the group reads their union; otherwise a page scores the maximum over the group.
    /// </summary>
    protected PageScoringPolicy(int tokenBudget, int sinkTokens, int recentTokens, bool perQueryHead)
    {
        if (tokenBudget < 1) throw new ArgumentOutOfRangeException(nameof(tokenBudget), tokenBudget, "token budget must be ≥ 1");
        if (sinkTokens < 0 || recentTokens < 0) throw new ArgumentOutOfRangeException(nameof(sinkTokens), "sink and recent tokens must be ≥ 0");
        _budget = tokenBudget;
        _sink = sinkTokens;
        _recent = recentTokens;
        _perQueryHead = perQueryHead;
    }

    /// <summary>The scores of <paramref name="page"/> for each of the scaled query rows (higher is read first).</summary>
    private protected abstract void ScoreRows(ReadOnlySpan<float> queries, int rows, KvCache.Page page, int kvHead, int d, Span<float> scores);

    /// <summary>
    /// Scores of pages [<paramref name="first"/>, <paramref name="first"/> + count) for every row: scores[r × count + i]
    /// (page first + i). A policy whose scores come from the contiguous summaries overrides this to skip the per-page calls.
    /// </summary>
    private protected virtual void ScorePages(ReadOnlySpan<float> queries, int rows, KvCache.PageList pages, int kvHead, int d, int first, Span<float> scores)
    {
        int count = scores.Length / rows;
        Span<float> rowScores = stackalloc float[rows];
        for (int i = 0; i < count; i++)
        {
            ScoreRows(queries, rows, pages[first + i], kvHead, d, rowScores);
            for (int r = 0; r < rows; r++) scores[(r * count) + i] = rowScores[r];
        }
    }

    /// <inheritdoc/>
    public IReadOnlyList<int> SelectPages(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows) =>
        Select(cache, sequence, layer, kvHead, queries, rows, 0, null, parallel: true);

    /// <inheritdoc/>
    public IReadOnlyList<int> SelectPages(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows, double nextShare, List<int>? likelyNext) =>
        Select(cache, sequence, layer, kvHead, queries, rows, nextShare, likelyNext, parallel: true);

    /// <summary>
    /// The selection; <paramref name="parallel"/> false scores on the calling thread (a decode step selects for its kv
    /// heads in parallel instead: the policy is stateless).
    /// </summary>
    internal IReadOnlyList<int> Select(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows, double nextShare, List<int>? likelyNext, bool parallel)
    {
        ArgumentNullException.ThrowIfNull(cache);
        if (!(nextShare >= 0)) throw new ArgumentOutOfRangeException(nameof(nextShare), nextShare, "the share of next-best pages must be ≥ 0");
        KvCache.PageList pages = cache.Pages(sequence, layer);
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
        // Every page scored for all rows at once ([rows × pages]), then the candidates' columns gathered
        // ([rows × candidates]). At 131072 tokens this is 2048 pages per head, and the step waits for it: directly
        // called, in a few parallel chunks; from a decode step, one kv head per worker.
        int n = candidates.Count, all = pages.Count;
        var pageScores = new float[rows * all];
        float[] query = queries[..(rows * d)].ToArray();
        int chunks = parallel ? Math.Clamp(all / 256, 1, Environment.ProcessorCount) : 1;
        var chunkScores = new float[chunks][];
        Cpu.WorkQueue.Run(chunks, chunks, () => 0, (chunk, _) =>
        {
            int p0 = chunk * all / chunks, p1 = (chunk + 1) * all / chunks;
            var part = chunkScores[chunk] = new float[rows * (p1 - p0)];
            ScorePages(query, rows, pages, kvHead, d, p0, part);
        });
        for (int chunk = 0, p0 = 0; chunk < chunks; chunk++)
        {
            int count = chunkScores[chunk].Length / rows;
            for (int r = 0; r < rows; r++) chunkScores[chunk].AsSpan(r * count, count).CopyTo(pageScores.AsSpan((r * all) + p0, count));
            p0 += count;
        }
        var scores = new float[rows * n];
        for (int r = 0; r < rows; r++)
            for (int i = 0; i < n; i++) scores[(r * n) + i] = pageScores[(r * all) + candidates[i]];
        var scratch = new int[candidates.Count];
        if (_perQueryHead && rows > 1)
        {
            // Each query head ranks the pages by its own score; heads take turns adding their next best page.
            var orders = new int[rows][];
            for (int r = 0; r < rows; r++)
            {
                float[] negated = [.. scores.AsSpan(r * candidates.Count, candidates.Count)];
                int[] order = [.. candidates];
                for (int i = 0; i < negated.Length; i++) negated[i] = -negated[i];
                Array.Sort(negated, order);
                orders[r] = order;
            }
            var chosen = new HashSet<int>(forced);
            for (int rank = 0; chosen.Count - forced.Count < free && rank < candidates.Count; rank++)
            {
                for (int r = 0; r < rows && chosen.Count - forced.Count < free; r++) chosen.Add(orders[r][rank]);
            }
            if (likelyNext is not null)
            {
                // The next best: the same turns, continued past the chosen pages.
                int next = (int)Math.Ceiling(free * nextShare), added = 0;
                var seen = new HashSet<int>(chosen);
                for (int rank = 0; added < next && rank < candidates.Count; rank++)
                    for (int r = 0; r < rows && added < next; r++)
                        if (seen.Add(orders[r][rank]))
                        {
                            likelyNext.Add(orders[r][rank]);
                            added++;
                        }
            }
            return [.. chosen.Order()];
        }
        // A page scores the best of the group's rows; the free best pages by quickselect (no full sort).
        for (int r = 1; r < rows; r++)
            for (int i = 0; i < candidates.Count; i++) scores[i] = MathF.Max(scores[i], scores[(r * candidates.Count) + i]);
        Span<float> best = scores.AsSpan(0, candidates.Count);
        int[] top = Sparse.RowTopKSelector.TopIndices(best, free, scratch);
        int extra = Math.Min((int)Math.Ceiling(free * nextShare), candidates.Count - top.Length);
        if (likelyNext is not null && extra > 0)
        {
            // The next best: the rest's top, best first.
            foreach (int i in top) best[i] = float.NegativeInfinity;
            int[] runnersUp = Sparse.RowTopKSelector.TopIndices(best, extra, scratch);
            var keys = new float[runnersUp.Length];
            for (int i = 0; i < keys.Length; i++) keys[i] = -best[runnersUp[i]];
            Array.Sort(keys, runnersUp);
            likelyNext.AddRange(runnersUp.Select(i => candidates[i]));
        }
        return [.. top.Select(i => candidates[i]).Concat(forced).Order()];
    }
}

/// <summary>
/// Quest (Tang et al., arXiv:2406.10774): an upper bound of q·k per page from its channel-wise key min/max,
/// Σ_c max(q_c·min_c, q_c·max_c); the best-scoring pages within <c>tokenBudget</c> tokens are read (see
/// <see cref="PageScoringPolicy"/> for the forced sink/recent pages and GQA).
/// </summary>
public sealed class QuestPolicy(int tokenBudget, int sinkTokens = 0, int recentTokens = 0, bool perQueryHead = false)
    : PageScoringPolicy(tokenBudget, sinkTokens, recentTokens, perQueryHead)
{
    /// <summary>Σ_c max(q_c·min_c, q_c·max_c): the largest q·k any key inside the per-channel box can give.</summary>
    private protected override void ScoreRows(ReadOnlySpan<float> queries, int rows, KvCache.Page page, int kvHead, int d, Span<float> scores) =>
        UpperBounds(queries, rows, page.MinOf(kvHead), page.MaxOf(kvHead), scores);

    /// <summary>
    /// Every page's bound straight from the contiguous [page, D] min/max summaries (the same arithmetic per page as
    /// <see cref="UpperBounds"/>, without a virtual call and two spans per page).
    /// </summary>
    private protected override unsafe void ScorePages(ReadOnlySpan<float> queries, int rows, KvCache.PageList pages, int kvHead, int d, int first, Span<float> scores)
    {
        int count = scores.Length / rows;
        Span<float> rowScores = stackalloc float[rows];
        fixed (float* qp = queries, lo = pages.Summaries.Min(kvHead), hi = pages.Summaries.Max(kvHead), b = rowScores)
        {
            for (int i = 0; i < count; i++)
            {
                long at = (long)(first + i) * d;
                if (Vector512.IsHardwareAccelerated) UpperBounds<Vector512<float>, Cpu.V512Ops>(qp, rows, lo + at, hi + at, b, d);
                else if (Vector256.IsHardwareAccelerated) UpperBounds<Vector256<float>, Cpu.V256Ops>(qp, rows, lo + at, hi + at, b, d);
                else UpperBounds<float, Cpu.ScalarOps>(qp, rows, lo + at, hi + at, b, d);
                for (int r = 0; r < rows; r++) scores[(r * count) + i] = b[r];
            }
        }
    }

    /// <summary>The bound for every row, the box's min/max loaded once per vector of channels for 4 rows.</summary>
    internal static unsafe void UpperBounds(ReadOnlySpan<float> q, int rows, ReadOnlySpan<float> min, ReadOnlySpan<float> max, Span<float> bounds)
    {
        fixed (float* qp = q, lo = min, hi = max, b = bounds)
        {
            if (Vector512.IsHardwareAccelerated) UpperBounds<Vector512<float>, Cpu.V512Ops>(qp, rows, lo, hi, b, min.Length);
            else if (Vector256.IsHardwareAccelerated) UpperBounds<Vector256<float>, Cpu.V256Ops>(qp, rows, lo, hi, b, min.Length);
            else UpperBounds<float, Cpu.ScalarOps>(qp, rows, lo, hi, b, min.Length);
        }
    }

    private static unsafe void UpperBounds<TV, TOps>(float* q, int rows, float* lo, float* hi, float* bounds, int d) where TV : unmanaged where TOps : Cpu.ISimd<TV>
    {
        int vectorEnd = d - (d % TOps.Count);
        for (int r0 = 0; r0 < rows; r0 += 4)
        {
            int n = Math.Min(4, rows - r0);
            float* q0 = q + (r0 * d), q1 = q0 + (n > 1 ? d : 0), q2 = q0 + (n > 2 ? 2 * d : 0), q3 = q0 + (n > 3 ? 3 * d : 0);
            TV a0 = TOps.Zero, a1 = TOps.Zero, a2 = TOps.Zero, a3 = TOps.Zero;
            for (int c = 0; c < vectorEnd; c += TOps.Count)
            {
                TV l = TOps.Load(lo + c), h = TOps.Load(hi + c), x = TOps.Load(q0 + c);
                a0 = TOps.Add(a0, TOps.Max(TOps.Mul(x, l), TOps.Mul(x, h)));
                x = TOps.Load(q1 + c);
                a1 = TOps.Add(a1, TOps.Max(TOps.Mul(x, l), TOps.Mul(x, h)));
                x = TOps.Load(q2 + c);
                a2 = TOps.Add(a2, TOps.Max(TOps.Mul(x, l), TOps.Mul(x, h)));
                x = TOps.Load(q3 + c);
                a3 = TOps.Add(a3, TOps.Max(TOps.Mul(x, l), TOps.Mul(x, h)));
            }
            float s0 = TOps.ReduceSum(a0), s1 = TOps.ReduceSum(a1), s2 = TOps.ReduceSum(a2), s3 = TOps.ReduceSum(a3);
            for (int c = vectorEnd; c < d; c++)
            {
                s0 += MathF.Max(q0[c] * lo[c], q0[c] * hi[c]);
                s1 += MathF.Max(q1[c] * lo[c], q1[c] * hi[c]);
                s2 += MathF.Max(q2[c] * lo[c], q2[c] * hi[c]);
                s3 += MathF.Max(q3[c] * lo[c], q3[c] * hi[c]);
            }
            bounds[r0] = s0;
            if (n > 1) bounds[r0 + 1] = s1;
            if (n > 2) bounds[r0 + 2] = s2;
            if (n > 3) bounds[r0 + 3] = s3;
        }
    }
}

/// <summary>
/// Landmark attention's retrieval (Mohtashami &amp; Jaggi, arXiv:2305.16300) without its trained landmark tokens: each
/// page's representative is the mean of its keys (kept on append), scored by q·mean; the best pages within
/// <c>tokenBudget</c> tokens are read (forced sink/recent pages and GQA as <see cref="PageScoringPolicy"/>). The paper
/// trains a landmark token per block to make this score sharp; with a pretrained model the mean key is the stand-in.
/// </summary>
public sealed class LandmarkPolicy(int tokenBudget, int sinkTokens = 0, int recentTokens = 0, bool perQueryHead = false)
    : PageScoringPolicy(tokenBudget, sinkTokens, recentTokens, perQueryHead)
{
    private protected override void ScoreRows(ReadOnlySpan<float> queries, int rows, KvCache.Page page, int kvHead, int d, Span<float> scores)
    {
        for (int r = 0; r < rows; r++) scores[r] = Linear.Vectors.Dot(queries.Slice(r * d, d), page.MeanOf(kvHead));
    }
}

/// <summary>
/// Page scores from Quest's and Landmark's metadata (min, max, mean per channel) estimating the page's log-sum-exp
/// rather than its largest possible score: log Σ_j exp(q·k_j) ≈ q·k̄ + ½ Σ_c q_c² σ²_c + ln n (second order in the
/// keys' spread), with σ_c = (max_c − min_c) / √12 (the spread of a uniform box). Quest's bound ranks a page by its most
/// extreme possible key; this ranks it by the mass it is expected to hold (spec <c>moment:1/8</c>).
/// </summary>
public sealed class MomentPolicy(int tokenBudget, int sinkTokens = 0, int recentTokens = 0)
    : PageScoringPolicy(tokenBudget, sinkTokens, recentTokens, false)
{
    private protected override void ScoreRows(ReadOnlySpan<float> queries, int rows, KvCache.Page page, int kvHead, int d, Span<float> scores)
    {
        ReadOnlySpan<float> mean = page.MeanOf(kvHead), min = page.MinOf(kvHead), max = page.MaxOf(kvHead);
        float logCount = MathF.Log(Math.Max(1, page.Count));
        for (int r = 0; r < rows; r++)
        {
            ReadOnlySpan<float> q = queries.Slice(r * d, d);
            float spread = 0;
            for (int c = 0; c < d; c++)
            {
                float range = max[c] - min[c];
                spread += q[c] * q[c] * range * range;
            }
            scores[r] = Linear.Vectors.Dot(q, mean) + (spread / 24f) + logCount;
        }
    }
}

/// <summary>Per (cache, sequence, layer, kv head) state of a stateful policy; a new cache starts fresh.</summary>
internal sealed class PolicyStates<T> where T : new()
{
    private readonly System.Runtime.CompilerServices.ConditionalWeakTable<KvCache, Dictionary<(int, int, int), T>> _states = new();

    public T For(KvCache cache, int sequence, int layer, int kvHead)
    {
        Dictionary<(int, int, int), T> map = _states.GetValue(cache, _ => []);
        lock (map)
        {
            if (!map.TryGetValue((sequence, layer, kvHead), out T? state)) map[(sequence, layer, kvHead)] = state = new T();
            return state;
        }
    }
}

/// <summary>
/// A policy that learns from what each step attended: after the step, <see cref="DecodeAttention"/> reports for every
/// kv head the pages it read and the share of the step's softmax mass on each (averaged over the group's query rows;
/// the shares of a head sum to 1).
/// </summary>
public interface IAttentionFeedback
{
    /// <summary>What one step attended for (sequence, layer, kv head).</summary>
    void Observe(KvCache cache, int sequence, int layer, int kvHead, IReadOnlyList<int> pages, ReadOnlySpan<float> mass);

    /// <summary>
    /// The step's output magnitude for (sequence, layer, kv head): the mean L2 norm of the group's output rows (0 for
    /// a head that read nothing). Called after <see cref="Observe"/>; the default ignores it.
    /// </summary>
    void ObserveOutput(KvCache cache, int sequence, int layer, int kvHead, float outputNorm)
    {
    }
}

/// <summary>
/// Heavy-hitter retention, H2O (Zhang et al., arXiv:2306.14048) and SpAtten's cascade token pruning (Wang et al.,
/// arXiv:2012.09852) at page granularity: each page accumulates the attention mass it received over the steps; a step
/// reads the pages holding the last <c>recentTokens</c> tokens plus the retained pages of highest accumulated mass
/// within <c>heavyTokens</c>; a page that falls out of both is evicted for good (as H2O drops tokens from the cache —
/// it is never read again). A page is read once before it can be judged (the first step after a prompt is dense, as
/// H2O scores the prompt during prefill); later pages enter through the recent window. Per (sequence, layer, kv head) state; not
/// thread-safe across concurrent steps of one sequence.
/// </summary>
public sealed class HeavyHitterPolicy : IKvSelectionPolicy, IAttentionFeedback
{
    private readonly int _heavy, _recent, _warmupSteps;
    private readonly double _prunedHeads;
    private readonly PolicyStates<State> _states = new();
    private readonly PolicyStates<HeadState> _heads = new();      // per (cache, sequence, layer): kept under kv head −1

    private sealed class State
    {
        public readonly List<float> Score = [];      // accumulated mass per page
        public readonly HashSet<int> Evicted = [];
        public readonly HashSet<int> Observed = [];   // pages read at least once: only they can be judged
    }

    private sealed class HeadState
    {
        public double[] Importance = [];             // accumulated output norm per kv head
        public int Steps;                            // steps observed (by kv head 0)
        public bool[]? Pruned;                       // decided once, after the warm-up
    }

    /// <summary>Heavy-hitter and recent budgets in tokens (each rounded up to whole pages; recent ≥ 1).</summary>
    public HeavyHitterPolicy(int heavyTokens, int recentTokens) : this(heavyTokens, recentTokens, 0, 16)
    {
    }

    /// <summary>
    /// With SpAtten's cascade head pruning (Wang et al., arXiv:2012.09852, §3.2): each kv head's importance is the
    /// accumulated magnitude of its attention output; after <paramref name="headWarmupSteps"/> steps the
    /// <paramref name="prunedHeadFraction"/> least important kv heads of each layer are pruned for good (cascade: a
    /// pruned head reads nothing in every later step, so its output is 0). The paper prunes query heads across layers
    /// as the sentence goes through the model; here a kv head (its whole GQA group) within a layer as decoding goes on.
    /// </summary>
    public HeavyHitterPolicy(int heavyTokens, int recentTokens, double prunedHeadFraction, int headWarmupSteps = 16)
    {
        if (heavyTokens < 0) throw new ArgumentOutOfRangeException(nameof(heavyTokens), heavyTokens, "heavy-hitter tokens must be ≥ 0");
        if (recentTokens < 1) throw new ArgumentOutOfRangeException(nameof(recentTokens), recentTokens, "recent tokens must be ≥ 1");
        if (!(prunedHeadFraction >= 0 && prunedHeadFraction < 1)) throw new ArgumentOutOfRangeException(nameof(prunedHeadFraction), prunedHeadFraction, "the pruned head fraction must be in [0, 1)");
        if (headWarmupSteps < 1) throw new ArgumentOutOfRangeException(nameof(headWarmupSteps), headWarmupSteps, "head warm-up steps must be ≥ 1");
        _heavy = heavyTokens;
        _recent = recentTokens;
        _prunedHeads = prunedHeadFraction;
        _warmupSteps = headWarmupSteps;
    }

    /// <summary>Whether cascade head pruning has removed <paramref name="kvHead"/> of (sequence, layer).</summary>
    public bool IsPruned(KvCache cache, int sequence, int layer, int kvHead)
    {
        CheckHead(cache, sequence, layer, kvHead);
        return _heads.For(cache, sequence, layer, -1).Pruned?[kvHead] == true;
    }

    private static void CheckHead(KvCache cache, int sequence, int layer, int kvHead)
    {
        ArgumentNullException.ThrowIfNull(cache);
        cache.Pages(sequence, layer);                        // names a bad sequence or layer
        if ((uint)kvHead >= (uint)cache.KvHeads) throw new ArgumentOutOfRangeException(nameof(kvHead), kvHead, $"kv head must be in 0..{cache.KvHeads - 1}");
    }

    /// <inheritdoc/>
    public IReadOnlyList<int> SelectPages(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows) =>
        SelectPages(cache, sequence, layer, kvHead, queries, rows, 0, null);

    /// <inheritdoc/>
    public IReadOnlyList<int> SelectPages(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows, double nextShare, List<int>? likelyNext)
    {
        ArgumentNullException.ThrowIfNull(cache);
        if (!(nextShare >= 0)) throw new ArgumentOutOfRangeException(nameof(nextShare), nextShare, "the share of next-best pages must be ≥ 0");
        List<KvCache.Page> pages = cache.Pages(sequence, layer);
        if (IsPruned(cache, sequence, layer, kvHead)) return [];
        State state = _states.For(cache, sequence, layer, kvHead);
        while (state.Score.Count < pages.Count) state.Score.Add(0f);
        int ps = cache.PageSize, recentPages = (_recent + ps - 1) / ps, heavyPages = (_heavy + ps - 1) / ps;
        int firstRecent = Math.Max(0, pages.Count - recentPages);
        // Pages never read have no score yet (H2O scores the prompt's tokens during prefill): read them once first.
        var unseen = Enumerable.Range(0, firstRecent).Where(p => !state.Evicted.Contains(p) && !state.Observed.Contains(p)).ToList();
        var heavy = Enumerable.Range(0, firstRecent).Where(p => !state.Evicted.Contains(p) && state.Observed.Contains(p))
            .OrderByDescending(p => state.Score[p]).ThenBy(p => p).Take(heavyPages).ToHashSet();
        // Judged pages outside the window that did not make the heavy set leave for good.
        for (int p = 0; p < firstRecent; p++)
        {
            if (state.Observed.Contains(p) && !heavy.Contains(p)) state.Evicted.Add(p);
        }
        return [.. heavy.Concat(unseen).Concat(Enumerable.Range(firstRecent, pages.Count - firstRecent)).Order()];
    }

    /// <inheritdoc/>
    public void Observe(KvCache cache, int sequence, int layer, int kvHead, IReadOnlyList<int> pages, ReadOnlySpan<float> mass)
    {
        ArgumentNullException.ThrowIfNull(pages);
        State state = _states.For(cache, sequence, layer, kvHead);
        for (int i = 0; i < pages.Count; i++)
        {
            while (state.Score.Count <= pages[i]) state.Score.Add(0f);
            state.Score[pages[i]] += mass[i];
            state.Observed.Add(pages[i]);
        }
    }

    /// <inheritdoc/>
    public void ObserveOutput(KvCache cache, int sequence, int layer, int kvHead, float outputNorm)
    {
        CheckHead(cache, sequence, layer, kvHead);
        if (_prunedHeads == 0) return;
        HeadState heads = _heads.For(cache, sequence, layer, -1);
        if (heads.Pruned is not null) return;
        if (heads.Importance.Length != cache.KvHeads) heads.Importance = new double[cache.KvHeads];
        heads.Importance[kvHead] += outputNorm;
        if (kvHead == 0) heads.Steps++;
        if (kvHead == cache.KvHeads - 1 && heads.Steps >= _warmupSteps)
        {
            // The least important heads leave for good (ties: the lower head first).
            int prune = (int)(_prunedHeads * cache.KvHeads);
            heads.Pruned = new bool[cache.KvHeads];
            foreach (int h in Enumerable.Range(0, cache.KvHeads).OrderBy(h => heads.Importance[h]).ThenBy(h => h).Take(prune)) heads.Pruned[h] = true;
        }
    }
}

/// <summary>
/// Recycled Attention (Xu et al., arXiv:2411.05787) at page granularity: every <c>period</c> steps a full step reads the
/// whole cache and records each page's attention mass; the steps in between read the pages of highest recorded mass
/// within <c>tokenBudget</c> tokens plus every page written since the full step (the paper recycles the top-K tokens of
/// the last full step; pages are this cache's unit of reading).
/// </summary>
public sealed class RecycledPolicy : IKvSelectionPolicy, IAttentionFeedback
{
    private readonly int _period, _budget;
    private readonly PolicyStates<State> _states = new();

    private sealed class State
    {
        public int Step;
        public int PagesAtFull;
        public float[] Mass = [];
    }

    /// <summary>A full step every <paramref name="period"/> steps (≥ 1; 1 = always dense), <paramref name="tokenBudget"/> tokens in between.</summary>
    public RecycledPolicy(int period, int tokenBudget)
    {
        if (period < 1) throw new ArgumentOutOfRangeException(nameof(period), period, "period must be ≥ 1");
        if (tokenBudget < 1) throw new ArgumentOutOfRangeException(nameof(tokenBudget), tokenBudget, "token budget must be ≥ 1");
        _period = period;
        _budget = tokenBudget;
    }

    /// <inheritdoc/>
    public IReadOnlyList<int> SelectPages(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows)
    {
        ArgumentNullException.ThrowIfNull(cache);
        int count = cache.Pages(sequence, layer).Count;
        State state = _states.For(cache, sequence, layer, kvHead);
        bool full = state.Step++ % _period == 0 || state.Mass.Length == 0;
        if (full)
        {
            state.PagesAtFull = count;
            state.Mass = new float[count];
            return Enumerable.Range(0, count).ToArray();
        }
        int keep = Math.Max(1, _budget / cache.PageSize);
        int known = Math.Min(state.PagesAtFull, count);
        var chosen = Enumerable.Range(0, known).OrderByDescending(p => state.Mass[p]).ThenBy(p => p).Take(keep);
        // Everything written since the full step: the pages added and the last page then (it may have grown).
        int since = Math.Max(0, known - 1);
        return [.. chosen.Concat(Enumerable.Range(since, count - since)).Distinct().Order()];
    }

    /// <inheritdoc/>
    public void Observe(KvCache cache, int sequence, int layer, int kvHead, IReadOnlyList<int> pages, ReadOnlySpan<float> mass)
    {
        ArgumentNullException.ThrowIfNull(pages);
        State state = _states.For(cache, sequence, layer, kvHead);
        if (pages.Count != state.PagesAtFull || state.Mass.Length != pages.Count || (state.Step - 1) % _period != 0) return;   // record full steps only
        for (int i = 0; i < pages.Count; i++) state.Mass[pages[i]] = mass[i];
    }
}

/// <summary>
/// A policy that chooses tokens rather than pages: <see cref="DecodeAttention"/> gathers the selected key and value rows
/// (any order of pages) and attends to exactly those. <see cref="IKvSelectionPolicy.SelectPages"/> gives the pages they
/// lie on (a superset) for callers that read pages.
/// </summary>
public interface ITokenSelectionPolicy : IKvSelectionPolicy
{
    /// <summary>Token indices (ascending, at least one) to read for kv head <paramref name="kvHead"/>.</summary>
    IReadOnlyList<int> SelectTokens(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows);
}

/// <summary>What the built-in token policies share: pages from tokens, and the scores of candidate tokens.</summary>
public abstract class TokenSelectionPolicy : ITokenSelectionPolicy
{
    private protected TokenSelectionPolicy()
    {
    }

    /// <inheritdoc/>
    public abstract IReadOnlyList<int> SelectTokens(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows);

    /// <summary>The pages the selected tokens lie on.</summary>
    public IReadOnlyList<int> SelectPages(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows)
    {
        ArgumentNullException.ThrowIfNull(cache);
        return [.. SelectTokens(cache, sequence, layer, kvHead, queries, rows).Select(t => t / cache.PageSize).Distinct().Order()];
    }

    /// <summary>
    /// q_r · k_t for every query row r and candidate token t (ascending), as [rows × candidates]: the decode kernels
    /// score each candidate page once for all rows.
    /// </summary>
    private protected static float[] Scores(KvCache cache, List<KvCache.Page> pages, int kvHead, ReadOnlySpan<int> candidates, ReadOnlySpan<float> queries, int rows)
    {
        int ps = cache.PageSize, n = candidates.Length;
        var scores = new float[rows * n];
        float[] q = queries[..(rows * cache.HeadDim)].ToArray();
        var scratch = new PageKernels.Scratch(ps, cache.HeadDim, cache.ValueDim, rows);
        bool wide = PageKernels.WideSupported(cache, KernelTuning.Default);
        for (int i = 0; i < n;)
        {
            int page = candidates[i] / ps, first = page * ps;
            PageKernels.Scores(cache, pages[page], kvHead, q, scratch, rows, wide);
            // The candidates on this page; a consecutive run (every token, as TokenSelect asks) is copied row by row.
            int end = i;
            while (end < n && candidates[end] / ps == page) end++;
            if (candidates[end - 1] - candidates[i] == end - 1 - i)
            {
                for (int r = 0; r < rows; r++) scratch.S.AsSpan((r * ps) + (candidates[i] - first), end - i).CopyTo(scores.AsSpan((r * n) + i, end - i));
            }
            else
            {
                for (int j = i; j < end; j++)
                    for (int r = 0; r < rows; r++) scores[(r * n) + j] = scratch.S[(r * ps) + (candidates[j] - first)];
            }
            i = end;
        }
        return scores;
    }

    /// <summary>Soft votes: Σ_r softmax_r over the candidates, from <see cref="Scores"/>.</summary>
    private protected static float[] SoftVotes(float[] scores, int rows, int n)
    {
        var votes = new float[n];
        for (int r = 0; r < rows; r++)
        {
            // The row's softmax on vectors (exp2 polynomial), added to the votes.
            Span<float> row = scores.AsSpan(r * n, n);
            Sparse.SelectionMath.Softmax(row);
            Linear.Vectors.Axpy(1f, row, votes);
        }
        return votes;
    }
}

/// <summary>
/// A diagnostic, not a method: the pages of most true attention mass — every key scored exactly, each query row's
/// softmax summed over the kv head's group and over the page — within <c>tokenBudget</c> tokens (whole pages; the
/// last page and those holding the last <c>recentTokens</c> tokens always). The best any page selection with that
/// budget can read: it bounds what Quest, Landmark or H2O can reach at the same page size (spec <c>oracle:1/8</c>).
/// </summary>
public sealed class OraclePagePolicy(int tokenBudget, int recentTokens = 0) : TokenSelectionPolicy
{
    private readonly int _budget = tokenBudget >= 1 ? tokenBudget : throw new ArgumentOutOfRangeException(nameof(tokenBudget), tokenBudget, "token budget must be ≥ 1");
    private readonly int _recent = recentTokens >= 0 ? recentTokens : throw new ArgumentOutOfRangeException(nameof(recentTokens), recentTokens, "recent tokens must be ≥ 0");

    /// <inheritdoc/>
    public override IReadOnlyList<int> SelectTokens(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows)
    {
        ArgumentNullException.ThrowIfNull(cache);
        List<KvCache.Page> pages = cache.Pages(sequence, layer);
        int length = cache.Length(sequence, layer), ps = cache.PageSize, keep = Math.Max(1, _budget / ps);
        if (keep >= pages.Count) return Enumerable.Range(0, length).ToArray();
        int[] all = [.. Enumerable.Range(0, length)];
        float[] votes = SoftVotes(Scores(cache, pages, kvHead, all, queries, rows), rows, length);
        var mass = new double[pages.Count];
        for (int t = 0; t < length; t++) mass[t / ps] += votes[t];
        var chosen = new SortedSet<int> { pages.Count - 1 };
        for (int p = pages.Count - 1, covered = 0; p >= 0 && covered < _recent; covered += pages[p].Count, p--) chosen.Add(p);
        foreach (int p in Enumerable.Range(0, pages.Count).OrderByDescending(p => mass[p]))
        {
            if (chosen.Count >= keep) break;
            chosen.Add(p);
        }
        return [.. chosen.SelectMany(p => Enumerable.Range(p * ps, Math.Min(ps, length - (p * ps))))];
    }
}

/// <summary>
/// TokenSelect (Wu et al., arXiv:2411.02886): token-level selection by per-head criticality q·k with soft voting — each
/// query row of the kv head's group turns its scores into a softmax over the tokens and the rows' probabilities are
/// summed; the <c>tokenBudget</c> tokens with the most votes are read (the newest token always). A selection cache
/// skips the scoring while consecutive queries stay similar: when every row's cosine similarity to the query that
/// made the cached selection is at least <c>reuseThreshold</c>, the cached tokens plus those appended since are reused.
/// Scoring reads every key (not the values) — the cost the cache avoids. Voting is per kv head here (the paper votes
/// across all heads of a layer).
/// </summary>
public sealed class TokenSelectPolicy : TokenSelectionPolicy
{
    private readonly int _budget;
    private readonly float _threshold;
    private readonly PolicyStates<State> _states = new();

    private sealed class State
    {
        public float[] Queries = [];
        public int[] Tokens = [];
        public int Length;
    }

    /// <summary>Tokens per step (≥ 1) and the cosine similarity above which a selection is reused (in [−1, 1]; above 1 never reuses).</summary>
    public TokenSelectPolicy(int tokenBudget, float reuseThreshold = 0.9f)
    {
        if (tokenBudget < 1) throw new ArgumentOutOfRangeException(nameof(tokenBudget), tokenBudget, "token budget must be ≥ 1");
        if (!(reuseThreshold >= -1)) throw new ArgumentOutOfRangeException(nameof(reuseThreshold), reuseThreshold, "reuse threshold must be ≥ −1 (NaN is not)");
        _budget = tokenBudget;
        _threshold = reuseThreshold;
    }

    private long _scorings;

    /// <summary>Steps that scored every key (the rest reused a cached selection).</summary>
    public long Scorings => Interlocked.Read(ref _scorings);

    /// <inheritdoc/>
    public override IReadOnlyList<int> SelectTokens(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows)
    {
        ArgumentNullException.ThrowIfNull(cache);
        List<KvCache.Page> pages = cache.Pages(sequence, layer);
        int length = pages.Sum(p => p.Count), d = cache.HeadDim;
        State state = _states.For(cache, sequence, layer, kvHead);
        if (_budget >= length) return Enumerable.Range(0, length).ToArray();
        if (state.Queries.Length == queries.Length && state.Length <= length && Similar(state.Queries, queries, rows, d))
        {
            return [.. state.Tokens.Concat(Enumerable.Range(state.Length, length - state.Length))];
        }
        Interlocked.Increment(ref _scorings);
        // Soft vote: Σ_r softmax_r(q_r · K) per token; the budget's best by quickselect (no sort of every token).
        int[] all = Enumerable.Range(0, length).ToArray();
        float[] votes = SoftVotes(Scores(cache, pages, kvHead, all, queries, rows), rows, length);
        votes[length - 1] = float.PositiveInfinity;                    // the newest token always
        int[] chosen = [.. Sparse.RowTopKSelector.TopIndices(votes, _budget, new int[length]).Order()];
        state.Queries = queries.ToArray();
        state.Tokens = chosen;
        state.Length = length;
        return chosen;
    }

    private bool Similar(float[] cached, ReadOnlySpan<float> queries, int rows, int d)
    {
        for (int r = 0; r < rows; r++)
        {
            ReadOnlySpan<float> a = cached.AsSpan(r * d, d), b = queries.Slice(r * d, d);
            float dot = Linear.Vectors.Dot(a, b), na = Linear.Vectors.Dot(a, a), nb = Linear.Vectors.Dot(b, b);
            if (!(dot >= _threshold * MathF.Sqrt(na * nb))) return false;
        }
        return true;
    }
}

/// <summary>
/// RetrievalAttention-style selection (Liu et al., arXiv:2409.10516) with an inverted-file index over the keys: per kv
/// head the cached keys are clustered (spherical k-means, <c>tokensPerCluster</c> keys per cluster on average); a step
/// ranks the clusters by the inner product of the query rows with their centroids, scans clusters in that order until
/// <c>scanTokens</c> keys were visited, scores the visited keys exactly (maximum over the group's rows) and reads the
/// <c>tokenBudget</c> best, plus every token appended since the index was built (rebuilt when they pass a quarter of the
/// indexed ones) and the first <c>sinkTokens</c>. Routing by q·centroid rather than by distance is the inner-product
/// search attention needs: queries lie outside the key distribution (the paper's observation), so nearest-key-to-query
/// in L2 is the wrong neighbour; the paper's query-aware graph index is not built here. <see cref="ScannedFraction"/>
/// reports how much of the cache the steps scanned.
/// </summary>
public sealed class RetrievalPolicy : TokenSelectionPolicy
{
    private readonly int _budget, _scan, _perCluster, _sink;
    private readonly PolicyStates<State> _states = new();
    private long _scanned, _cached;

    private sealed class State
    {
        public int Indexed;                     // tokens covered by the index
        public float[] Centroids = [];          // [clusters × D], unit length
        public int[][] Members = [];
    }

    /// <summary>Tokens read per step, keys scanned per step (≥ the budget), mean keys per cluster, always-read prefix.</summary>
    public RetrievalPolicy(int tokenBudget, int scanTokens, int tokensPerCluster = 64, int sinkTokens = 4)
    {
        if (tokenBudget < 1) throw new ArgumentOutOfRangeException(nameof(tokenBudget), tokenBudget, "token budget must be ≥ 1");
        if (scanTokens < tokenBudget) throw new ArgumentOutOfRangeException(nameof(scanTokens), scanTokens, $"scan tokens must be ≥ the token budget ({tokenBudget})");
        if (tokensPerCluster < 1) throw new ArgumentOutOfRangeException(nameof(tokensPerCluster), tokensPerCluster, "tokens per cluster must be ≥ 1");
        if (sinkTokens < 0) throw new ArgumentOutOfRangeException(nameof(sinkTokens), sinkTokens, "sink tokens must be ≥ 0");
        _budget = tokenBudget;
        _scan = scanTokens;
        _perCluster = tokensPerCluster;
        _sink = sinkTokens;
    }

    /// <summary>Keys scanned (scored exactly) over the cached keys, summed over the steps and kv heads so far.</summary>
    public double ScannedFraction => _cached == 0 ? 0 : (double)Interlocked.Read(ref _scanned) / Interlocked.Read(ref _cached);

    /// <inheritdoc/>
    public override IReadOnlyList<int> SelectTokens(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows)
    {
        ArgumentNullException.ThrowIfNull(cache);
        List<KvCache.Page> pages = cache.Pages(sequence, layer);
        int length = pages.Sum(p => p.Count), d = cache.HeadDim, ps = cache.PageSize;
        if (_budget >= length) return Enumerable.Range(0, length).ToArray();
        State state = _states.For(cache, sequence, layer, kvHead);
        if (state.Indexed == 0 || state.Indexed > length || length - state.Indexed > state.Indexed / 4) Build(state, pages, kvHead, length, d, ps);
        // Rank clusters by the best q·centroid over the rows; scan until _scan keys.
        int clusters = state.Members.Length;
        var rank = new float[clusters];
        for (int c = 0; c < clusters; c++)
        {
            float best = float.NegativeInfinity;
            for (int r = 0; r < rows; r++) best = MathF.Max(best, Linear.Vectors.Dot(queries.Slice(r * d, d), state.Centroids.AsSpan(c * d, d)));
            rank[c] = -best;
        }
        int[] order = Enumerable.Range(0, clusters).ToArray();
        Array.Sort(rank, order);
        var scanned = new List<int>(_scan + _perCluster);
        foreach (int c in order)
        {
            if (scanned.Count >= _scan) break;
            scanned.AddRange(state.Members[c]);
        }
        int[] found = [.. scanned.Order()];
        float[] all = Scores(cache, pages, kvHead, found, queries, rows);
        var scores = new float[found.Length];
        for (int i = 0; i < found.Length; i++)
        {
            float best = float.NegativeInfinity;
            for (int r = 0; r < rows; r++) best = MathF.Max(best, all[(r * found.Length) + i]);
            scores[i] = -best;
        }
        Array.Sort(scores, found);
        Interlocked.Add(ref _scanned, scanned.Count);
        Interlocked.Add(ref _cached, length);
        return [.. found.Take(_budget).Concat(Enumerable.Range(0, Math.Min(_sink, length))).Concat(Enumerable.Range(state.Indexed, length - state.Indexed)).Distinct().Order()];
    }

    /// <summary>Spherical k-means (4 rounds, evenly spaced seeds) over the keys now cached.</summary>
    private void Build(State state, List<KvCache.Page> pages, int kvHead, int length, int d, int ps)
    {
        int clusters = Math.Max(1, length / _perCluster);
        var keys = new float[length * d];
        for (int t = 0; t < length; t++) pages[t / ps].ReadKey(kvHead, t % ps, keys.AsSpan(t * d, d));
        var unit = new float[length * d];
        for (int t = 0; t < length; t++)
        {
            Span<float> k = keys.AsSpan(t * d, d);
            float n = MathF.Sqrt(Linear.Vectors.Dot(k, k));
            Linear.Vectors.Multiply(k, n > 0 ? 1 / n : 0, unit.AsSpan(t * d, d));
        }
        var centroids = new float[clusters * d];
        for (int c = 0; c < clusters; c++) unit.AsSpan((int)((long)c * length / clusters) * d, d).CopyTo(centroids.AsSpan(c * d, d));
        var assign = new int[length];
        var zeros = new float[clusters];
        for (int round = 0; round < 4; round++)
        {
            // Each key to its most similar centroid, chunks of keys in parallel (one dot product per pair took ≈ 3 s a
            // round and kv head at 131072 keys and 2048 clusters, session 10).
            var packed = new Sparse.PackedPanels(centroids, clusters, d);
            const int chunk = 256;
            Cpu.WorkQueue.Run((length + chunk - 1) / chunk, Environment.ProcessorCount, () => new float[64 * clusters], (i, similarity) =>
            {
                int t0 = i * chunk, n = Math.Min(chunk, length - t0);
                Sparse.ScoreGemm.AssignNearest(unit.AsSpan(t0 * d, n * d), d, packed, zeros, assign.AsSpan(t0, n), similarity);
            });
            Array.Clear(centroids);
            for (int t = 0; t < length; t++) Linear.Vectors.Axpy(1f, unit.AsSpan(t * d, d), centroids.AsSpan(assign[t] * d, d));
            for (int c = 0; c < clusters; c++)
            {
                Span<float> cv = centroids.AsSpan(c * d, d);
                float n = MathF.Sqrt(Linear.Vectors.Dot(cv, cv));
                if (n > 0) Linear.Vectors.Scale(cv, 1 / n);
            }
        }
        // Members by counting (one pass), ascending within each cluster.
        var sizes = new int[clusters];
        foreach (int c in assign) sizes[c]++;
        var members = new int[clusters][];
        for (int c = 0; c < clusters; c++) members[c] = new int[sizes[c]];
        Array.Clear(sizes);
        for (int t = 0; t < length; t++) members[assign[t]][sizes[assign[t]]++] = t;
        state.Members = members;
        state.Centroids = centroids;
        state.Indexed = length;
    }
}

/// <summary>
/// InfiniRetri-style retention (Ye et al., arXiv:2502.12962) at token level: the cache is consumed in chunks of
/// <c>chunkTokens</c>; at each chunk boundary the step scores every retained token and every token of the new chunk
/// with its query rows (softmax per row, summed over the group), adds that to each token's accumulated importance, and
/// retains the <c>retainTokens</c> most important — the rest are dropped for good, as InfiniRetri keeps only the tokens
/// attention pointed at across chunks. Between boundaries a step reads the retained tokens plus the current chunk.
/// (The paper scores with the last layer's attention of the question tokens and widens picks to phrases; here each
/// layer's own decode queries score, token by token.)
/// </summary>
public sealed class RetentionPolicy : TokenSelectionPolicy
{
    private readonly int _retain, _chunk;
    private readonly PolicyStates<State> _states = new();

    private sealed class State
    {
        public int Boundary;                                   // tokens before it are judged (retained or dropped)
        public readonly Dictionary<int, float> Importance = [];   // retained token → accumulated importance
    }

    /// <summary>Tokens retained across chunks (≥ 1) and the chunk length (≥ 1).</summary>
    public RetentionPolicy(int retainTokens, int chunkTokens)
    {
        if (retainTokens < 1) throw new ArgumentOutOfRangeException(nameof(retainTokens), retainTokens, "retained tokens must be ≥ 1");
        if (chunkTokens < 1) throw new ArgumentOutOfRangeException(nameof(chunkTokens), chunkTokens, "chunk tokens must be ≥ 1");
        _retain = retainTokens;
        _chunk = chunkTokens;
    }

    /// <inheritdoc/>
    public override IReadOnlyList<int> SelectTokens(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows)
    {
        ArgumentNullException.ThrowIfNull(cache);
        List<KvCache.Page> pages = cache.Pages(sequence, layer);
        int length = pages.Sum(p => p.Count);
        State state = _states.For(cache, sequence, layer, kvHead);
        if (state.Boundary > length) { state.Boundary = 0; state.Importance.Clear(); }   // truncated: start over
        if (length - state.Boundary >= _chunk)
        {
            // A chunk boundary: judge the retained tokens and the new chunk together.
            int[] candidates = [.. state.Importance.Keys.Order().Concat(Enumerable.Range(state.Boundary, length - state.Boundary))];
            float[] mass = SoftVotes(Scores(cache, pages, kvHead, candidates, queries, rows), rows, candidates.Length);
            var judged = candidates.Select((t, i) => (Token: t, Importance: state.Importance.GetValueOrDefault(t) + mass[i]))
                .OrderByDescending(x => x.Importance).ThenBy(x => x.Token).Take(_retain).ToList();
            state.Importance.Clear();
            foreach ((int token, float importance) in judged) state.Importance[token] = importance;
            state.Boundary = length;
        }
        return [.. state.Importance.Keys.Concat(Enumerable.Range(state.Boundary, length - state.Boundary)).Append(length - 1).Distinct().Order()];
    }
}
