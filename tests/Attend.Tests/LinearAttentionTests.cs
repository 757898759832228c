using Attend.Masks;
using Attend.Linear;
using Attend.Tensors;

namespace Attend.Tests;

public sealed class LinearAttentionTests
{
    public static TheoryData<string> Maps() => ["elu", "relu", "identity", "taylor", "random", "wavelet", "wavelet-weighted", "hashing", "hashing-given", "relu+conv"];

    // A fixed "learned" hash: 12 projections of D = 16 (d = 8 in the recurrent test takes the first half of each row).
    private static float[] GivenProjections(int d) => Enumerable.Range(0, 12 * d).Select(i => MathF.Sin(i * 0.7f + 0.3f)).ToArray();

    // SLAB's convolution over the values: K taps per channel, centred when non-causal (odd K).
    private static DepthwiseConv Conv(int dv, int kernel) =>
        new(Enumerable.Range(0, dv * kernel).Select(i => MathF.Cos(i * 0.37f) * 0.4f).ToArray(), kernel, Enumerable.Range(0, dv).Select(c => 0.01f * c).ToArray());

    private static LinearOptions Options(string map, bool causal) => map switch
    {
        "elu" => new LinearOptions { FeatureMap = FeatureMap.EluPlusOne, Causal = causal },
        "relu" => new LinearOptions { FeatureMap = FeatureMap.Relu, Causal = causal },
        "identity" => new LinearOptions { FeatureMap = FeatureMap.Identity, Causal = causal, Normalize = false },
        "taylor" => new LinearOptions { FeatureMap = FeatureMap.Taylor, Causal = causal },
        "random" => new LinearOptions { FeatureMap = FeatureMap.RandomFeatures(48, seed: 3), Causal = causal },
        "wavelet" => new LinearOptions { FeatureMap = FeatureMap.WaveletRandomFeatures(40, seed: 2), Causal = causal },
        "wavelet-weighted" => new LinearOptions { FeatureMap = FeatureMap.WaveletRandomFeatures(40, [1.2, 0.5, 0.8, 1.0, 0.3], seed: 2), Causal = causal },
        "hashing" => new LinearOptions { FeatureMap = FeatureMap.Hashing(24, seed: 5), Causal = causal },
        "hashing-given" => new LinearOptions { FeatureMap = FeatureMap.Hashing(GivenProjections(16), 12), Causal = causal },
        _ => new LinearOptions { FeatureMap = FeatureMap.Relu, Causal = causal, ValueConv = Conv(24, 5) },
    };

    private static double MaxRelativeError(TensorView<float> actual, double[] expected)
    {
        float[] a = actual.ToArray();
        double scale = Math.Max(1e-3, expected.Max(Math.Abs)), max = 0;
        for (int i = 0; i < a.Length; i++) max = Math.Max(max, Math.Abs(a[i] - expected[i]));
        return max / scale;
    }

    [Theory]
    [MemberData(nameof(Maps))]
    public void Should_match_the_quadratic_form_causal_and_not(string map)
    {
        int b = 2, s = 97, h = 2, hkv = 1, d = 16, dv = 24;
        TensorView<float> q = TestData.Random<float>(1, b, s, h, d, 0.5f), k = TestData.Random<float>(2, b, s, hkv, d, 0.5f);
        TensorView<float> v = TestData.Random<float>(3, b, s, hkv, dv);
        foreach (bool causal in new[] { false, true })
        {
            LinearOptions options = Options(map, causal);
            double[] expected = LinearReference.Forward(q, k, v, options);
            foreach (int chunk in new[] { 1, 7, 64, 128 })
            {
                var o = new TensorView<float>(new float[b * s * h * dv], b, s, h, dv);
                LinearAttention.Forward(q, k, v, o, options, new KernelTuning { ChunkSize = chunk });
                double err = MaxRelativeError(o, expected);
                Assert.True(err < 2e-5, $"{map} causal={causal} chunk={chunk}: relative error {err:E2}");
                if (!causal) break;
            }
        }
    }

