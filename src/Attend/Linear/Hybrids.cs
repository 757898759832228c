using Attend.Masks;
using Attend.Tensors;

namespace Attend.Linear;

/// <summary>Hybrids of exact softmax attention and linear attention.</summary>
public static class Hybrids
{
    /// <summary>
    /// BASED-style hybrid (Arora et al., arXiv:2402.18668): each query attends its last <paramref name="window"/> keys
    /// exactly (softmax, scale 1/√D) and every older key through the 2nd-order Taylor feature map, whose φ(q)·φ(k)
    /// approximates exp(q·k/√D); both parts share one normalizer:
    /// o_i = (Σ_{window} e^{s_ij} v_j + Σ_{older} φ(q_i)·φ(k_j) v_j) / (Σ_{window} e^{s_ij} + Σ_{older} φ(q_i)·φ(k_j)).
    /// With a window covering the sequence it is exact causal softmax attention. Causal, Sq = Skv.
    /// The exact part runs on the block-sparse executor (with LSE); the linear part is chunked causal linear attention with
    /// a lag of one window (keys j ≤ i − window), merged row by row.
    /// </summary>
    public static void Based(TensorView<float> q, TensorView<float> k, TensorView<float> v, TensorView<float> output, int window, KernelTuning? tuning = null)
    {
        tuning ??= KernelTuning.Default;
        AttentionShape s = AttentionShape.Of(q, k, v);
        s.RequireOutput(output, nameof(output));
        if (s.QueryLength != s.KeyLength) throw new ArgumentException($"BASED is causal self-attention: Sq = Skv; got Sq={s.QueryLength}, Skv={s.KeyLength}", nameof(k));
        if (window < 1) throw new ArgumentOutOfRangeException(nameof(window), window, "window must be ≥ 1");
        var windowOut = new TensorView<float>(new float[(long)s.Batch * s.QueryLength * s.Heads * s.ValueDim], s.Batch, s.QueryLength, s.Heads, s.ValueDim);
        var lse = new TensorView<float>(new float[(long)s.Batch * s.QueryLength * s.Heads], s.Batch, s.QueryLength, s.Heads);
        Attention.Forward(q, k, v, windowOut, new AttentionOptions { Mask = Mask.Causal & Mask.SlidingWindow(window - 1) }, lse, tuning);

        // The linear part: keys at least `window` older than the query, chunked (Lightning) with a lag, unnormalized.
        var numerators = new TensorView<float>(new float[(long)s.Batch * s.QueryLength * s.Heads * s.ValueDim], s.Batch, s.QueryLength, s.Heads, s.ValueDim);
        var denominators = new TensorView<float>(new float[(long)s.Batch * s.QueryLength * s.Heads], s.Batch, s.QueryLength, s.Heads);
        LinearAttention.ForwardLagged(q, k, v, numerators, denominators, FeatureMap.Taylor, window, tuning);
        int dv = s.ValueDim;
        Cpu.WorkQueue.Run(s.Batch * s.Heads, tuning.EffectiveThreads, () => (Window: new float[dv], Linear: new float[dv]), (i, w) =>
        {
            int b = i / s.Heads, h = i % s.Heads;
            for (int t = 0; t < s.QueryLength; t++)
            {
                windowOut.CopyRow(b, t, h, w.Window);
                if (t < window)
                {
                    output.WriteRow(b, t, h, w.Window, 1f);
                    continue;
                }
                numerators.CopyRow(b, t, h, w.Linear);
                // One normalizer, relative to the window's log-sum-exp L: o = (O_w + N·e^{−L}) / (1 + D·e^{−L}).
                double scale = Math.Exp(-lse[b, t, h]);
                double inv = 1 / (1 + (denominators[b, t, h] * scale));
                for (int c = 0; c < dv; c++) w.Linear[c] = (float)((w.Window[c] + (w.Linear[c] * scale)) * inv);
                output.WriteRow(b, t, h, w.Linear, 1f);
            }
        });
    }

