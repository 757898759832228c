using Attend.Reference;
using Attend.Tensors;

namespace Attend.Tests;

public sealed class DenseAttentionTests
{
    private static readonly KernelPath[] Paths = [KernelPath.Scalar, KernelPath.Vector128, KernelPath.Vector256, KernelPath.Vector512];

    public static TheoryData<int, int, int, int, int, int, bool> Shapes() => AttentionConformance.Shapes();

    [Theory]
    [MemberData(nameof(Shapes))]
    public void Should_match_reference_on_every_path_in_f32(int b, int sq, int skv, int h, int hkv, int d, bool causal) =>
        CheckAllPaths<float>(b, sq, skv, h, hkv, d, new AttentionOptions { Causal = causal }, Paths);

    [Theory]
    [MemberData(nameof(Shapes))]
    public void Should_match_reference_in_bf16(int b, int sq, int skv, int h, int hkv, int d, bool causal) =>
        CheckAllPaths<BFloat16>(b, sq, skv, h, hkv, d, new AttentionOptions { Causal = causal }, [KernelPath.Auto, KernelPath.Scalar]);

    [Theory]
    [MemberData(nameof(Shapes))]
    public void Should_match_reference_in_f16(int b, int sq, int skv, int h, int hkv, int d, bool causal) =>
        CheckAllPaths<Half>(b, sq, skv, h, hkv, d, new AttentionOptions { Causal = causal }, [KernelPath.Auto, KernelPath.Vector256]);

    /// <summary>
    /// Head dims that are neither below 8 nor a multiple of it: the f32 key pack transposes whole 8-channel tiles and
    /// copies the remaining channels one by one (full 64-key panels and a partial last one).
    /// </summary>
    [Theory]
    [InlineData(12)]
    [InlineData(20)]
    [InlineData(36)]
    public void Should_match_reference_with_head_dims_between_tiles(int d) =>
        CheckAllPaths<float>(1, 97, 150, 2, 1, d, new AttentionOptions { Causal = true }, Paths);

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Should_match_reference_with_softcap_alibi_and_bias(bool causal)
    {
        int b = 2, s = 97, h = 4, d = 64;
        float[] biasData = TestData.Normal((long)b * h * s * 130, 99);
        var options = new AttentionOptions
        {
            Causal = causal,
            Softcap = 2.5f,
            Scale = 0.3f,
            AlibiSlopes = [0.5f, 0.25f, 0.125f, 0.0625f],
            Bias = new TensorView<float>(biasData, b, h, s, 130),
        };
        CheckAllPaths<float>(b, s, 130, h, 2, d, options, Paths);
        CheckAllPaths<BFloat16>(b, s, 130, h, 2, d, options, [KernelPath.Auto]);
    }

    [Fact]
    public void Should_match_reference_with_a_predicate_mask()
    {
        var options = new AttentionOptions { Predicate = (b, h, q, kv) => (q + kv + h) % 3 != 0 || kv == 0 };
        CheckAllPaths<float>(1, 70, 150, 2, 1, 32, options, Paths);
    }

    [Fact]
    public void Should_accept_any_stride_permutation()
    {
        // A [B, H, S, D] buffer seen heads-last, and a [S, B, D, H] one: same numbers, other strides.
        int b = 2, s = 33, h = 3, d = 24;
        TensorView<float> q = TestData.Random<float>(1, b, s, h, d), k = TestData.Random<float>(2, b, s, h, d), v = TestData.Random<float>(3, b, s, h, d);
        TensorView<float> qp = Relayout(q, [0, 2, 1, 3]), kp = Relayout(k, [1, 0, 3, 2]), vp = Relayout(v, [3, 2, 1, 0]);
        var expected = new float[b * s * h * d];
        var actual = new float[b * s * h * d];
        Attention.Forward(q, k, v, new TensorView<float>(expected, b, s, h, d), new AttentionOptions { Causal = true });
        TensorView<float> back = PermutedView(actual, [b, s, h, d], [2, 0, 3, 1]);
        Attention.Forward(qp, kp, vp, back, new AttentionOptions { Causal = true });
        for (int i = 0; i < b; i++)
            for (int j = 0; j < s; j++)
                for (int x = 0; x < h; x++)
                    for (int y = 0; y < d; y++)
                        Assert.Equal(expected[(((i * s) + j) * h + x) * d + y], back[i, j, x, y], 5);
    }

    [Fact]
    public void Should_give_zero_output_and_minus_infinity_lse_for_fully_masked_rows()
    {
        // Causal with Sq > Skv: the first Sq − Skv rows see no key.
        int sq = 20, skv = 5;
        TensorView<float> q = TestData.Random<float>(1, 1, sq, 2, 16), k = TestData.Random<float>(2, 1, skv, 2, 16), v = TestData.Random<float>(3, 1, skv, 2, 16);
        var o = new TensorView<float>(new float[sq * 2 * 16], 1, sq, 2, 16);
        var lse = new TensorView<float>(new float[sq * 2], 1, sq, 2);
        foreach (KernelPath path in Paths)
        {
            Attention.Forward(q, k, v, o, new AttentionOptions { Causal = true }, lse, new KernelTuning { Path = path });
            for (int i = 0; i < sq - skv; i++)
                for (int h = 0; h < 2; h++)
                {
                    Assert.True(float.IsNegativeInfinity(lse[0, i, h]), $"{path}: row {i} lse {lse[0, i, h]}");
                    for (int d = 0; d < 16; d++) Assert.Equal(0f, o[0, i, h, d]);
                }
            Assert.True(float.IsFinite(lse[0, sq - 1, 0]));
        }
    }