    [Theory]
    [InlineData(1, 1, 1)]
    [InlineData(4, 64, 64)]
    [InlineData(7, 13, 97)]
    [InlineData(65, 40, 33)]
    public unsafe void Should_multiply_add_small_matrices_at_any_size(int m, int kk, int n)
    {
        // C += A·B with leading dimensions wider than the matrices, as the chunked kernel calls it.
        int lda = kk + 3, ldb = n + 5, ldc = n + 2;
        float[] a = TestData.Normal(m * lda, 1), b = TestData.Normal(kk * ldb, 2), c = TestData.Normal(m * ldc, 3);
        double[] expected = c.Select(x => (double)x).ToArray();
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
                for (int p = 0; p < kk; p++) expected[i * ldc + j] += (double)a[i * lda + p] * b[p * ldb + j];
        fixed (float* pa = a, pb = b, pc = c) Attend.Sparse.SmallGemm.MultiplyAdd(pa, lda, pb, ldb, pc, ldc, m, kk, n);
        for (int i = 0; i < c.Length; i++) Assert.True(Math.Abs(c[i] - expected[i]) < 1e-4 * Math.Sqrt(kk + 1), $"[{i / ldc}, {i % ldc}]: {c[i]} vs {expected[i]}");
    }

    [Fact]
    public void Should_apply_per_head_decay()
    {
        int s = 70, h = 3, d = 8;
        TensorView<float> q = TestData.Random<float>(4, 1, s, h, d), k = TestData.Random<float>(5, 1, s, h, d), v = TestData.Random<float>(6, 1, s, h, d);
        var options = new LinearOptions { Causal = true, Decay = [1f, 0.9f, 0.5f] };
        double[] expected = LinearReference.Forward(q, k, v, options);
        var o = new TensorView<float>(new float[s * h * d], 1, s, h, d);
        LinearAttention.Forward(q, k, v, o, options, new KernelTuning { ChunkSize = 16 });
        Assert.True(MaxRelativeError(o, expected) < 2e-5);
    }

    [Theory]
    [MemberData(nameof(Maps))]
    public void Should_step_recurrently_to_the_chunked_result_and_survive_a_save(string map)
    {
        int s = 50, h = 2, d = 8, dv = 12;
        LinearOptions options = map switch
        {
            "wavelet-weighted" => new LinearOptions { FeatureMap = FeatureMap.WaveletRandomFeatures(40, [1.2, 0.5, 0.8, 0.3], seed: 2) },
            "hashing-given" => new LinearOptions { FeatureMap = FeatureMap.Hashing(GivenProjections(8), 12) },
            "relu+conv" => new LinearOptions { FeatureMap = FeatureMap.Relu, ValueConv = Conv(dv, 4) },
            _ => Options(map, causal: true),
        };
        options = options with { Causal = true, Decay = [1f, 0.8f] };
        TensorView<float> q = TestData.Random<float>(7, 1, s, h, d, 0.5f), k = TestData.Random<float>(8, 1, s, h, d, 0.5f), v = TestData.Random<float>(9, 1, s, h, dv);
        var o = new TensorView<float>(new float[s * h * dv], 1, s, h, dv);
        LinearAttention.Forward(q, k, v, o, options, new KernelTuning { ChunkSize = 16 });
        var state = new LinearState(h, d, dv, options);
        var step = new float[h * dv];
        float[] qa = q.ToArray(), ka = k.ToArray(), va = v.ToArray(), oa = o.ToArray();
        for (int t = 0; t < s; t++)
        {
            if (t == 25)
            {
                // Serialize mid-sequence and continue from the copy.
                using var ms = new MemoryStream();
                state.Save(ms);
                ms.Position = 0;
                state = LinearState.Load(ms, options);
                Assert.Equal(25, state.Tokens);
            }
            state.Step(qa.AsSpan(t * h * d, h * d), ka.AsSpan(t * h * d, h * d), va.AsSpan(t * h * dv, h * dv), step);
            for (int i = 0; i < h * dv; i++)
            {
                float expected = oa[t * h * dv + i];
                Assert.True(Math.Abs(step[i] - expected) <= 1e-4 * Math.Max(1, Math.Abs(expected)), $"{map} t={t} i={i}: {step[i]} vs {expected}");
            }
        }
    }

