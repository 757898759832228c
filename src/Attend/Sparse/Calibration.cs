using System.Globalization;
using System.Text.Json;
using Attend.Masks;
using Attend.Tensors;

namespace Attend.Sparse;

/// <summary>
/// Runs a different selector on each head (MoA / MInference's offline per-head search result); a null entry runs
/// that head dense. Heads beyond the list reuse it cyclically (head h uses entry h mod count).
/// </summary>
public sealed class PerHeadSelector : SparsitySelector
{
    private readonly SparsitySelector?[] _heads;

    /// <summary>One selector per head (null: dense); all must share this selector's block size.</summary>
    public PerHeadSelector(IReadOnlyList<SparsitySelector?> heads, int blockSize = 128)
    {
        ArgumentNullException.ThrowIfNull(heads);
        if (heads.Count == 0) throw new ArgumentException("PerHeadSelector needs at least one head entry", nameof(heads));
        BlockSize = blockSize;
        foreach (SparsitySelector? s in heads)
        {
            if (s is not null && s.BlockSize != blockSize)
            {
                throw new ArgumentException($"every per-head selector must use BlockSize {blockSize}; {s.Name} uses {s.BlockSize}", nameof(heads));
            }
        }
        _heads = [.. heads];
    }

    /// <summary>The selector of each head (null: dense).</summary>
    public IReadOnlyList<SparsitySelector?> Heads => _heads;

    /// <inheritdoc/>
    public override string Name => $"per-head({string.Join(" ", _heads.Select(s => s?.Name ?? "dense"))})";

    internal override bool ReadsPackedKeys => _heads.Any(s => s is not null && s.ReadsPackedKeys);

    private protected override void SelectHead(HeadSelection head)
    {
        SparsitySelector? selector = _heads[head.Head % _heads.Length];
        if (selector is not null)
        {
            selector.SelectInto(head);
            return;
        }
        for (int qb = 0; qb < head.QueryBlocks; qb++)
        {
            for (int kb = 0; kb < head.VisibleKeyBlocks(qb); kb++) head.AddBlock(qb, kb);
        }
    }
}

/// <summary>The result of a <see cref="SparseCalibration"/> run: per head, the chosen selector spec (null: dense) and what it measured.</summary>
public sealed record CalibratedHeads(string?[] Specs, double[] RelativeL2, double[] Density, int BlockSize)
{
    /// <summary>The per-head selector to run (reusable across inputs of the same model layer).</summary>
    public PerHeadSelector ToSelector() => new([.. Specs.Select(s => s is null ? null : Selectors.Parse(s))], BlockSize);

    /// <summary>JSON for reuse (MInference-style per-head configuration file).</summary>
    public string ToJson() => JsonSerializer.Serialize(this, SparseJson.Default.CalibratedHeads);

    /// <summary>Reads <see cref="ToJson"/>'s output.</summary>
    public static CalibratedHeads FromJson(string json) =>
        JsonSerializer.Deserialize(json, SparseJson.Default.CalibratedHeads) ?? throw new ArgumentException("not a CalibratedHeads JSON document", nameof(json));
}