    [Fact]
    public void Should_keep_nan_in_its_query_row_and_value_column_consumers()
    {
        int s = 70, d = 16;
        float[] qd = TestData.Normal(s * d, 1), kd = TestData.Normal(s * d, 2), vd = TestData.Normal(s * d, 3);
        qd[5 * d + 3] = float.NaN;          // query row 5
        vd[40 * d + 2] = float.NaN;         // value of key 40: causal rows ≥ 40 attend to it
        foreach ((KernelPath path, TensorView<float> o) in CausalOnEveryPath(qd, kd, vd, s, d))
        {
            for (int i = 0; i < s; i++)
            {
                bool expectNan = i == 5 || i >= 40;
                for (int c = 0; c < d; c++)
                {
                    bool nan = float.IsNaN(o[0, i, 0, c]);
                    // A NaN value element poisons only its own column; a NaN query poisons its whole row.
                    bool expected = i == 5 || (i >= 40 && c == 2);
                    Assert.True(nan == expected, $"{path}: row {i} col {c} NaN={nan}, expected {expected} ({expectNan})");
                }
            }
        }
    }

    /// <summary>
    /// An infinite value reaches only the rows that attend to it (the packed panel's NaN/Inf flag, computed by the f32
    /// pack's vector check, makes the kernel skip zero weights there), in a full panel of 64 keys and a partial last one.
    /// </summary>
    [Fact]
    public void Should_keep_an_infinite_value_in_the_rows_that_attend_to_it()
    {
        int s = 97, d = 16;
        float[] qd = TestData.Normal(s * d, 4), kd = TestData.Normal(s * d, 5), vd = TestData.Normal(s * d, 6);
        vd[40 * d + 2] = float.PositiveInfinity;    // first panel (keys 0–63)
        vd[90 * d + 7] = float.NegativeInfinity;    // partial last panel (keys 64–96)
        foreach ((KernelPath path, TensorView<float> o) in CausalOnEveryPath(qd, kd, vd, s, d))
        {
            for (int i = 0; i < s; i++)
                for (int c = 0; c < d; c++)
                {
                    bool touched = (i >= 40 && c == 2) || (i >= 90 && c == 7);
                    Assert.True(float.IsFinite(o[0, i, 0, c]) != touched, $"{path}: row {i} col {c} = {o[0, i, 0, c]}");
                }
        }
    }

    /// <summary>Causal attention of one head [1, s, 1, d] on every SIMD path: (path, output) pairs.</summary>
    private static IEnumerable<(KernelPath Path, TensorView<float> Output)> CausalOnEveryPath(float[] qd, float[] kd, float[] vd, int s, int d)
    {
        var q = new TensorView<float>(qd, 1, s, 1, d);
        var k = new TensorView<float>(kd, 1, s, 1, d);
        var v = new TensorView<float>(vd, 1, s, 1, d);
        foreach (KernelPath path in Paths)
        {
            var o = new TensorView<float>(new float[s * d], 1, s, 1, d);
            Attention.Forward(q, k, v, o, new AttentionOptions { Causal = true }, tuning: new KernelTuning { Path = path });
            yield return (path, o);
        }
    }

    internal static void CheckAllPaths<T>(int b, int sq, int skv, int h, int hkv, int d, AttentionOptions options, KernelPath[] paths) where T : unmanaged =>
        AttentionConformance.Check<T>(b, sq, skv, h, hkv, d, options, paths.Select(path => (path.ToString(), (AttentionRunner<T>)((q, k, v, o, lse, opt) =>
            Attention.Forward(q, k, v, o, opt, lse, new KernelTuning { Path = path, Threads = 2 })))).ToList());

    private static TensorView<float> Relayout(TensorView<float> heads, int[] storageOrder)
    {
        // Copy into a buffer whose storage order is `storageOrder` of the logical axes, and return the logical view.
        int[] logical = heads.Shape.ToArray();
        float[] buffer = new float[heads.ElementCount];
        TensorView<float> view = PermutedView(buffer, logical, storageOrder);
        for (int i = 0; i < logical[0]; i++)
            for (int j = 0; j < logical[1]; j++)
                for (int x = 0; x < logical[2]; x++)
                    for (int y = 0; y < logical[3]; y++)
                        view[i, j, x, y] = heads[i, j, x, y];
        return view;
    }

    private static TensorView<float> PermutedView(float[] buffer, int[] logical, int[] storageOrder)
    {
        int[] storageShape = storageOrder.Select(a => logical[a]).ToArray();
        long[] storageStrides = TensorView<float>.ContiguousStrides(storageShape);
        var strides = new long[4];
        for (int i = 0; i < 4; i++) strides[storageOrder[i]] = storageStrides[i];
        return new TensorView<float>(buffer, 0, logical, strides);
    }
}