    [Fact]
    public void Should_reject_bad_linear_input()
    {
        TensorView<float> x = TestData.Random<float>(1, 1, 8, 2, 4);
        var o = new TensorView<float>(new float[64], 1, 8, 2, 4);
        Assert.Throws<ArgumentOutOfRangeException>(() => FeatureMap.RandomFeatures(0));
        Assert.Throws<ArgumentOutOfRangeException>(() => FeatureMap.Hashing(0));
        Assert.Contains("(0, 1]", Assert.Throws<ArgumentException>(() => LinearAttention.Forward(x, x, x, o, new LinearOptions { Causal = true, Decay = [float.NaN, 1f] })).Message);
        Assert.Contains("one γ per head", Assert.Throws<ArgumentException>(() => LinearAttention.Forward(x, x, x, o, new LinearOptions { Causal = true, Decay = [1f] })).Message);
        Assert.Contains("ChunkSize", Assert.Throws<ArgumentException>(() => LinearAttention.Forward(x, x, x, o, new LinearOptions { Causal = true }, new KernelTuning { ChunkSize = 0 })).Message);
        var state = new LinearState(2, 4, 4);
        Assert.Throws<ArgumentException>(() => state.Step(new float[7], new float[8], new float[8], new float[8]));
        using var ms = new MemoryStream();
        state.Save(ms);
        var truncated = new MemoryStream(ms.ToArray()[..20]);
        Assert.Throws<InvalidDataException>(() => LinearState.Load(truncated, new LinearOptions { Causal = true }));
        ms.Position = 0;
        Assert.Contains("value convolution", Assert.Throws<InvalidDataException>(() => LinearState.Load(ms, new LinearOptions { ValueConv = Conv(4, 3) })).Message);

        // SLAB's convolution: weights [Dv, K], bias [Dv], odd kernel when centred, Sq = Skv.
        Assert.Contains("[Dv=4, K=3]", Assert.Throws<ArgumentException>(() => LinearAttention.Forward(x, x, x, o, new LinearOptions { ValueConv = new DepthwiseConv(new float[11], 3) })).Message);
        Assert.Contains("odd kernel", Assert.Throws<ArgumentException>(() => LinearAttention.Forward(x, x, x, o, new LinearOptions { ValueConv = Conv(4, 2) })).Message);
        Assert.Contains("Bias", Assert.Throws<ArgumentException>(() => LinearAttention.Forward(x, x, x, o, new LinearOptions { ValueConv = new DepthwiseConv(new float[12], 3, new float[3]) })).Message);
        Assert.Contains("Kernel", Assert.Throws<ArgumentException>(() => LinearAttention.Forward(x, x, x, o, new LinearOptions { Causal = true, ValueConv = new DepthwiseConv([], 0) })).Message);
        TensorView<float> shortKv = TestData.Random<float>(2, 1, 6, 2, 4);
        Assert.Contains("Sq = Skv", Assert.Throws<ArgumentException>(() => LinearAttention.Forward(x, shortKv, shortKv, o, new LinearOptions { ValueConv = Conv(4, 3) })).Message);
        // Maps that cannot take this head dim say so.
        Assert.Contains("3 weights are needed", Assert.Throws<ArgumentException>(() => LinearAttention.Forward(x, x, x, o, new LinearOptions { FeatureMap = FeatureMap.WaveletRandomFeatures(8, [1.0, 1.0]) })).Message);
        Assert.Throws<ArgumentException>(() => FeatureMap.WaveletRandomFeatures(8, [double.NaN]));
        Assert.Contains("head dim is 4", Assert.Throws<ArgumentException>(() => LinearAttention.Forward(x, x, x, o, new LinearOptions { FeatureMap = FeatureMap.Hashing(new float[10], 2) })).Message);
        Assert.Throws<ArgumentException>(() => FeatureMap.Hashing(new float[7], 2));
    }