/// <summary>
/// Per-head search for the cheapest selector and budget meeting an error budget (MoA, arXiv:2406.14909; MInference's
/// offline pattern search). Every candidate's plan is built on the whole input, then executed only for about
/// <c>sampleQueries</c> queries: whole query blocks, one from each equal stretch of the sequence at a seeded random
/// place, the last block included. (Sampling
/// only the last 1024 queries missed errors elsewhere: a calibration at 0.02 measured 0.034 over the whole
/// sequence at S = 8192; a sample of 1024 spread queries still chose a threshold whose error over the sequence was
/// 0.024–0.026, hence the default 4096, session 11.) The target is <c>margin × maxRelativeError</c>. Two choices are weighed:
/// <list type="bullet">
/// <item>per head, the candidate of lowest measured density within the target on alternate sample blocks (a head with
/// none runs dense), kept only if every head's choice also holds on the other blocks;</item>
/// <item>one candidate for every head: the sparsest whose error over the whole sample and all heads is within the target.</item>
/// </list>
/// The per-head choice wins when it holds and is sparser. Choosing per head on one sample picks, among many candidates,
/// the one that passed by luck: on the generator (needles at random places per head and seed) per-head choices kept 0.02 on the calibration
/// and measured 0.027–0.07 on held-out seeds (sessions 7–8), while one threshold for every head held (session 11).
/// On real layers, whose heads differ, the per-head choice holds on the other blocks and stays.
/// </summary>
public static class SparseCalibration
{
    /// <summary>
    /// The default ladder: each built-in at budgets from sparse to nearly dense. Cheap candidates first only
    /// matters for ties; the choice is by measured density.
    /// </summary>
    public static IReadOnlyList<string> DefaultCandidates { get; } =
    [
        "anchor:theta=6", "anchor:theta=10", "anchor:theta=14",
        "xattention:t=0.8", "xattention:t=0.9", "xattention:t=0.95", "xattention:t=0.98",
        "pooled:budget=p0.9", "pooled:budget=p0.95", "pooled:budget=p0.98",
        "flexprefill:gamma=0.9", "flexprefill:gamma=0.95", "flexprefill:gamma=0.99",
        "vertical-slash", "vertical-slash:v=2000,s=500",
        "sale:t=0.05", "sale:t=0.02", "sale:t=0.01", "sale:t=0.005",
    ];

    /// <summary>Chooses a selector per head on a sample of one input (see the class remarks); <paramref name="margin"/> in (0, 1] scales the budget the sample must meet (default 0.8).</summary>
    public static CalibratedHeads Calibrate<T>(TensorView<T> q, TensorView<T> k, TensorView<T> v, double maxRelativeError,
        IReadOnlyList<string>? candidates = null, int sampleQueries = 4096, bool causal = true, float? scale = null, KernelTuning? tuning = null,
        double margin = 0.8)
        where T : unmanaged =>
        Calibrate([(q, k, v)], maxRelativeError, candidates, sampleQueries, causal, scale, tuning, margin);

    /// <summary>
    /// Chooses on samples of several inputs of one layer (the same heads): errors, norms and pairs are summed over all of
    /// them, so one input's luck weighs less — a single input's error for the same threshold ranged 0.0118–0.0172 over
    /// generator seeds (session 11). <paramref name="sampleQueries"/> is per input.
    /// </summary>
    public static CalibratedHeads Calibrate<T>(IReadOnlyList<(TensorView<T> Q, TensorView<T> K, TensorView<T> V)> inputs, double maxRelativeError,
        IReadOnlyList<string>? candidates = null, int sampleQueries = 4096, bool causal = true, float? scale = null, KernelTuning? tuning = null,
        double margin = 0.8)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(inputs);
        if (!(maxRelativeError >= 0)) throw new ArgumentOutOfRangeException(nameof(maxRelativeError), maxRelativeError, "the error budget must be ≥ 0");
        if (!(margin > 0 && margin <= 1)) throw new ArgumentOutOfRangeException(nameof(margin), margin, "the margin must be in (0, 1]");
        if (sampleQueries < 1) throw new ArgumentOutOfRangeException(nameof(sampleQueries), sampleQueries, "sampleQueries must be ≥ 1");
        if (inputs.Count == 0) throw new ArgumentException("calibration needs at least one input", nameof(inputs));
        candidates ??= DefaultCandidates;
        SparsitySelector[] selectors = [.. candidates.Select(Selectors.Parse)];
        if (selectors.Length == 0) throw new ArgumentException("calibration needs at least one candidate", nameof(candidates));
        int bs = selectors[0].BlockSize;
        if (selectors.Any(s => s.BlockSize != bs)) throw new ArgumentException("every candidate must use one block size", nameof(candidates));
        foreach ((TensorView<T> q, TensorView<T> k, TensorView<T> v) in inputs)
        {
            if (q.Rank != 4 || k.Rank != 4 || v.Rank != 4) throw new ArgumentException("q, k, v must be [B, S, H, D]", nameof(inputs));
            if (q.Shape[2] != inputs[0].Q.Shape[2])
            {
                throw new ArgumentException($"every input must have the first one's {inputs[0].Q.Shape[2]} heads; got {q.Shape[2]}", nameof(inputs));
            }
        }
        int heads = inputs[0].Q.Shape[2], n = selectors.Length;
        var options = new AttentionOptions { Causal = causal, Scale = scale };

