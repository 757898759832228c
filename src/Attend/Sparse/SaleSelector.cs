using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace Attend.Sparse;

/// <summary>
/// SALE (Ji et al., arXiv:2505.24179): a fine-grained estimate of every visible score from low-bit q and k, and each
/// block's <b>relative attention score</b> — the largest exp(ŝ_ij − m_i) over the block's pairs, m_i the row's largest
/// estimate, i.e. the block's peak probability relative to the row's peak — kept when ≥ <see cref="Threshold"/>
/// (the authors' example threshold is 0.004; ours 0.02 with a row stride, see <see cref="Threshold"/>). Quantization: keys are smoothed by their mean over the sequence (which
/// shifts every score of a row by the same amount, as SageAttention does), then q and k get one symmetric scale per
/// token with <see cref="Bits"/>-bit integers. The integer products run on AVX-512BW with 16 keys per register (no
/// horizontal sums): 4-bit values as unsigned × signed byte multiply-adds (64 products per instruction, q shifted by 8
/// and the shift's Σk taken back), 8-bit values as 16-bit multiply-adds (32 per instruction); other machines use a
/// scalar loop over the same integers (identical estimates).
/// </summary>
public sealed class SaleSelector : SparsitySelector
{
    private readonly double _threshold = 0.02;
    private readonly int _bits = 4;

    /// <summary>
    /// Relative attention score a block needs (in [0, 1]; 0 keeps every block). Default 0.02 with
    /// <see cref="RowStride"/> 4, measured (docs/perf/sparse.md, session 7): at S = 32768 on the structured inputs
    /// recall 0.971 and relative L2 0.039 at 4.6× dense causal, on gpt-bytes-8k L2 0.012 / 0.016 (layers 1 / 6). The
    /// paper's example 0.004 with every row: recall 0.993, L2 0.008, but 1.35× (its estimate is a quarter of dense here).
    /// </summary>
    public double Threshold
    {
        get => _threshold;
        init => _threshold = value is >= 0 and <= 1 ? value : throw new ArgumentOutOfRangeException(nameof(Threshold), value, "Threshold must be in [0, 1]");
    }

    /// <summary>Bits of the quantized q and k: 4 (default) or 8.</summary>
    public int Bits
    {
        get => _bits;
        init => _bits = value is 4 or 8 ? value : throw new ArgumentOutOfRangeException(nameof(Bits), value, "Bits must be 4 or 8");
    }

    /// <summary>
    /// Estimate from every <c>RowStride</c>-th query row of each block only (ending at the block's last row; default 4;
    /// 1: every row, as the paper). A block's relative score is then the largest over the sampled rows: the estimate costs
    /// 1/RowStride, and structure that spans consecutive rows (bands, slashes, vertical keys, a question's span of
    /// queries) is still seen; a key wanted by a single unsampled row is not.
    /// </summary>
    public int RowStride
    {
        get => _rowStride;
        init => _rowStride = value is >= 1 and <= 64 ? value : throw new ArgumentOutOfRangeException(nameof(RowStride), value, "RowStride must be in 1..64");
    }

    private readonly int _rowStride = 4;

    /// <summary>Always keep the first key block (attention sink) and the diagonal block (local context); default true.</summary>
    public bool KeepSinkAndDiagonal { get; init; } = true;

    /// <summary>Tests: use the scalar product even where AVX-512BW is available.</summary>
    internal bool ForceScalar { get; init; }

    /// <inheritdoc/>
    public override string Name => string.Create(System.Globalization.CultureInfo.InvariantCulture, $"sale(t={Threshold:0.####}, {Bits}-bit{(RowStride > 1 ? $", rows/{RowStride}" : "")})");

    private const int Lanes = 16;           // keys per panel: one 512-bit register of int32 dot products
    private const int Rows = 8;             // query rows per pass over a panel
    private const int ChunkBytes = 1 << 19; // keys walked per chunk while every row group of a query block passes (half the L2)