    [Fact]
    public void Should_load_a_state_saved_in_the_first_format()
    {
        // attend.linear-state/1: sizes, token count, state and normalizer, no convolution history.
        using var ms = new MemoryStream();
        using (var w = new BinaryWriter(ms, System.Text.Encoding.UTF8, leaveOpen: true))
        {
            w.Write("attend.linear-state/1");
            w.Write(1); w.Write(2); w.Write(2); w.Write(2); w.Write(7L);
            foreach (float x in new[] { 1f, 2f, 3f, 4f, 0.5f, 0.25f }) w.Write(x);
        }
        ms.Position = 0;
        LinearState state = LinearState.Load(ms, new LinearOptions { FeatureMap = FeatureMap.Relu, Causal = true, Normalize = false });
        Assert.Equal(7, state.Tokens);
        var o = new float[2];
        state.Step([1f, 0f], [0f, 0f], [0f, 0f], o);          // φ(k) = 0: the output reads the loaded state's first row
        Assert.Equal([1f, 2f], o);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Should_add_the_convolved_values_to_the_attention_output(bool causal)
    {
        // K = 3 with only the tap on the current token (centred: index 1; causal: index 2) set to 2: o = attention + 2·v_t.
        int s = 33, h = 2, d = 8, dv = 5;
        TensorView<float> q = TestData.Random<float>(1, 1, s, h, d), k = TestData.Random<float>(2, 1, s, 1, d), v = TestData.Random<float>(3, 1, s, 1, dv);
        var weights = new float[dv * 3];
        for (int c = 0; c < dv; c++) weights[c * 3 + (causal ? 2 : 1)] = 2f;
        var plain = new TensorView<float>(new float[s * h * dv], 1, s, h, dv);
        var withConv = new TensorView<float>(new float[s * h * dv], 1, s, h, dv);
        LinearAttention.Forward(q, k, v, plain, new LinearOptions { FeatureMap = FeatureMap.Relu, Causal = causal });
        LinearAttention.Forward(q, k, v, withConv, new LinearOptions { FeatureMap = FeatureMap.Relu, Causal = causal, ValueConv = new DepthwiseConv(weights, 3) });
        for (int t = 0; t < s; t++)
            for (int hh = 0; hh < h; hh++)
                for (int c = 0; c < dv; c++) Assert.Equal(plain[0, t, hh, c] + 2 * v[0, t, 0, c], withConv[0, t, hh, c], 5);
    }

    [Theory]
    [InlineData("random")]
    [InlineData("wavelet")]
    public void Should_estimate_the_softmax_kernel_without_bias(string map)
    {
        // Positive random features promise E[φ(q)·φ(k)] = exp(q·k/√D); with m = 16384 features the estimate of one pair
        // has a relative standard deviation of about √((e^{|q+k|²/√D}·… ) / m) ≈ 1–2% for these norms: assert 6%.
        int d = 16;
        FeatureMap f = map == "random" ? FeatureMap.RandomFeatures(16384, seed: 11) : FeatureMap.WaveletRandomFeatures(16384, seed: 11);
        var rng = new Random(4);
        for (int trial = 0; trial < 5; trial++)
        {
            float[] qv = Enumerable.Range(0, d).Select(_ => (float)(rng.NextDouble() - 0.5)).ToArray();
            float[] kv = Enumerable.Range(0, d).Select(_ => (float)(rng.NextDouble() - 0.5)).ToArray();
            var pq = new float[16384];
            var pk = new float[16384];
            f.Apply(qv, pq, true);
            f.Apply(kv, pk, false);
            double estimate = pq.Zip(pk).Sum(p => (double)p.First * p.Second);
            double exact = Math.Exp(qv.Zip(kv).Sum(p => (double)p.First * p.Second) / Math.Sqrt(d));
            Assert.True(Math.Abs(estimate / exact - 1) < 0.06, $"{map} trial {trial}: {estimate} vs {exact}");
        }
    }

    [Fact]
    public void Should_weight_haar_scales_and_hash_with_given_projections()
    {
        // One Haar level on D = 2: coefficients ((a+b)/√2 · w_approx, (a−b)/√2 · w_detail). Weights (detail 0, approximation
        // 1) make φ depend only on a + b.
        FeatureMap gated = FeatureMap.WaveletRandomFeatures(64, [0.0, 1.0], seed: 1);
        var p1 = new float[64];
        var p2 = new float[64];
        gated.Apply([0.3f, 0.5f], p1, true);
        gated.Apply([0.5f, 0.3f], p2, true);
        for (int i = 0; i < 64; i++) Assert.Equal(p1[i], p2[i], 6);
        gated.Apply([0.1f, 0.5f], p2, true);
        Assert.NotEqual(p1[0], p2[0]);

        // Given projections = the coordinate axes: bits are the signs of x, φ(q)·φ(k) = share of agreeing signs.
        float[] axes = [1, 0, 0, 0, 1, 0, 0, 0, 1];
        FeatureMap hash = FeatureMap.Hashing(axes, 3);
        var hq = new double[4];
        var hk = new double[4];
        hash.Apply<double>([0.5, -2, 1], hq, true);
        hash.Apply<double>([3, -1, -1], hk, false);
        Assert.Equal(2.0 / 3.0, hq.Zip(hk).Sum(p => p.First * p.Second), 12);
    }
}

public sealed class AarenTests
{
    [Theory]
    [InlineData(1)]
    [InlineData(7)]
    [InlineData(64)]
    public void Should_scan_to_the_sequential_recurrence_and_the_direct_formula(int chunk)
    {
        int b = 2, s = 101, h = 3, d = 8, dv = 5;
        var query = new TensorView<float>(TestData.Normal(h * d, 1), h, d);
        TensorView<float> k = TestData.Random<float>(2, b, s, h, d, 2f), v = TestData.Random<float>(3, b, s, h, dv);
        var o = new TensorView<float>(new float[b * s * h * dv], b, s, h, dv);
        Aaren.Forward(query, k, v, o, tuning: new KernelTuning { ChunkSize = chunk, Threads = 2 });
        float scale = 1f / MathF.Sqrt(d);
        for (int bi = 0; bi < b; bi++)
        {
            var state = new AarenState(query.ToArray(), h, dv);
            var step = new float[h * dv];
            for (int t = 0; t < s; t++)
            {
                float[] kt = new float[h * d], vt = new float[h * dv];
                for (int hh = 0; hh < h; hh++)
                {
                    for (int c = 0; c < d; c++) kt[hh * d + c] = k[bi, t, hh, c];
                    for (int c = 0; c < dv; c++) vt[hh * dv + c] = v[bi, t, hh, c];
                }
                state.Step(kt, vt, step);
                for (int hh = 0; hh < h; hh++)
                {
                    // Direct softmax over the prefix, in float64.
                    var scores = Enumerable.Range(0, t + 1).Select(j => (double)scale * Enumerable.Range(0, d).Sum(c => (double)query[hh, c] * k[bi, j, hh, c])).ToArray();
                    double max = scores.Max(), sum = scores.Sum(x => Math.Exp(x - max));
                    for (int c = 0; c < dv; c++)
                    {
                        double direct = Enumerable.Range(0, t + 1).Sum(j => Math.Exp(scores[j] - max) * v[bi, j, hh, c]) / sum;
                        Assert.True(Math.Abs(o[bi, t, hh, c] - direct) < 2e-5, $"scan t={t} h={hh}: {o[bi, t, hh, c]} vs {direct}");
                        Assert.True(Math.Abs(step[hh * dv + c] - direct) < 2e-5, $"recurrence t={t} h={hh}: {step[hh * dv + c]} vs {direct}");
                    }
                }
            }
        }
    }