        // Sums per candidate, half of the sample (alternate sample blocks) and head: squared error, squared norm, pairs.
        var diff = new double[2, n, heads];
        var norm = new double[2, n, heads];
        var pairs = new double[2, n, heads];
        var total = new double[2];
        foreach ((TensorView<T> q, TensorView<T> k, TensorView<T> v) in inputs)
        {
            int b = q.Shape[0], sq = q.Shape[1], dv = v.Shape[3], skv = k.Shape[1];
            (int Q0, int Rows, int Keys) Extent(int qb)
            {
                int q0 = qb * bs, rows = Math.Min(bs, sq - q0);
                int keys = causal ? (int)Math.Clamp((long)q0 + rows + skv - sq, 0, skv) : skv;
                return (q0, rows, keys);
            }

            // The sample: one query block from each of `count` equal stretches of the sequence, at a pseudo-random place
            // within it (fixed seed: the same input gives the same sample), the last block always (it sees the most
            // keys); each runs against only the keys it can see, so the check costs a fraction of dense. Evenly spaced
            // blocks alias with periodic structure: at a stride of two blocks every sampled block was the second half of
            // the generator's 256-token cluster segments, and the sample measured 0.012 where the whole sequence had
            // 0.026 (session 11).
            int queryBlocks = (sq + bs - 1) / bs, count = Math.Clamp(sampleQueries / bs, 1, queryBlocks);
            var place = new Random(20260523);
            int[] sampleBlocks = [.. Enumerable.Range(0, count).Select(i =>
            {
                int first = (int)((long)i * queryBlocks / count), end = (int)((long)(i + 1) * queryBlocks / count);
                return i == count - 1 ? queryBlocks - 1 : first + place.Next(end - first);
            }).Distinct()];
            var denseOut = new TensorView<T>[sampleBlocks.Length];
            for (int i = 0; i < sampleBlocks.Length; i++)
            {
                (int q0, int rows, int keys) = Extent(sampleBlocks[i]);
                denseOut[i] = new TensorView<T>(new T[(long)b * rows * heads * dv], b, rows, heads, dv);
                if (keys > 0) Attention.Forward(q.Slice(1, q0, rows), k.Slice(1, 0, keys), v.Slice(1, 0, keys), denseOut[i], options, tuning: tuning);
            }
            for (int c = 0; c < n; c++)
            {
                SparsityPlan full = selectors[c].Plan(q, k, causal, scale);
                for (int i = 0; i < sampleBlocks.Length; i++)
                {
                    (int q0, int rows, int keys) = Extent(sampleBlocks[i]);
                    if (keys == 0) continue;
                    int half = i % 2;
                    SparsityPlan block = Restrict(full, sampleBlocks[i], keys);
                    var output = new TensorView<T>(new T[(long)b * rows * heads * dv], b, rows, heads, dv);
                    Attention.Forward(q.Slice(1, q0, rows), k.Slice(1, 0, keys), v.Slice(1, 0, keys), output, options with { Causal = false, Plan = block }, tuning: tuning);
                    double weight = (double)rows * keys;
                    if (c == 0) total[half] += weight;
                    for (int head = 0; head < heads; head++)
                    {
                        (double d, double nrm, _, _) = Metrics.Sums(output, denseOut[i], head);
                        diff[half, c, head] += d;
                        norm[half, c, head] += nrm;
                        pairs[half, c, head] += weight * Metrics.Density(block, causal, head);
                    }
                }
            }
        }
        // Error and density of candidate c over heads [h0, h1] and sample halves [first, last].
        double Error(int c, int h0, int h1, int first, int last)
        {
            double dd = 0, nn = 0;
            for (int head = h0; head <= h1; head++)
                for (int x = first; x <= last; x++)
                {
                    dd += diff[x, c, head];
                    nn += norm[x, c, head];
                }
            return nn == 0 ? 0 : Math.Sqrt(dd / nn);
        }
        double Density(int c, int h0, int h1, int first, int last)
        {
            double pp = 0, tt = 0;
            for (int x = first; x <= last; x++)
            {
                for (int head = h0; head <= h1; head++) pp += pairs[x, c, head];
                tt += total[x] * (h1 - h0 + 1);
            }
            return tt == 0 ? 0 : pp / tt;
        }
        double target = margin * maxRelativeError;
        bool split = total[1] > 0;
        int lastHalf = split ? 1 : 0;