    /// <summary>
    /// Agent Attention (Han et al., arXiv:2312.08874): <paramref name="agents"/> agent tokens A, the mean-pooled queries of
    /// equal sequence segments, first gather from the keys, then broadcast back:
    /// O = softmax(Q·Aᵀ·scale)·(softmax(A·Kᵀ·scale)·V). Two calls of the fused executor, O(S·n·D) instead of O(S²·D).
    /// Non-causal; q [B, Sq, H, D], k and v [B, Skv, Hkv, ·].
    /// </summary>
    public static void AgentAttention(TensorView<float> q, TensorView<float> k, TensorView<float> v, TensorView<float> output, int agents, KernelTuning? tuning = null)
    {
        AttentionShape s = AttentionShape.Of(q, k, v);
        s.RequireOutput(output, nameof(output));
        if (agents < 1 || agents > s.QueryLength)
        {
            throw new ArgumentOutOfRangeException(nameof(agents), agents, $"agents must be in 1..Sq={s.QueryLength}");
        }
        // Agent tokens: mean of query segment [a·Sq/n, (a+1)·Sq/n) per head.
        var agentData = new float[(long)s.Batch * agents * s.Heads * s.HeadDim];
        var agentView = new TensorView<float>(agentData, s.Batch, agents, s.Heads, s.HeadDim);
        var row = new float[s.HeadDim];
        for (int b = 0; b < s.Batch; b++)
            for (int a = 0; a < agents; a++)
            {
                int start = (int)((long)a * s.QueryLength / agents), end = (int)((long)(a + 1) * s.QueryLength / agents);
                for (int h = 0; h < s.Heads; h++)
                    for (int t = start; t < end; t++)
                    {
                        q.CopyRow(b, t, h, row);
                        for (int c = 0; c < s.HeadDim; c++) agentView[b, a, h, c] += row[c] / (end - start);
                    }
            }
        // Agents gather from the keys (GQA: the agents of query head h read kv head h / group inside the executor).
        var gathered = new TensorView<float>(new float[(long)s.Batch * agents * s.Heads * s.ValueDim], s.Batch, agents, s.Heads, s.ValueDim);
        Attention.Forward(agentView, k, v, gathered, tuning: tuning);
        // Queries read from the agents: keys = agent tokens, values = what the agents gathered (one per query head).
        Attention.Forward(q, agentView, gathered, output, tuning: tuning);
    }

    /// <summary>
    /// SCOUT-style hybrid (segment compression with an exact local window): each query attends its last
    /// <paramref name="window"/> keys exactly and, for every complete segment of <paramref name="segment"/> tokens lying
    /// entirely before its window, one summary token (the mean key and mean value of the segment) — one softmax over
    /// both. Causal, Sq = Skv. The summaries join K and V as extra keys and a <see cref="Mask"/> encodes which query sees
    /// which, so the fused executor does the work.
    /// </summary>
    public static void Scout(TensorView<float> q, TensorView<float> k, TensorView<float> v, TensorView<float> output, int window, int segment,
        AttentionOptions? options = null, KernelTuning? tuning = null)
    {
        AttentionShape s = AttentionShape.Of(q, k, v);
        s.RequireOutput(output, nameof(output));
        if (s.QueryLength != s.KeyLength) throw new ArgumentException($"SCOUT is causal self-attention: Sq = Skv; got Sq={s.QueryLength}, Skv={s.KeyLength}", nameof(k));
        if (window < 1) throw new ArgumentOutOfRangeException(nameof(window), window, "window must be ≥ 1");
        if (segment < 1) throw new ArgumentOutOfRangeException(nameof(segment), segment, "segment must be ≥ 1");
        int n = s.KeyLength, segments = n / segment, total = n + segments;
        var kExt = new TensorView<float>(new float[(long)s.Batch * total * s.KvHeads * s.HeadDim], s.Batch, total, s.KvHeads, s.HeadDim);
        var vExt = new TensorView<float>(new float[(long)s.Batch * total * s.KvHeads * s.ValueDim], s.Batch, total, s.KvHeads, s.ValueDim);
        var rowK = new float[s.HeadDim];
        var rowV = new float[s.ValueDim];
        for (int b = 0; b < s.Batch; b++)
            for (int h = 0; h < s.KvHeads; h++)
                for (int j = 0; j < n; j++)
                {
                    k.CopyRow(b, j, h, rowK);
                    v.CopyRow(b, j, h, rowV);
                    kExt.WriteRow(b, j, h, rowK, 1f);
                    vExt.WriteRow(b, j, h, rowV, 1f);
                    int seg = j / segment;
                    if (seg >= segments) continue;
                    for (int c = 0; c < s.HeadDim; c++) kExt[b, n + seg, h, c] += rowK[c] / segment;
                    for (int c = 0; c < s.ValueDim; c++) vExt[b, n + seg, h, c] += rowV[c] / segment;
                }
        var opts = (options ?? AttentionOptions.Default) with { Mask = new ScoutMask(n, window, segment), Causal = false };   // causal by construction
        Attention.Forward(q, kExt, vExt, output, opts, tuning: tuning);
    }