    [Fact]
    public void Should_reject_bad_aaren_input()
    {
        TensorView<float> k = TestData.Random<float>(1, 1, 8, 2, 4), v = TestData.Random<float>(2, 1, 8, 2, 3);
        var o = new TensorView<float>(new float[48], 1, 8, 2, 3);
        Assert.Equal("query", Assert.Throws<ArgumentException>(() => Aaren.Forward(new TensorView<float>(new float[12], 3, 4), k, v, o)).ParamName);
        Assert.Contains("ChunkSize", Assert.Throws<ArgumentException>(() => Aaren.Forward(new TensorView<float>(new float[8], 2, 4), k, v, o, tuning: new KernelTuning { ChunkSize = 0 })).Message);
        Assert.Throws<ArgumentException>(() => new AarenState(new float[7], 2, 3));
    }
}

public sealed class BasedTests
{
    [Fact]
    public void Should_equal_exact_softmax_when_the_window_covers_the_sequence()
    {
        int s = 70, h = 2, d = 16;
        TensorView<float> q = TestData.Random<float>(1, 1, s, h, d), k = TestData.Random<float>(2, 1, s, h, d), v = TestData.Random<float>(3, 1, s, h, d);
        var o = new TensorView<float>(new float[s * h * d], 1, s, h, d);
        Hybrids.Based(q, k, v, o, window: s);
        var exact = Attend.Reference.AttentionReference.Forward(q, k, v, new AttentionOptions { Causal = true });
        Assert.True(TestData.MaxError(o, exact) < 2e-6);
    }

    [Fact]
    public void Should_match_the_float64_hybrid_formula_with_a_short_window()
    {
        int s = 60, h = 2, d = 8, window = 9;
        TensorView<float> q = TestData.Random<float>(4, 1, s, h, d, 0.7f), k = TestData.Random<float>(5, 1, s, h, d, 0.7f), v = TestData.Random<float>(6, 1, s, h, d);
        foreach (int chunk in new[] { 7, 64 })
        {
            var o = new TensorView<float>(new float[s * h * d], 1, s, h, d);
            Hybrids.Based(q, k, v, o, window, new KernelTuning { ChunkSize = chunk });
            CheckBased(q, k, v, o, window);
        }
    }