    private protected override void SelectHead(HeadSelection head)
    {
        int d = head.HeadDim, dp = (d + 3) / 4 * 4, bs = head.BlockSize, sq = head.QueryLength, skv = head.KeyLength;
        int levels = Bits == 4 ? 7 : 127;
        // Keys smoothed by their mean; one symmetric scale per token for keys and queries.
        float[] keys = head.Keys;
        var mean = new double[d];
        for (int j = 0; j < skv; j++) AddWidened(keys.AsSpan(j * d, d), mean);
        for (int c = 0; c < d; c++) mean[c] /= skv;
        int panels = (skv + Lanes - 1) / Lanes;
        sbyte[] keyInt = head.Codes(0, (long)panels * Lanes * dp);
        var keyScale = new float[panels * Lanes];
        var smoothed = new float[d];
        for (int j = 0; j < skv; j++)
        {
            SubtractNarrowed(keys.AsSpan(j * d, d), mean, smoothed);
            keyScale[j] = Quantize(smoothed, keyInt.AsSpan((int)((long)j * dp), dp), levels);
        }
        // The sampled query rows of each block (all with RowStride 1), the block's last row always among them.
        var realRow = new List<int>(sq);
        var blockStart = new int[head.QueryBlocks + 1];
        for (int qb = 0; qb < head.QueryBlocks; qb++)
        {
            blockStart[qb] = realRow.Count;
            int first = qb * bs, last = Math.Min(first + bs, sq) - 1;
            for (int i = first + ((last - first) % RowStride); i <= last; i += RowStride) realRow.Add(i);
        }
        blockStart[head.QueryBlocks] = realRow.Count;
        var queryInt = new sbyte[(long)realRow.Count * dp];
        var queryScale = new float[realRow.Count];
        var queryRow = new float[d];
        for (int v = 0; v < realRow.Count; v++)
        {
            head.CopyQueryRows([realRow[v]], queryRow);
            queryScale[v] = Quantize(queryRow, queryInt.AsSpan((int)((long)v * dp), dp), levels);
        }

        bool simd = !ForceScalar && Avx512BW.IsSupported;
        var kernel = simd ? (Bits == 4 ? new ByteKernel(queryInt, keyInt, panels, dp, head.Codes(1, (long)panels * Lanes * dp)) : (IPanelKernel)new ShortKernel(queryInt, keyInt, panels, dp)) : new ScalarKernel(queryInt, keyInt, dp);
        int chunkPanels = Math.Max(1, ChunkBytes / (Lanes * dp * (Bits == 4 ? 1 : 2)));
        double logThreshold = Threshold > 0 ? Math.Log(Threshold) : double.NegativeInfinity;
        var scores = new float[Rows * chunkPanels * Lanes];
        for (int qb = 0; qb < head.QueryBlocks; qb++)
        {
            int visibleBlocks = head.VisibleKeyBlocks(qb);
            if (visibleBlocks == 0) continue;
            int q0 = blockStart[qb], q1 = blockStart[qb + 1], rows = q1 - q0;   // sampled rows (indices into realRow)
            // Per row: the largest estimate in each key block and overall. The keys are walked in chunks that stay
            // in the core's cache while every group of 8 rows passes over them.
            var blockMax = new float[rows * visibleBlocks];
            var rowMax = new float[rows];
            Array.Fill(blockMax, float.NegativeInfinity);
            Array.Fill(rowMax, float.NegativeInfinity);
            int lastPanel = (head.VisibleKeys(realRow[q1 - 1]) + Lanes - 1) / Lanes;
            for (int chunk = 0; chunk < lastPanel; chunk += chunkPanels)
            {
                for (int r0 = q0; r0 < q1; r0 += Rows)
                {
                    int n = Math.Min(Rows, q1 - r0);
                    int end = Math.Min(Math.Min(chunk + chunkPanels, lastPanel), (head.VisibleKeys(realRow[r0 + n - 1]) + Lanes - 1) / Lanes);
                    if (end <= chunk) continue;
                    kernel.Products(r0, n, chunk, end, scores);
                    int width = (end - chunk) * Lanes;
                    for (int r = 0; r < n; r++)
                    {
                        int visible = Math.Min(head.VisibleKeys(realRow[r0 + r]), end * Lanes) - (chunk * Lanes);   // keys of this chunk the row sees
                        if (visible <= 0) continue;
                        ReadOnlySpan<float> rowScores = scores.AsSpan(r * width, width);
                        float qs = queryScale[r0 + r];
                        int at = (r0 + r - q0) * visibleBlocks;
                        // Key blocks of the chunk, each reduced once.
                        for (int j = 0; j < visible;)
                        {
                            int key = (chunk * Lanes) + j, b = key / bs, stop = Math.Min(visible, ((b + 1) * bs) - (chunk * Lanes));
                            float m = RangeMax(rowScores[j..stop], qs, keyScale.AsSpan(key, stop - j), simd);
                            if (m > blockMax[at + b]) blockMax[at + b] = m;
                            if (m > rowMax[r0 + r - q0]) rowMax[r0 + r - q0] = m;
                            j = stop;
                        }
                    }
                }
            }
            for (int b = 0; b < visibleBlocks; b++)
            {
                float best = float.NegativeInfinity;
                for (int r = 0; r < rows; r++)
                {
                    if (rowMax[r] > float.NegativeInfinity && blockMax[(r * visibleBlocks) + b] - rowMax[r] > best) best = blockMax[(r * visibleBlocks) + b] - rowMax[r];
                }
                if (best >= logThreshold) head.AddBlock(qb, b);
            }
            if (KeepSinkAndDiagonal)
            {
                head.AddBlock(qb, 0);
                head.AddBlock(qb, visibleBlocks - 1);
            }
        }
    }