        // Per head: the sparsest candidate within the target on the first half, kept only if every head's choice also
        // holds on the second half — a choice made per head on one sample is biased towards the candidate that passed
        // by luck (session 8: held-out errors 1.5–2× the calibration's on the generator).
        var perHead = new int[heads];
        bool perHeadHolds = split;
        for (int head = 0; head < heads; head++)
        {
            perHead[head] = -1;
            double sparsest = 1;
            for (int c = 0; c < n; c++)
            {
                double density = Density(c, head, head, 0, 0);
                if (Error(c, head, head, 0, 0) <= target && density < sparsest)
                {
                    perHead[head] = c;
                    sparsest = density;
                }
            }
            if (perHead[head] >= 0 && Error(perHead[head], head, head, 1, 1) > target) perHeadHolds = false;
        }

        // One candidate for every head: the sparsest whose error over the whole sample and every head is within the
        // target (a single choice among the ladder carries little selection bias).
        int uniform = -1;
        double uniformDensity = 1;
        for (int c = 0; c < n; c++)
        {
            double density = Density(c, 0, heads - 1, 0, lastHalf);
            if (Error(c, 0, heads - 1, 0, lastHalf) <= target && density < uniformDensity)
            {
                uniform = c;
                uniformDensity = density;
            }
        }

        double perHeadDensity = perHead.Select((c, head) => c < 0 ? 1 : Density(c, head, head, 0, lastHalf)).Average();
        int[] chosen = perHeadHolds && perHeadDensity < uniformDensity ? perHead : [.. Enumerable.Repeat(uniform, heads)];
        var best = new string?[heads];
        var bestError = new double[heads];
        var bestDensity = new double[heads];
        for (int head = 0; head < heads; head++)
        {
            int c = chosen[head];
            best[head] = c < 0 ? null : candidates[c];
            bestError[head] = c < 0 ? 0 : Error(c, head, head, 0, lastHalf);
            bestDensity[head] = c < 0 ? 1 : Density(c, head, head, 0, lastHalf);
        }