    private static void CheckBased(TensorView<float> q, TensorView<float> k, TensorView<float> v, TensorView<float> o, int window)
    {
        int s = q.Shape[1], h = q.Shape[2], d = q.Shape[3];
        double scale = 1 / Math.Sqrt(d);
        for (int hh = 0; hh < h; hh++)
            for (int i = 0; i < s; i++)
            {
                var phiQ = new double[1 + d + d * d];
                FeatureMap.Taylor.Apply<double>(Enumerable.Range(0, d).Select(c => (double)q[0, i, hh, c]).ToArray(), phiQ, true);
                double den = 0;
                var num = new double[d];
                for (int j = 0; j <= i; j++)
                {
                    double w;
                    if (j > i - window) w = Math.Exp(scale * Enumerable.Range(0, d).Sum(c => (double)q[0, i, hh, c] * k[0, j, hh, c]));
                    else
                    {
                        var phiK = new double[phiQ.Length];
                        FeatureMap.Taylor.Apply<double>(Enumerable.Range(0, d).Select(c => (double)k[0, j, hh, c]).ToArray(), phiK, false);
                        w = phiQ.Zip(phiK).Sum(p => p.First * p.Second);
                    }
                    den += w;
                    for (int c = 0; c < d; c++) num[c] += w * v[0, j, hh, c];
                }
                for (int c = 0; c < d; c++) Assert.True(Math.Abs(o[0, i, hh, c] - num[c] / den) < 5e-5, $"i={i} h={hh} c={c}: {o[0, i, hh, c]} vs {num[c] / den}");
            }
    }
}

public sealed class AgentAttentionTests
{
    [Fact]
    public void Should_equal_the_two_softmax_products_with_pooled_agents()
    {
        int s = 40, h = 2, d = 8, n = 6;
        TensorView<float> q = TestData.Random<float>(1, 1, s, h, d), k = TestData.Random<float>(2, 1, 50, h, d), v = TestData.Random<float>(3, 1, 50, h, 5);
        var o = new TensorView<float>(new float[s * h * 5], 1, s, h, 5);
        Hybrids.AgentAttention(q, k, v, o, n);
        double scale = 1 / Math.Sqrt(d);
        for (int hh = 0; hh < h; hh++)
        {
            var agents = new double[n, d];
            for (int a = 0; a < n; a++)
            {
                int start = a * s / n, end = (a + 1) * s / n;
                for (int t = start; t < end; t++) for (int c = 0; c < d; c++) agents[a, c] += (double)q[0, t, hh, c] / (end - start);
            }
            var gathered = new double[n, 5];
            for (int a = 0; a < n; a++)
            {
                double[] w = Enumerable.Range(0, 50).Select(j => Math.Exp(scale * Enumerable.Range(0, d).Sum(c => agents[a, c] * k[0, j, hh, c]))).ToArray();
                for (int c = 0; c < 5; c++) gathered[a, c] = Enumerable.Range(0, 50).Sum(j => w[j] * v[0, j, hh, c]) / w.Sum();
            }
            for (int i = 0; i < s; i++)
            {
                double[] w = Enumerable.Range(0, n).Select(a => Math.Exp(scale * Enumerable.Range(0, d).Sum(c => (double)q[0, i, hh, c] * agents[a, c]))).ToArray();
                for (int c = 0; c < 5; c++)
                {
                    double expected = Enumerable.Range(0, n).Sum(a => w[a] * gathered[a, c]) / w.Sum();
                    Assert.True(Math.Abs(o[0, i, hh, c] - expected) < 1e-5, $"i={i} h={hh} c={c}: {o[0, i, hh, c]} vs {expected}");
                }
            }
        }
        Assert.Throws<ArgumentOutOfRangeException>(() => Hybrids.AgentAttention(q, k, v, o, 0));
    }
}

public sealed class ScoutTests
{
    [Theory]
    [InlineData(97, 16, 8)]
    [InlineData(130, 40, 13)]
    public void Should_attend_the_window_and_older_segment_summaries(int s, int window, int segment)
    {
        int h = 2, hkv = 1, d = 8, dv = 6;
        TensorView<float> q = TestData.Random<float>(1, 1, s, h, d), k = TestData.Random<float>(2, 1, s, hkv, d), v = TestData.Random<float>(3, 1, s, hkv, dv);
        var o = new TensorView<float>(new float[s * h * dv], 1, s, h, dv);
        Hybrids.Scout(q, k, v, o, window, segment, tuning: new KernelTuning { Path = KernelPath.Vector256 });
        double scale = 1 / Math.Sqrt(d);
        int segments = s / segment;
        var meanK = new double[segments, d];
        var meanV = new double[segments, dv];
        for (int j = 0; j < segments * segment; j++)
        {
            for (int c = 0; c < d; c++) meanK[j / segment, c] += (double)k[0, j, 0, c] / segment;
            for (int c = 0; c < dv; c++) meanV[j / segment, c] += (double)v[0, j, 0, c] / segment;
        }
        bool sawSummaries = false;
        for (int hh = 0; hh < h; hh++)
            for (int i = 0; i < s; i++)
            {
                var scores = new List<(double Score, Func<int, double> Value)>();
                for (int j = Math.Max(0, i - window + 1); j <= i; j++)
                {
                    int jj = j;
                    scores.Add((scale * Enumerable.Range(0, d).Sum(c => (double)q[0, i, hh, c] * k[0, jj, 0, c]), c => v[0, jj, 0, c]));
                }
                int visible = Math.Max(0, (i - window + 1) / segment);
                for (int g = 0; g < Math.Min(visible, segments); g++)
                {
                    int gg = g;
                    scores.Add((scale * Enumerable.Range(0, d).Sum(c => q[0, i, hh, c] * meanK[gg, c]), c => meanV[gg, c]));
                    sawSummaries = true;
                }
                double max = scores.Max(x => x.Score), sum = scores.Sum(x => Math.Exp(x.Score - max));
                for (int c = 0; c < dv; c++)
                {
                    double expected = scores.Sum(x => Math.Exp(x.Score - max) * x.Value(c)) / sum;
                    Assert.True(Math.Abs(o[0, i, hh, c] - expected) < 2e-6, $"i={i} h={hh} c={c}: {o[0, i, hh, c]} vs {expected}");
                }
            }
        Assert.True(sawSummaries);
    }
}

public sealed class MossFormerTests
{
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Should_sum_chunk_softmax_and_global_linear_attention(bool causal)
    {
        int s = 75, h = 2, d = 8, chunk = 16;
        TensorView<float> q = TestData.Random<float>(1, 1, s, h, d, 0.6f), k = TestData.Random<float>(2, 1, s, h, d, 0.6f), v = TestData.Random<float>(3, 1, s, h, d);
        var o = new TensorView<float>(new float[s * h * d], 1, s, h, d);
        Hybrids.MossFormer(q, k, v, o, chunk, causal);
        int[] ids = Enumerable.Range(0, s).Select(i => i / chunk).ToArray();
        var local = Attend.Reference.AttentionReference.Forward(q, k, v, new AttentionOptions { Mask = causal ? Mask.Document(ids) & Mask.Causal : Mask.Document(ids) });
        double[] global = LinearReference.Forward(q, k, v, new LinearOptions { Causal = causal });
        for (int i = 0; i < s; i++)
            for (int hh = 0; hh < h; hh++)
                for (int c = 0; c < d; c++)
                {
                    double expected = local.At(0, i, hh, c) + global[((i * h) + hh) * d + c];
                    Assert.True(Math.Abs(o[0, i, hh, c] - expected) < 1e-5, $"i={i} h={hh} c={c}: {o[0, i, hh, c]} vs {expected}");
                }
    }
}

public sealed class LinearInfSATests
{
    /// <summary>The authors' formula in float64: q̄ from |q|-weighted queries, a = ReLU(q̄·K/√D)/Σ, output ρ·Σ a v on every row.</summary>
    private static double[,] Pooled(TensorView<float> q, TensorView<float> k, TensorView<float> v, int h, int hk, double rho, out double[] a)
    {
        int sq = q.Shape[1], skv = k.Shape[1], d = q.Shape[3], dv = v.Shape[3];
        double scale = 1 / Math.Sqrt(d), energySum = 0;
        var qBar = new double[d];
        for (int t = 0; t < sq; t++)
        {
            double e = Math.Sqrt(Enumerable.Range(0, d).Sum(c => (double)q[0, t, h, c] * q[0, t, h, c])) * scale;
            energySum += e;
            for (int c = 0; c < d; c++) qBar[c] += e * q[0, t, h, c] * scale;
        }
        for (int c = 0; c < d; c++) qBar[c] /= energySum + 1e-6;
        double[] w = Enumerable.Range(0, skv).Select(j => Math.Max(0, Enumerable.Range(0, d).Sum(c => qBar[c] * k[0, j, hk, c] * scale))).ToArray();
        double mass = w.Sum() + 1e-6;
        for (int j = 0; j < skv; j++) w[j] /= mass;
        var o = new double[1, dv];
        for (int c = 0; c < dv; c++) o[0, c] = rho * Enumerable.Range(0, skv).Sum(j => w[j] * v[0, j, hk, c]);
        a = w;
        return o;
    }

