using Attend.Tensors;

namespace Attend.Linear;

/// <summary>
/// Aaren, attention as an RNN (Feng et al., arXiv:2405.13956): one fixed (learned) query per head attends every
/// prefix of the sequence, o_t = Σ_{j≤t} e^{s_j} v_j / Σ_{j≤t} e^{s_j} with s_j = scale·q·k_j. The many-to-many
/// outputs come from a parallel prefix scan over (max m, sum u, weighted sum w) triples, whose associative combine
/// is (m, u, w) ⊕ (m', u', w') = (M, u·e^{m−M} + u'·e^{m'−M}, w·e^{m−M} + w'·e^{m'−M}) with M = max(m, m').
/// <see cref="AarenState"/> gives the same outputs token by token in O(Dv).
/// </summary>
public static class Aaren
{
    /// <summary>
    /// Outputs for every prefix: <paramref name="query"/> [H, D] (one query per head), k [B, S, H, D], v [B, S, H, Dv]
    /// → output [B, S, H, Dv]. The scan runs over chunks of <see cref="KernelTuning.ChunkSize"/> tokens in three passes
    /// (chunk reductions, a scan over chunk totals, chunk scans with the carried prefix).
    /// </summary>
    public static void Forward(TensorView<float> query, TensorView<float> k, TensorView<float> v, TensorView<float> output,
        float? scale = null, KernelTuning? tuning = null)
    {
        tuning ??= KernelTuning.Default;
        Check(query, k, v, output);
        int b = k.Dim(0), s = k.Dim(1), h = k.Dim(2), d = k.Dim(3), dv = v.Dim(3);
        float sc = scale ?? 1f / MathF.Sqrt(d);
        if (!float.IsFinite(sc) || sc < 0) throw new ArgumentException($"scale must be finite and ≥ 0; got {sc}", nameof(scale));
        if (tuning.ChunkSize < 1) throw new ArgumentException($"ChunkSize must be ≥ 1; got {tuning.ChunkSize}", nameof(tuning));
        int chunk = tuning.ChunkSize, chunks = (s + chunk - 1) / chunk;
        // Per (b, h, chunk) totals, then exclusive prefixes: O(B·H·chunks·Dv) extra memory.
        var totals = new Triple[b * h * chunks];
        for (int i = 0; i < totals.Length; i++) totals[i] = Triple.Empty(dv);
        TensorView<float> qv = query, kv = k, vv = v, ov = output;
        Cpu.WorkQueue.Run(b * h * chunks, tuning.EffectiveThreads, () => new float[Math.Max(d, dv)], (i, row) =>
        {
            int c = i % chunks, bh = i / chunks;
            Triple t = totals[i];
            for (int j = c * chunk; j < Math.Min(s, (c + 1) * chunk); j++) t.Add(Score(qv, kv, bh / h, j, bh % h, sc, row), vv, bh / h, j, bh % h, row);
        });
        Cpu.WorkQueue.Run(b * h, tuning.EffectiveThreads, () => 0, (bh, _) =>
        {
            // Exclusive scan of the chunk totals, in place (each slot becomes the prefix before its chunk).
            var carry = Triple.Empty(dv);
            for (int c = 0; c < chunks; c++)
            {
                Triple total = totals[bh * chunks + c];
                totals[bh * chunks + c] = carry.Copy();
                carry.Combine(total);
            }
        });
        Cpu.WorkQueue.Run(b * h * chunks, tuning.EffectiveThreads, () => new float[Math.Max(d, dv)], (i, row) =>
        {
            int c = i % chunks, bh = i / chunks;
            Triple t = totals[i];
            for (int j = c * chunk; j < Math.Min(s, (c + 1) * chunk); j++)
            {
                t.Add(Score(qv, kv, bh / h, j, bh % h, sc, row), vv, bh / h, j, bh % h, row);
                t.Write(ov, bh / h, j, bh % h);
            }
        });
    }

    private static float Score(TensorView<float> q, TensorView<float> k, int b, int j, int h, float scale, float[] row)
    {
        k.CopyRow(b, j, h, row);
        float dot = 0;
        for (int c = 0; c < k.Dim(3); c++) dot += q[h, c] * row[c];
        return scale * dot;
    }