    /// <summary>sum[c] += x[c] in float64 (8 channels per instruction; the same sums as the scalar loop).</summary>
    private static void AddWidened(ReadOnlySpan<float> x, Span<double> sum)
    {
        int c = 0;
        if (Avx512F.IsSupported)
        {
            for (; c + 8 <= x.Length; c += 8)
            {
                Vector512<double> wide = Avx512F.ConvertToVector512Double(Vector256.Create(x.Slice(c, 8)));
                (Vector512.Create(sum.Slice(c, 8)) + wide).CopyTo(sum.Slice(c, 8));
            }
        }
        for (; c < x.Length; c++) sum[c] += x[c];
    }

    /// <summary>y[c] = (float)(x[c] − mean[c]), the subtraction in float64 (vectorized; the same values as the scalar loop).</summary>
    private static void SubtractNarrowed(ReadOnlySpan<float> x, ReadOnlySpan<double> mean, Span<float> y)
    {
        int c = 0;
        if (Avx512F.IsSupported)
        {
            for (; c + 8 <= x.Length; c += 8)
            {
                Vector512<double> wide = Avx512F.ConvertToVector512Double(Vector256.Create(x.Slice(c, 8))) - Vector512.Create(mean.Slice(c, 8));
                Avx512F.ConvertToVector256Single(wide).CopyTo(y.Slice(c, 8));
            }
        }
        for (; c < x.Length; c++) y[c] = (float)(x[c] - mean[c]);
    }

    /// <summary>
    /// Symmetric per-token quantization to ±levels; returns the scale (values beyond x's length stay 0). Finite rows run
    /// 16 values per instruction (the scalar loop was a third of SALE's selection at S 32768, session 12) with the
    /// scalar loop's exact operations: IEEE division, ties to even, clamp; rows with NaN or ±∞ take the scalar loop.
    /// </summary>
    internal static float Quantize(ReadOnlySpan<float> x, Span<sbyte> q, int levels, bool vectors = true)
    {
        if (vectors && Avx512F.IsSupported && x.Length >= 16 && QuantizeFinite(x, q, levels) is float vectorScale) return vectorScale;
        float max = 0;
        foreach (float v in x) max = MathF.Max(max, MathF.Abs(v));
        float scale = max > 0 ? max / levels : 1;
        for (int c = 0; c < x.Length; c++) q[c] = (sbyte)Math.Clamp(MathF.Round(x[c] / scale), -levels, levels);
        return scale;
    }

    private static float? QuantizeFinite(ReadOnlySpan<float> x, Span<sbyte> q, int levels)
    {
        Vector512<float> maxAbs = Vector512<float>.Zero, nonFinite = Vector512<float>.Zero;
        int c = 0;
        for (; c + 16 <= x.Length; c += 16)
        {
            Vector512<float> v = Vector512.Create(x.Slice(c, 16));
            maxAbs = Vector512.Max(maxAbs, Vector512.Abs(v));
            nonFinite |= v - v;   // 0 for finite values, NaN for NaN and ±∞
        }
        float max = MaxOf(maxAbs);
        for (int t = c; t < x.Length; t++)
        {
            if (!float.IsFinite(x[t])) return null;
            max = MathF.Max(max, MathF.Abs(x[t]));
        }
        if (!Vector512.EqualsAll(nonFinite, Vector512<float>.Zero)) return null;
        float scale = max > 0 ? max / levels : 1;
        Vector512<float> divisor = Vector512.Create(scale), high = Vector512.Create((float)levels), low = -high;
        for (c = 0; c + 16 <= x.Length; c += 16)
        {
            Vector512<float> rounded = Vector512.Min(Vector512.Max(Vector512.Round(Vector512.Create(x.Slice(c, 16)) / divisor), low), high);
            Avx512F.ConvertToVector128SByte(Vector512.ConvertToInt32(rounded)).AsSByte().CopyTo(q.Slice(c, 16));
        }
        for (; c < x.Length; c++) q[c] = (sbyte)Math.Clamp(MathF.Round(x[c] / scale), -levels, levels);
        return scale;
    }