    [Fact]
    public void Should_pool_values_by_the_approximate_principal_eigenvector()
    {
        int sq = 57, skv = 97, h = 4, hkv = 2, d = 40, dv = 24;
        TensorView<float> q = TestData.Random<float>(1, 1, sq, h, d), k = TestData.Random<float>(2, 1, skv, hkv, d), v = TestData.Random<float>(3, 1, skv, hkv, dv);
        var o = new TensorView<float>(new float[sq * h * dv], 1, sq, h, dv);
        Hybrids.LinearInfSA(q, k, v, o, rho: 0.9);
        for (int hh = 0; hh < h; hh++)
        {
            double[,] expected = Pooled(q, k, v, hh, hh / 2, 0.9, out _);
            for (int i = 0; i < sq; i++)
                for (int c = 0; c < dv; c++) Assert.True(Math.Abs(o[0, i, hh, c] - expected[0, c]) < 1e-5, $"h={hh} i={i} c={c}: {o[0, i, hh, c]} vs {expected[0, c]}");
        }
    }

    [Fact]
    public void Should_track_the_centrality_of_tokens_sharing_a_direction()
    {
        // Tokens around a shared direction (the regime the paper reports, cosine 0.985 on a trained ViT): the weights a
        // are one power-iteration step of the left Perron vector of A = ReLU(Q·Kᵀ/D); compare with the converged vector.
        int s = 128, d = 32;
        var rng = new Random(9);
        float[] mu = Enumerable.Range(0, d).Select(_ => (float)Gaussian(rng)).ToArray();
        TensorView<float> Make(int seed)
        {
            var r = new Random(seed);
            var data = new float[s * d];
            for (int t = 0; t < s; t++) for (int c = 0; c < d; c++) data[t * d + c] = mu[c] + (float)Gaussian(r) * 0.8f;
            return new TensorView<float>(data, 1, s, 1, d);
        }
        TensorView<float> q = Make(1), k = Make(2), v = TestData.Random<float>(3, 1, s, 1, 8);
        Pooled(q, k, v, 0, 0, 1, out double[] a);
        var A = new double[s, s];
        for (int i = 0; i < s; i++)
            for (int j = 0; j < s; j++) A[i, j] = Math.Max(0, Enumerable.Range(0, d).Sum(c => (double)q[0, i, 0, c] * k[0, j, 0, c]) / d);
        var x = Enumerable.Repeat(1.0, s).ToArray();
        for (int it = 0; it < 200; it++)
        {
            var y = new double[s];
            for (int i = 0; i < s; i++) for (int j = 0; j < s; j++) y[j] += x[i] * A[i, j];
            double norm = Math.Sqrt(y.Sum(z => z * z));
            x = y.Select(z => z / norm).ToArray();
        }
        double cosine = a.Zip(x).Sum(p => p.First * p.Second) / Math.Sqrt(a.Sum(z => z * z) * x.Sum(z => z * z));
        Assert.True(cosine > 0.98, $"cosine to the Perron vector {cosine:F4}");
    }