    private static void Check(TensorView<float> query, TensorView<float> k, TensorView<float> v, TensorView<float> output)
    {
        if (k.IsDefault || k.Rank != 4) throw new ArgumentException($"k must have shape [B, S, H, D]; got {k.ShapeString()}", nameof(k));
        int b = k.Dim(0), s = k.Dim(1), h = k.Dim(2), d = k.Dim(3);
        if (b == 0 || s == 0 || h == 0 || d == 0) throw new ArgumentException($"k must have non-zero sizes; got {k.ShapeString()}", nameof(k));
        if (query.IsDefault || query.Rank != 2 || query.Dim(0) != h || query.Dim(1) != d)
            throw new ArgumentException($"query must have shape [H={h}, D={d}]; got {query.ShapeString()}", nameof(query));
        if (v.IsDefault || v.Rank != 4 || v.Dim(0) != b || v.Dim(1) != s || v.Dim(2) != h || v.Dim(3) == 0)
            throw new ArgumentException($"v must have shape [B={b}, S={s}, H={h}, Dv≥1]; got {v.ShapeString()}", nameof(v));
        if (output.IsDefault || output.Rank != 4 || output.Dim(0) != b || output.Dim(1) != s || output.Dim(2) != h || output.Dim(3) != v.Dim(3))
            throw new ArgumentException($"output must have shape [B={b}, S={s}, H={h}, Dv={v.Dim(3)}]; got {output.ShapeString()}", nameof(output));
        if (output.Overlaps(k) || output.Overlaps(v) || output.Overlaps(query)) throw new ArgumentException("output must not overlap the inputs", nameof(output));
    }

    /// <summary>(max, Σ e^{s−max}, Σ e^{s−max}·v): the scan's monoid element.</summary>
    internal sealed class Triple
    {
        public float Max;
        public float Sum;
        public float[] Weighted = [];

        public static Triple Empty(int dv) => new() { Max = float.NegativeInfinity, Sum = 0, Weighted = new float[dv] };

        public Triple Copy() => new() { Max = Max, Sum = Sum, Weighted = (float[])Weighted.Clone() };

        /// <summary>this ← this ⊕ other.</summary>
        public void Combine(Triple other)
        {
            float m = MathF.Max(Max, other.Max);
            if (float.IsNegativeInfinity(m)) return;
            float a = MathF.Exp(Max - m), c = MathF.Exp(other.Max - m);
            Sum = Sum * a + other.Sum * c;
            for (int i = 0; i < Weighted.Length; i++) Weighted[i] = Weighted[i] * a + other.Weighted[i] * c;
            Max = m;
        }

        /// <summary>this ← this ⊕ (score, 1, v_j).</summary>
        public void Add(float score, TensorView<float> v, int b, int j, int h, float[] row)
        {
            v.CopyRow(b, j, h, row);
            float m = MathF.Max(Max, score);
            float a = float.IsNegativeInfinity(Max) ? 0f : MathF.Exp(Max - m), c = MathF.Exp(score - m);
            Sum = Sum * a + c;
            for (int i = 0; i < Weighted.Length; i++) Weighted[i] = Weighted[i] * a + row[i] * c;
            Max = m;
        }

        public void Write(TensorView<float> o, int b, int j, int h)
        {
            float inv = Sum == 0 ? 0 : 1 / Sum;
            o.WriteRow(b, j, h, Weighted, inv);
        }
    }
}

/// <summary>Aaren's O(1)-per-token recurrence for one sequence: the running triple per head.</summary>
public sealed class AarenState
{
    private readonly float[] _query;
    private readonly Aaren.Triple[] _heads;
    private readonly float _scale;
    private readonly int _d, _dv;

    /// <summary>A state for the fixed queries [H·D] (head-major), value dim <paramref name="valueDim"/>.</summary>
    public AarenState(ReadOnlySpan<float> query, int heads, int valueDim, float? scale = null)
    {
        if (heads < 1 || valueDim < 1 || query.Length % heads != 0 || query.Length == 0)
            throw new ArgumentException($"query must hold H·D values for H={heads} heads; got {query.Length}", nameof(query));
        _query = query.ToArray();
        _d = query.Length / heads;
        _dv = valueDim;
        _scale = scale ?? 1f / MathF.Sqrt(_d);
        _heads = Enumerable.Range(0, heads).Select(_ => Aaren.Triple.Empty(valueDim)).ToArray();
    }

    /// <summary>Consumes one token: k [H·D], v [H·Dv]; writes output [H·Dv] (attention of each head's query over the prefix).</summary>
    public void Step(ReadOnlySpan<float> k, ReadOnlySpan<float> v, Span<float> output)
    {
        int h = _heads.Length;
        if (k.Length != h * _d || v.Length != h * _dv || output.Length != h * _dv)
            throw new ArgumentException($"k needs H·D = {h * _d}, v and output H·Dv = {h * _dv} values; got {k.Length}, {v.Length}, {output.Length}", nameof(k));
        for (int head = 0; head < h; head++)
        {
            float dot = 0;
            for (int c = 0; c < _d; c++) dot += _query[head * _d + c] * k[head * _d + c];
            var single = new Aaren.Triple { Max = _scale * dot, Sum = 1, Weighted = v.Slice(head * _dv, _dv).ToArray() };
            Aaren.Triple t = _heads[head];
            t.Combine(single);
            float inv = t.Sum == 0 ? 0 : 1 / t.Sum;
            for (int c = 0; c < _dv; c++) output[head * _dv + c] = t.Weighted[c] * inv;
        }
    }
}
