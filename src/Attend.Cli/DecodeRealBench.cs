using Attend.Decode;
using Attend.Tensors;

namespace Attend.Cli;

/// <summary>
/// <c>attend bench --suite decode-real</c>: the real activations of shared/data/gpt-bytes-8k (layers 1 and 6, 4 heads,
/// D = 64, causal, scale 1/8). The first 7680 tokens fill an f16 cache; each of the last 512 tokens is appended and
/// then decoded as one step. Per policy at a 1/8 budget: mean attention-mass recall (share of the dense softmax mass
/// on the pages the policy reads) and mean relative L2 error of the output, per layer and head.
/// </summary>
internal static class DecodeRealBench
{
    public static List<BenchCommand.BenchRow> Run(string dataDir, Action<string> status)
    {
        var rows = new List<BenchCommand.BenchRow>();
        foreach (int layer in new[] { 1, 6 })
        {
            string dir = dataDir;
            Tensor k = Npy.Read(Path.Combine(dir, $"layer{layer}_k.npy")).ConvertTo(DType.Float32);
            Tensor q = Npy.Read(Path.Combine(dir, $"layer{layer}_q.npy")).ConvertTo(DType.Float32);
            Tensor v = Npy.Read(Path.Combine(dir, $"layer{layer}_v.npy")).ConvertTo(DType.Float32);
            int s = k.Shape[1], h = k.Shape[2], d = k.Shape[3], steps = Math.Min(512, s / 2), prefix = s - steps;
            float[] ka = k.Array<float>(), qa = q.Array<float>(), va = v.Array<float>();
            var policies = new (string Name, IKvSelectionPolicy Policy)[]
            {
                ("quest 1/8", new QuestPolicy(s / 8)),
                ("streaming 1/8", new StreamingPolicy(64, s / 8 - 64)),
                ("landmark 1/8", new LandmarkPolicy(s / 8)),
                ("h2o 1/16 heavy + 1/16 recent", new HeavyHitterPolicy(s / 16, s / 16)),
                ("recycled every 8, 1/8", new RecycledPolicy(8, s / 8)),
                ("tokenselect 1/8 tokens", new TokenSelectPolicy(s / 8)),
                ("retrieval 1/8 tokens, scan 1/4", new RetrievalPolicy(s / 8, s / 4)),
                ("retention 1/16 + chunks of 1/16", new RetentionPolicy(s / 16, s / 16)),
            };
            foreach ((string name, IKvSelectionPolicy policy) in policies)
            {
                status($"layer {layer}: {name}");
                var cache = new KvCache(1, h, d, storage: DType.Float16, pageSize: 64);
                int seq = cache.AddSequence();
                cache.Append(seq, 0, new TensorView<float>(ka[..(prefix * h * d)], prefix, h, d), new TensorView<float>(va[..(prefix * h * d)], prefix, h, d));
                var recall = new double[h];
                var error = new double[h];
                var density = new double[h];
                var dense = new TensorView<float>(new float[h * d], 1, h, d);
                var sparse = new TensorView<float>(new float[h * d], 1, h, d);
                var sw = System.Diagnostics.Stopwatch.StartNew();
                for (int t = prefix; t < s; t++)
                {
                    cache.Append(seq, 0, new TensorView<float>(ka.AsSpan(t * h * d, h * d).ToArray(), 1, h, d), new TensorView<float>(va.AsSpan(t * h * d, h * d).ToArray(), 1, h, d));
                    var qt = new TensorView<float>(qa.AsSpan(t * h * d, h * d).ToArray(), 1, h, d);
                    var options = new DecodeOptions { Scale = 0.125f };
                    DecodeAttention.Forward(qt, cache, seq, 0, dense, options);
                    var read = new IReadOnlyList<int>[h];
                    var tokenRead = new HashSet<int>[h];
                    ITokenSelectionPolicy? tokenPolicy = policy as ITokenSelectionPolicy;
                    if (tokenPolicy is not null)
                    {
                        // Read the tokens through a wrapper that records them (the step asks the policy once per head).
                        tokenPolicy = new DecodeBench.RecordingTokens(tokenPolicy, tokenRead);
                    }
                    DecodeAttention.Forward(qt, cache, seq, 0, sparse, options with { Policy = tokenPolicy ?? policy, OnPagesSelected = (hk, p) => read[hk] = p });
                    for (int head = 0; head < h; head++)
                    {
                        float[] scaled = qa.AsSpan((t * h + head) * d, d).ToArray().Select(x => x * 0.125f).ToArray();
                        var pages = new HashSet<int>(read[head]);   // what the step read (stateful policies must not be asked twice)
                        // Token policies read tokens, not whole pages: their recall counts exactly the tokens read.
                        HashSet<int>? tokensRead = policy is ITokenSelectionPolicy ? tokenRead[head] : null;
                        density[head] += (tokensRead is null ? (double)pages.Count / ((t + 64) / 64) : (double)tokensRead.Count / (t + 1)) / steps;
                        // Dense softmax mass over keys 0..t (keys as stored: f16-rounded).
                        double max = double.NegativeInfinity;
                        var sc = new double[t + 1];
                        for (int j = 0; j <= t; j++)
                        {
                            double dot = 0;
                            for (int c = 0; c < d; c++) dot += scaled[c] * (double)(float)(Half)ka[(j * h + head) * d + c];
                            sc[j] = dot;
                            max = Math.Max(max, dot);
                        }
                        double total = 0, kept = 0;
                        for (int j = 0; j <= t; j++)
                        {
                            double p = Math.Exp(sc[j] - max);
                            total += p;
                            if (tokensRead is null ? pages.Contains(j / 64) : tokensRead.Contains(j)) kept += p;
                        }
                        recall[head] += kept / total / steps;
                        double num = 0, den = 0;
                        for (int c = 0; c < d; c++)
                        {
                            double a = dense[0, head, c], b = sparse[0, head, c];
                            num += (a - b) * (a - b);
                            den += a * a;
                        }
                        error[head] += Math.Sqrt(num / Math.Max(den, 1e-30)) / steps;
                    }
                }
                double ms = sw.Elapsed.TotalMilliseconds / steps;
                string scan = policy is RetrievalPolicy rp ? $", keys scanned {rp.ScannedFraction:F3}" : "";
                for (int head = 0; head < h; head++)
                {
                    rows.Add(new BenchCommand.BenchRow("decode-real", $"layer {layer} head {head} {name}", DType.Float16, 1, h, h, s, d, true, 0, KernelPath.Auto,
                        ms, ms, ms, steps, 0, 0)
                    {
                        Density = density[head],
                        Note = $"recall {recall[head]:F3}, relative L2 error {error[head]:F3}, pages read {density[head]:F3}{scan} (means over the last {steps} steps)",
                    });
                }
            }
        }
        return rows;
    }
}