    private static double Gaussian(Random r) => Math.Sqrt(-2 * Math.Log(1 - r.NextDouble())) * Math.Cos(2 * Math.PI * r.NextDouble());
}

public sealed class HybridBadInputTests
{
    [Fact]
    public void Should_reject_bad_hybrid_parameters_and_shapes()
    {
        TensorView<float> x = TestData.Random<float>(1, 1, 16, 2, 8), shortKv = TestData.Random<float>(2, 1, 12, 2, 8);
        var o = new TensorView<float>(new float[16 * 2 * 8], 1, 16, 2, 8);
        Assert.Throws<ArgumentOutOfRangeException>(() => Hybrids.Based(x, x, x, o, window: 0));
        Assert.Contains("Sq = Skv", Assert.Throws<ArgumentException>(() => Hybrids.Based(x, shortKv, shortKv, o, 4)).Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => Hybrids.Scout(x, x, x, o, window: 4, segment: 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => Hybrids.Scout(x, x, x, o, window: 0, segment: 4));
        Assert.Contains("Sq = Skv", Assert.Throws<ArgumentException>(() => Hybrids.Scout(x, shortKv, shortKv, o, 4, 4)).Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => Hybrids.MossFormer(x, x, x, o, chunk: 0));
        var wrongOut = new TensorView<float>(new float[16 * 2 * 7], 1, 16, 2, 7);
        Assert.Equal("output", Assert.ThrowsAny<ArgumentException>(() => Hybrids.MossFormer(x, x, x, wrongOut, 4)).ParamName);
        Assert.Equal("output", Assert.ThrowsAny<ArgumentException>(() => Hybrids.AgentAttention(x, x, x, wrongOut, 4)).ParamName);
        Assert.Equal("output", Assert.ThrowsAny<ArgumentException>(() => Hybrids.LinearInfSA(x, x, x, wrongOut)).ParamName);
        Assert.Throws<ArgumentOutOfRangeException>(() => Hybrids.LinearInfSA(x, x, x, o, rho: double.NaN));
    }
}