        return new CalibratedHeads(best, bestError, bestDensity, bs);
    }

    /// <summary>Query block <paramref name="qb"/> of <paramref name="plan"/> as a plan of its own over the first <paramref name="keys"/> keys.</summary>
    internal static SparsityPlan Restrict(SparsityPlan plan, int qb, int keys)
    {
        MaskExtent e = plan.Extent;
        int q0 = qb * plan.BlockQ, rows = Math.Min(plan.BlockQ, e.QueryLength - q0);
        BlockMask? blocks = null;
        if (plan.Blocks is { } bm)
        {
            blocks = BlockMask.FromBlocks(e.Batch, e.Heads, rows, keys, bm.BlockQ, bm.BlockK, (b, h, _) =>
            {
                ReadOnlySpan<int> cols = bm.Row(b, h, qb, out ReadOnlySpan<BlockClass> kinds);
                var list = new List<(int, BlockClass)>(cols.Length);
                for (int i = 0; i < cols.Length; i++)
                {
                    if (cols[i] * bm.BlockK < keys) list.Add((cols[i], kinds[i]));
                }
                return list;
            }, bm.Mask);
        }
        TokenSet? tokens = plan.Tokens is { } ts
            ? TokenSet.Create(e.Batch, e.Heads, rows, keys, ts.BlockQ, (b, h, _) => ts.Row(b, h, qb).ToArray().Where(t => t < keys), ts.Mask)
            : null;
        return new SparsityPlan(blocks, tokens);
    }
}

/// <summary>
/// <c>Auto(maxRelativeError)</c>: calibrates on a sample of this call's own queries (<see cref="SparseCalibration"/>)
/// and runs the chosen plan (per head, or one candidate for every head). Needs the values to measure the error, so it runs through
/// <see cref="SparseAttention.Forward"/> (or <see cref="Plan{T}(TensorView{T}, TensorView{T}, TensorView{T}, bool, float?, KernelTuning?)"/>).
/// </summary>
public sealed class AutoSelector : IValueAwareSelector
{
    /// <summary>An Auto selector keeping the relative L2 error measured on its sample within 0.8 × <paramref name="maxRelativeError"/> (the calibration's default margin).</summary>
    public AutoSelector(double maxRelativeError, IReadOnlyList<string>? candidates = null, int sampleQueries = 4096)
    {
        if (!(maxRelativeError >= 0)) throw new ArgumentOutOfRangeException(nameof(maxRelativeError), maxRelativeError, "the error budget must be ≥ 0");
        MaxRelativeError = maxRelativeError;
        Candidates = candidates ?? SparseCalibration.DefaultCandidates;
        SampleQueries = sampleQueries;
    }

    /// <summary>The error budget per head.</summary>
    public double MaxRelativeError { get; }

    /// <summary>Candidate selector specs.</summary>
    public IReadOnlyList<string> Candidates { get; }

    /// <summary>Queries (whole blocks spread over the sequence) used to measure each candidate.</summary>
    public int SampleQueries { get; }

    /// <summary>The last calibration (per head spec, error, density), for reports.</summary>
    public CalibratedHeads? LastCalibration { get; private set; }

    /// <inheritdoc/>
    public string Name => string.Create(CultureInfo.InvariantCulture, $"auto(err={MaxRelativeError:0.###})");

    /// <inheritdoc/>
    public SparsityPlan Plan<T>(TensorView<T> q, TensorView<T> k, bool causal = true, float? scale = null) where T : unmanaged =>
        throw new NotSupportedException("Auto measures the output error, so it needs the values: use SparseAttention.Forward or Plan(q, k, v, ...)");

    /// <summary>Calibrates on (q, k, v) and returns the per-head plan.</summary>
    public SparsityPlan Plan<T>(TensorView<T> q, TensorView<T> k, TensorView<T> v, bool causal = true, float? scale = null, KernelTuning? tuning = null) where T : unmanaged
    {
        CalibratedHeads calibration = SparseCalibration.Calibrate(q, k, v, MaxRelativeError, Candidates, SampleQueries, causal, scale, tuning);
        LastCalibration = calibration;
        return calibration.ToSelector().Plan(q, k, causal, scale);
    }
}

/// <summary>Trimming-safe JSON for the sparse types (calibrations, needle lists).</summary>
[System.Text.Json.Serialization.JsonSerializable(typeof(CalibratedHeads))]
[System.Text.Json.Serialization.JsonSerializable(typeof(List<Needle>))]
internal sealed partial class SparseJson : System.Text.Json.Serialization.JsonSerializerContext;