    /// <summary>Keys [0, n): the causal window; keys n + g: summary of segment g, visible once the segment is older than the window.</summary>
    private sealed class ScoutMask(int tokens, int window, int segment) : Mask
    {
        // Query i sees segment g when the segment's last token (g+1)·L − 1 is older than the window start i − w + 1.
        private int VisibleSegments(int q) => Math.Max(0, (q - window + 1) / segment);

        public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv) =>
            kv < tokens ? kv <= q && q - kv < window : kv - tokens < Math.Min(VisibleSegments(q), extent.KeyLength - tokens);

        public override void KeyRanges(in MaskExtent extent, int batch, int head, int q0, int q1, List<(int Start, int End)> ranges)
        {
            ArgumentNullException.ThrowIfNull(ranges);
            ranges.Add((Math.Max(0, q0 - window + 1), Math.Min(q1, tokens)));
            int visible = Math.Min(VisibleSegments(q1 - 1), extent.KeyLength - tokens);
            if (visible > 0) ranges.Add((tokens, tokens + visible));
        }

        public override bool TryRowInterval(in MaskExtent extent, int batch, int head, int q, int k0, int k1, out int start, out int end)
        {
            // Within one block the allowed keys are a single interval: the window part or the summary part.
            if (k1 <= tokens)
            {
                start = Math.Clamp(q - window + 1, k0, k1);
                end = Math.Clamp(q + 1, start, k1);
                return true;
            }
            if (k0 >= tokens)
            {
                start = k0;
                end = Math.Clamp(tokens + VisibleSegments(q), k0, k1);
                return true;
            }
            start = end = 0;
            return false;
        }

        public override string ToCuda(in MaskExtent extent) =>
            $"(kv < {tokens} ? (kv <= q && q - kv < {window}) : (kv - {tokens} < ((q - {window} + 1) > 0 ? (q - {window} + 1) / {segment} : 0)))";