    /// <summary>The largest estimate (integer product × q scale × k scale) over a run of keys.</summary>
    private static float RangeMax(ReadOnlySpan<float> products, float queryScale, ReadOnlySpan<float> keyScale, bool simd)
    {
        int i = 0;
        float m = float.NegativeInfinity;
        if (simd && products.Length >= Lanes)
        {
            Vector512<float> qs = Vector512.Create(queryScale), acc = Vector512.Create(float.NegativeInfinity);
            for (; i + Lanes <= products.Length; i += Lanes)
            {
                acc = Vector512.Max(acc, Vector512.Create(products[i..]) * (qs * Vector512.Create(keyScale[i..])));
            }
            m = MaxOf(acc);
        }
        for (; i < products.Length; i++) m = MathF.Max(m, products[i] * (queryScale * keyScale[i]));
        return m;
    }

    private static float MaxOf(Vector512<float> v)
    {
        Vector256<float> h = Vector256.Max(v.GetLower(), v.GetUpper());
        Vector128<float> x = Vector128.Max(h.GetLower(), h.GetUpper());
        x = Vector128.Max(x, Vector128.Shuffle(x, Vector128.Create(2, 3, 0, 1)));
        return MathF.Max(x.GetElement(0), x.GetElement(1));
    }

    /// <summary>Integer dot products of up to 8 query rows with the keys of panels [first, end), as floats [row, key of the range].</summary>
    private interface IPanelKernel
    {
        void Products(int r0, int n, int first, int end, float[] scores);
    }

    /// <summary>Any machine: the plain integer loop.</summary>
    private sealed class ScalarKernel(sbyte[] queries, sbyte[] keys, int dp) : IPanelKernel
    {
        public void Products(int r0, int n, int first, int end, float[] scores)
        {
            int width = (end - first) * Lanes;
            for (int r = 0; r < n; r++)
            {
                long q = (long)(r0 + r) * dp;
                for (int j = 0; j < width; j++)
                {
                    long k = ((long)(first * Lanes) + j) * dp;
                    int dot = 0;
                    for (int c = 0; c < dp; c++) dot += queries[q + c] * keys[k + c];
                    scores[(r * width) + j] = dot;
                }
            }
        }
    }

    /// <summary>
    /// 4-bit values: keys packed per panel as [channel quad][16 keys][4] signed bytes, queries as 4 unsigned bytes
    /// (q + 8) per quad; vpmaddubsw gives 16-bit sums of channel pairs that add up without overflow (|sum| ≤ 210 per
    /// quad), widened once per panel; Σ_c 8·k_c per key is taken back.
    /// </summary>
    private sealed unsafe class ByteKernel : IPanelKernel
    {
        private readonly uint[] _queries;
        private readonly sbyte[] _keys;
        private readonly int[] _shift;
        private readonly int _quads;

        /// <summary>Packs <paramref name="keys"/> [panels · 16, dp] into <paramref name="target"/> (at least as long).</summary>
        public ByteKernel(sbyte[] queries, sbyte[] keys, int panels, int dp, sbyte[] target)
        {
            _quads = dp / 4;
            _queries = new uint[queries.Length / 4];
            for (int i = 0; i < _queries.Length; i++)
            {
                uint packed = 0;
                for (int b = 0; b < 4; b++) packed |= (uint)(byte)(queries[(i * 4) + b] + 8) << (8 * b);
                _queries[i] = packed;
            }
            _keys = target;
            _shift = new int[panels * Lanes];
            fixed (sbyte* source = keys, packed = _keys)
            {
                for (int j = 0; j < panels * Lanes; j++)
                {
                    // One key's quads (4 channels) to their places in its panel, 4 bytes at a time.
                    sbyte* row = source + ((long)j * dp);
                    int* place = (int*)(packed + ((long)(j / Lanes) * Lanes * dp) + ((j % Lanes) * 4));
                    int sum = 0;
                    for (int p = 0; p < _quads; p++)
                    {
                        place[p * Lanes] = ((int*)row)[p];
                        sum += row[(4 * p) + 0] + row[(4 * p) + 1] + row[(4 * p) + 2] + row[(4 * p) + 3];
                    }
                    _shift[j] = 8 * sum;
                }
            }
        }

        public void Products(int r0, int n, int first, int end, float[] scores)
        {
            int width = (end - first) * Lanes;
            fixed (uint* qAll = _queries)
            fixed (sbyte* kAll = _keys)
            fixed (int* shiftAll = _shift)
            fixed (float* s = scores)
            {
                uint* q = qAll + ((long)r0 * _quads);
                Vector512<short> ones = Vector512.Create((short)1);
                for (int panel = first; panel < end; panel++)
                {
                    sbyte* k = kAll + ((long)panel * Lanes * 4 * _quads);
                    Vector512<int> shift = Vector512.Load(shiftAll + (panel * Lanes));
                    float* o = s + ((panel - first) * Lanes);
                    for (int r = 0; r < n; r += 4)
                    {
                        // Rows past n repeat row r (their results are not stored).
                        uint* qa = q + (r * _quads), qb = q + ((r + 1 < n ? r + 1 : r) * _quads);
                        uint* qc = q + ((r + 2 < n ? r + 2 : r) * _quads), qd = q + ((r + 3 < n ? r + 3 : r) * _quads);
                        Vector512<short> a = default, b = default, c = default, e = default;
                        for (int p = 0; p < _quads; p++)
                        {
                            Vector512<sbyte> key = Vector512.Load(k + (p * Lanes * 4));
                            a += Avx512BW.MultiplyAddAdjacent(Vector512.Create(qa[p]).AsByte(), key);
                            b += Avx512BW.MultiplyAddAdjacent(Vector512.Create(qb[p]).AsByte(), key);
                            c += Avx512BW.MultiplyAddAdjacent(Vector512.Create(qc[p]).AsByte(), key);
                            e += Avx512BW.MultiplyAddAdjacent(Vector512.Create(qd[p]).AsByte(), key);
                        }
                        Vector512.Store(Avx512F.ConvertToVector512Single(Avx512BW.MultiplyAddAdjacent(a, ones) - shift), o + (r * width));
                        if (r + 1 < n) Vector512.Store(Avx512F.ConvertToVector512Single(Avx512BW.MultiplyAddAdjacent(b, ones) - shift), o + ((r + 1) * width));
                        if (r + 2 < n) Vector512.Store(Avx512F.ConvertToVector512Single(Avx512BW.MultiplyAddAdjacent(c, ones) - shift), o + ((r + 2) * width));
                        if (r + 3 < n) Vector512.Store(Avx512F.ConvertToVector512Single(Avx512BW.MultiplyAddAdjacent(e, ones) - shift), o + ((r + 3) * width));
                    }
                }
            }
        }
    }

    /// <summary>8-bit values: keys packed per panel as [channel pair][16 keys][2] shorts, queries as int32 channel pairs; vpmaddwd.</summary>
    private sealed unsafe class ShortKernel : IPanelKernel
    {
        private readonly int[] _queries;
        private readonly short[] _keys;
        private readonly int _pairs;

        public ShortKernel(sbyte[] queries, sbyte[] keys, int panels, int dp)
        {
            _pairs = dp / 2;
            _queries = new int[queries.Length / 2];
            for (int i = 0; i < _queries.Length; i++) _queries[i] = (ushort)(short)queries[2 * i] | (queries[(2 * i) + 1] << 16);
            _keys = new short[keys.Length];
            for (int j = 0; j < panels * Lanes; j++)
                for (int c = 0; c < dp; c++)
                    _keys[((long)(j / Lanes) * Lanes * dp) + ((c / 2) * Lanes * 2) + ((j % Lanes) * 2) + (c % 2)] = keys[((long)j * dp) + c];
        }

        public void Products(int r0, int n, int first, int end, float[] scores)
        {
            int width = (end - first) * Lanes;
            fixed (int* qAll = _queries)
            fixed (short* kAll = _keys)
            fixed (float* s = scores)
            {
                int* q = qAll + ((long)r0 * _pairs);
                for (int panel = first; panel < end; panel++)
                {
                    short* k = kAll + ((long)panel * Lanes * 2 * _pairs);
                    float* o = s + ((panel - first) * Lanes);
                    for (int r = 0; r < n; r += 2)
                    {
                        int* qa = q + (r * _pairs), qb = q + ((r + 1 < n ? r + 1 : r) * _pairs);
                        Vector512<int> a = default, b = default;
                        for (int p = 0; p < _pairs; p++)
                        {
                            Vector512<short> key = Vector512.Load(k + (p * Lanes * 2));
                            a += Avx512BW.MultiplyAddAdjacent(Vector512.Create(qa[p]).AsInt16(), key);
                            b += Avx512BW.MultiplyAddAdjacent(Vector512.Create(qb[p]).AsInt16(), key);
                        }
                        Vector512.Store(Avx512F.ConvertToVector512Single(a), o + (r * width));
                        if (r + 1 < n) Vector512.Store(Avx512F.ConvertToVector512Single(b), o + ((r + 1) * width));
                    }
                }
            }
        }
    }
}