        public override string ToString() => $"scout(window={window}, segment={segment})";
    }

    /// <summary>
    /// MossFormer-style joint attention (after FLASH's mixed chunk attention, Hua et al. arXiv:2202.10447, used by
    /// MossFormer arXiv:2302.11824): exact softmax attention inside non-overlapping chunks of <paramref name="chunk"/>
    /// tokens plus linear attention over the whole sequence, summed: o = Attention_chunk(q, k, v) + Linear(q, k, v).
    /// With <paramref name="causal"/> both parts are causal. Sq = Skv.
    /// </summary>
    public static void MossFormer(TensorView<float> q, TensorView<float> k, TensorView<float> v, TensorView<float> output, int chunk,
        bool causal = false, FeatureMap? featureMap = null, KernelTuning? tuning = null)
    {
        AttentionShape s = AttentionShape.Of(q, k, v);
        s.RequireOutput(output, nameof(output));
        if (s.QueryLength != s.KeyLength) throw new ArgumentException($"MossFormer is self-attention: Sq = Skv; got Sq={s.QueryLength}, Skv={s.KeyLength}", nameof(k));
        if (chunk < 1) throw new ArgumentOutOfRangeException(nameof(chunk), chunk, "chunk must be ≥ 1");
        int[] ids = Enumerable.Range(0, s.QueryLength).Select(i => i / chunk).ToArray();
        Mask local = causal ? Mask.Document(ids) & Mask.Causal : Mask.Document(ids);
        Attention.Forward(q, k, v, output, new AttentionOptions { Mask = local }, tuning: tuning);
        var global = new TensorView<float>(new float[(long)s.Batch * s.QueryLength * s.Heads * s.ValueDim], s.Batch, s.QueryLength, s.Heads, s.ValueDim);
        LinearAttention.Forward(q, k, v, global, new LinearOptions { FeatureMap = featureMap ?? FeatureMap.EluPlusOne, Causal = causal }, tuning);
        var a = new float[s.ValueDim];
        var g = new float[s.ValueDim];
        for (int b = 0; b < s.Batch; b++)
            for (int i = 0; i < s.QueryLength; i++)
                for (int h = 0; h < s.Heads; h++)
                {
                    output.CopyRow(b, i, h, a);
                    global.CopyRow(b, i, h, g);
                    for (int c = 0; c < a.Length; c++) a[c] += g[c];
                    output.WriteRow(b, i, h, a, 1f);
                }
    }

    /// <summary>
    /// Linear-InfSA (Roffo et al., "Infinite Self-Attention", arXiv:2603.00175): every token receives the same pooled
    /// value ρ·Σⱼ aⱼ vⱼ, where a approximates the principal eigenvector (token centrality) of the implicit attention
    /// operator ReLU(Q·Kᵀ/D) by one power-iteration step from an energy-weighted query summary:
    /// q̄ = Σₜ wₜ qₜ/√D with wₜ ∝ |qₜ|/√D, aⱼ = ReLU(q̄·kⱼ/√D) normalized to sum 1 (ε = 1e-6 in both
    /// normalizers, as the authors' code). O(S·D) time and O(D) state per head. Non-causal (the method pools all queries,
    /// so a NaN in one query reaches every row of its head); GQA; Sq ≠ Skv allowed.
    /// </summary>
    public static void LinearInfSA(TensorView<float> q, TensorView<float> k, TensorView<float> v, TensorView<float> output, double rho = 0.95, KernelTuning? tuning = null)
    {
        tuning ??= KernelTuning.Default;
        AttentionShape s = AttentionShape.Of(q, k, v);
        s.RequireOutput(output, nameof(output));
        if (!double.IsFinite(rho)) throw new ArgumentOutOfRangeException(nameof(rho), rho, "rho must be finite");
        const double eps = 1e-6;
        double scale = 1 / Math.Sqrt(s.HeadDim);
        Cpu.WorkQueue.Run(s.Batch * s.Heads, tuning.EffectiveThreads, () => (X: new float[s.HeadDim], QBar: new double[s.HeadDim], V: new float[s.ValueDim], Pooled: new double[s.ValueDim], Out: new float[s.ValueDim]), (i, w) =>
        {
            int b = i / s.Heads, h = i % s.Heads, hk = h / s.GroupSize;
            Array.Clear(w.QBar);
            Array.Clear(w.Pooled);
            double energySum = 0;
            for (int t = 0; t < s.QueryLength; t++)
            {
                q.CopyRow(b, t, h, w.X);
                double energy = Math.Sqrt(Vectors.Dot(w.X, w.X)) * scale;
                energySum += energy;
                for (int c = 0; c < w.X.Length; c++) w.QBar[c] += energy * w.X[c] * scale;
            }
            double inv = 1 / (energySum + eps), mass = 0;
            for (int j = 0; j < s.KeyLength; j++)
            {
                k.CopyRow(b, j, hk, w.X);
                double a = 0;
                for (int c = 0; c < w.X.Length; c++) a += w.QBar[c] * w.X[c];
                a = Math.Max(0, a * inv * scale);
                if (a == 0) continue;
                mass += a;
                v.CopyRow(b, j, hk, w.V);
                for (int c = 0; c < w.V.Length; c++) w.Pooled[c] += a * w.V[c];
            }
            double norm = rho / (mass + eps);
            for (int c = 0; c < w.Out.Length; c++) w.Out[c] = (float)(w.Pooled[c] * norm);
            for (int t = 0; t < s.QueryLength; t++) output.WriteRow(b, t, h, w.Out, 1f);
        });
    }
}
