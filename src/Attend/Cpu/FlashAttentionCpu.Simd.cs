using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics.X86;
using Attend.Tensors;

namespace Attend.Cpu;

internal static unsafe partial class FlashAttentionCpu
{
    /// <summary>One (batch, head, query block): walk the plan's key blocks with online softmax, then normalize.</summary>
    private static void QueryBlock<T, TV, TOps>(Problem<T> p, int b, int h, int qb, Scratch sc)
        where T : unmanaged where TV : unmanaged where TOps : struct, ISimd<TV>
    {
        AttentionShape s = p.Shape;
        int d = s.HeadDim, dvPad = p.ValueDimPadded;
        int q0 = qb * p.BlockQ;
        int rows = Math.Min(p.BlockQ, s.QueryLength - q0);
        int rowsPadded = (rows + 3) & ~3;          // micro-kernels work on 4 rows; padded rows are zero queries
        int hk = h / s.GroupSize;

        // Pack the queries, scale·log2(e) folded in (FlashAttention's scale_softmax_log2).
        T* qBase = p.Q + b * p.QStrides[0] + h * p.QStrides[2];
        for (int r = 0; r < rowsPadded; r++)
        {
            float* dst = sc.Q + (long)r * d;
            if (r >= rows)
            {
                new Span<float>(dst, d).Clear();
                continue;
            }
            T* src = qBase + (q0 + r) * p.QStrides[1];
            long qd = p.QStrides[3];
            if (typeof(T) == typeof(float) && qd == 1)
            {
                // Per-row costs do not shrink with a sparse plan's density: at density 0.38 (layer 6, D 64) the
                // element-by-element loops here and in the store were 4% of the execution (dense: 1.8%).
                Linear.Vectors.Multiply(new ReadOnlySpan<float>(src, d), p.ScaleLog2, new Span<float>(dst, d));
                continue;
            }
            for (int c = 0; c < d; c++) dst[c] = ElementConvert.ToSingle(src[c * qd]) * p.ScaleLog2;
        }
        for (int r = 0; r < rowsPadded; r++)
        {
            sc.RowMax[r] = float.NegativeInfinity;
            sc.RowSum[r] = 0f;
        }
        new Span<float>(sc.O, rowsPadded * dvPad).Clear();

        int count = p.Plan.KeyBlocks(b, h, q0, q0 + rows, sc.Blocks, sc.Kinds);
        for (int n = 0; n < count; n++)
        {
            int kb = sc.Blocks[n];
            int kv0 = kb * BlockKv;
            int cols = Math.Min(BlockKv, s.KeyLength - kv0);
            long panel = p.PanelIndex(b, hk, kb);

            ScoreTile<TV, TOps>(sc.Q, p.PackedK + panel * BlockKv * d, sc.S, rowsPadded, d);
            if (p.Softcap > 0) Softcap<TV, TOps>(sc.S, rowsPadded, p.Softcap);
            if (p.AlibiSlopes is not null || p.Bias is not null) AddBias(p, b, h, q0, rows, kv0, cols, sc.S);
            if (sc.Kinds[n] == BlockKind.Partial) p.Plan.ApplyMask(b, h, q0, rows, kv0, cols, sc.S, BlockKv);
            if (cols < BlockKv)
            {
                for (int r = 0; r < rowsPadded; r++) new Span<float>(sc.S + r * BlockKv + cols, BlockKv - cols).Fill(float.NegativeInfinity);
            }
            OnlineSoftmax<TV, TOps>(sc, rowsPadded);
            float* vPanel = p.PackedV + panel * BlockKv * dvPad;
            if (p.ValueBlockNonFinite[panel])
            {
                // 0·NaN = NaN: a NaN/Inf value must reach only the rows that attend to it, so skip zero weights.
                AccumulateSkippingZeros<TV, TOps>(sc.S, vPanel, sc.O, sc.Alpha, rowsPadded, dvPad);
            }
            else
            {
                AccumulateTile<TV, TOps>(sc.S, vPanel, sc.O, sc.Alpha, rowsPadded, dvPad);
            }
        }

        int tokenCount = p.Plan.GatherTokens(b, h, q0, sc.Blocks.AsSpan(0, count), sc.Tokens);
        for (int t0 = 0; t0 < tokenCount; t0 += BlockKv)
        {
            int cols = Math.Min(BlockKv, tokenCount - t0);
            ReadOnlySpan<int> keys = sc.Tokens.AsSpan(t0, cols);
            bool nonFinite = GatherPanel(p, b, hk, keys, sc.KGather, sc.VGather);
            ScoreTile<TV, TOps>(sc.Q, sc.KGather, sc.S, rowsPadded, d);
            if (p.Softcap > 0) Softcap<TV, TOps>(sc.S, rowsPadded, p.Softcap);
            if (p.AlibiSlopes is not null || p.Bias is not null) AddBias(p, b, h, q0, rows, keys, sc.S);
            p.Plan.ApplyTokenMask(b, h, q0, rows, keys, sc.S, BlockKv);
            if (cols < BlockKv)
            {
                for (int r = 0; r < rowsPadded; r++) new Span<float>(sc.S + r * BlockKv + cols, BlockKv - cols).Fill(float.NegativeInfinity);
            }
            OnlineSoftmax<TV, TOps>(sc, rowsPadded);
            if (nonFinite) AccumulateSkippingZeros<TV, TOps>(sc.S, sc.VGather, sc.O, sc.Alpha, rowsPadded, dvPad);
            else AccumulateTile<TV, TOps>(sc.S, sc.VGather, sc.O, sc.Alpha, rowsPadded, dvPad);
        }

        // Normalize and store. A row that saw no key has sum 0: output 0, LSE −∞ (NaN sums stay NaN).
        T* oBase = p.O + b * p.OStrides[0] + h * p.OStrides[2];
        long od = p.OStrides[3];
        for (int r = 0; r < rows; r++)
        {
            float sum = sc.RowSum[r];
            float inv = sum == 0f ? 0f : 1f / sum;
            float* acc = sc.O + (long)r * dvPad;
            T* dst = oBase + (q0 + r) * p.OStrides[1];
            if (typeof(T) == typeof(float) && od == 1) Linear.Vectors.Multiply(new ReadOnlySpan<float>(acc, s.ValueDim), inv, new Span<float>((float*)dst, s.ValueDim));
            else
            {
                for (int c = 0; c < s.ValueDim; c++) dst[c * od] = ElementConvert.FromSingle<T>(acc[c] * inv);
            }
            if (p.Lse is not null)
            {
                p.Lse[b * p.LseStrides![0] + (q0 + r) * p.LseStrides[1] + h * p.LseStrides[2]] =
                    sum == 0f ? float.NegativeInfinity : (sc.RowMax[r] + MathF.Log2(sum)) * Ln2;
            }
        }
    }

    /// <summary>
    /// S[rows, 64] (row stride <paramref name="lds"/>) = Q[rows, D] · Kpanel[D, 64], 4 rows × 4 vectors per register
    /// tile. Also the selectors' score product over the executor's K panels (<see cref="Sparse.ScoreGemm"/>).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void ScoreTile<TV, TOps>(float* q, float* kPanel, float* s, int rowsPadded, int d, int lds = BlockKv)
        where TV : unmanaged where TOps : struct, ISimd<TV>
    {
        int w = TOps.Count;
        for (int r0 = 0; r0 < rowsPadded; r0 += 4)
        {
            float* q0 = q + (long)r0 * d, q1 = q0 + d, q2 = q1 + d, q3 = q2 + d;
            for (int c0 = 0; c0 < BlockKv; c0 += 4 * w)
            {
                TV a00 = TOps.Zero, a01 = TOps.Zero, a02 = TOps.Zero, a03 = TOps.Zero;
                TV a10 = TOps.Zero, a11 = TOps.Zero, a12 = TOps.Zero, a13 = TOps.Zero;
                TV a20 = TOps.Zero, a21 = TOps.Zero, a22 = TOps.Zero, a23 = TOps.Zero;
                TV a30 = TOps.Zero, a31 = TOps.Zero, a32 = TOps.Zero, a33 = TOps.Zero;
                float* k = kPanel + c0;
                for (int c = 0; c < d; c++, k += BlockKv)
                {
                    TV k0 = TOps.Load(k), k1 = TOps.Load(k + w), k2 = TOps.Load(k + 2 * w), k3 = TOps.Load(k + 3 * w);
                    TV x = TOps.Broadcast(q0[c]);
                    a00 = TOps.Fma(x, k0, a00); a01 = TOps.Fma(x, k1, a01); a02 = TOps.Fma(x, k2, a02); a03 = TOps.Fma(x, k3, a03);
                    x = TOps.Broadcast(q1[c]);
                    a10 = TOps.Fma(x, k0, a10); a11 = TOps.Fma(x, k1, a11); a12 = TOps.Fma(x, k2, a12); a13 = TOps.Fma(x, k3, a13);
                    x = TOps.Broadcast(q2[c]);
                    a20 = TOps.Fma(x, k0, a20); a21 = TOps.Fma(x, k1, a21); a22 = TOps.Fma(x, k2, a22); a23 = TOps.Fma(x, k3, a23);
                    x = TOps.Broadcast(q3[c]);
                    a30 = TOps.Fma(x, k0, a30); a31 = TOps.Fma(x, k1, a31); a32 = TOps.Fma(x, k2, a32); a33 = TOps.Fma(x, k3, a33);
                }
                float* o = s + (long)r0 * lds + c0;
                TOps.Store(o, a00); TOps.Store(o + w, a01); TOps.Store(o + 2 * w, a02); TOps.Store(o + 3 * w, a03);
                o += lds;
                TOps.Store(o, a10); TOps.Store(o + w, a11); TOps.Store(o + 2 * w, a12); TOps.Store(o + 3 * w, a13);
                o += lds;
                TOps.Store(o, a20); TOps.Store(o + w, a21); TOps.Store(o + 2 * w, a22); TOps.Store(o + 3 * w, a23);
                o += lds;
                TOps.Store(o, a30); TOps.Store(o + w, a31); TOps.Store(o + 2 * w, a32); TOps.Store(o + 3 * w, a33);
            }
        }
    }

    /// <summary>O[rows, Dv'] = α·O + P[rows, 64] · Vpanel[64, Dv'], 4 rows × 4 vectors per register tile.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void AccumulateTile<TV, TOps>(float* pTile, float* vPanel, float* o, float* alpha, int rowsPadded, int dvPad)
        where TV : unmanaged where TOps : struct, ISimd<TV>
    {
        int w = TOps.Count;
        for (int r0 = 0; r0 < rowsPadded; r0 += 4)
        {
            float* p0 = pTile + (long)r0 * BlockKv, p1 = p0 + BlockKv, p2 = p1 + BlockKv, p3 = p2 + BlockKv;
            TV al0 = TOps.Broadcast(alpha[r0]), al1 = TOps.Broadcast(alpha[r0 + 1]);
            TV al2 = TOps.Broadcast(alpha[r0 + 2]), al3 = TOps.Broadcast(alpha[r0 + 3]);
            int c0 = 0;
            for (; c0 + 4 * w <= dvPad; c0 += 4 * w)
            {
                float* o0 = o + (long)r0 * dvPad + c0, o1 = o0 + dvPad, o2 = o1 + dvPad, o3 = o2 + dvPad;
                TV a00 = TOps.Mul(TOps.Load(o0), al0), a01 = TOps.Mul(TOps.Load(o0 + w), al0), a02 = TOps.Mul(TOps.Load(o0 + 2 * w), al0), a03 = TOps.Mul(TOps.Load(o0 + 3 * w), al0);
                TV a10 = TOps.Mul(TOps.Load(o1), al1), a11 = TOps.Mul(TOps.Load(o1 + w), al1), a12 = TOps.Mul(TOps.Load(o1 + 2 * w), al1), a13 = TOps.Mul(TOps.Load(o1 + 3 * w), al1);
                TV a20 = TOps.Mul(TOps.Load(o2), al2), a21 = TOps.Mul(TOps.Load(o2 + w), al2), a22 = TOps.Mul(TOps.Load(o2 + 2 * w), al2), a23 = TOps.Mul(TOps.Load(o2 + 3 * w), al2);
                TV a30 = TOps.Mul(TOps.Load(o3), al3), a31 = TOps.Mul(TOps.Load(o3 + w), al3), a32 = TOps.Mul(TOps.Load(o3 + 2 * w), al3), a33 = TOps.Mul(TOps.Load(o3 + 3 * w), al3);
                float* v = vPanel + c0;
                for (int j = 0; j < BlockKv; j++, v += dvPad)
                {
                    TV v0 = TOps.Load(v), v1 = TOps.Load(v + w), v2 = TOps.Load(v + 2 * w), v3 = TOps.Load(v + 3 * w);
                    TV x = TOps.Broadcast(p0[j]);
                    a00 = TOps.Fma(x, v0, a00); a01 = TOps.Fma(x, v1, a01); a02 = TOps.Fma(x, v2, a02); a03 = TOps.Fma(x, v3, a03);
                    x = TOps.Broadcast(p1[j]);
                    a10 = TOps.Fma(x, v0, a10); a11 = TOps.Fma(x, v1, a11); a12 = TOps.Fma(x, v2, a12); a13 = TOps.Fma(x, v3, a13);
                    x = TOps.Broadcast(p2[j]);
                    a20 = TOps.Fma(x, v0, a20); a21 = TOps.Fma(x, v1, a21); a22 = TOps.Fma(x, v2, a22); a23 = TOps.Fma(x, v3, a23);
                    x = TOps.Broadcast(p3[j]);
                    a30 = TOps.Fma(x, v0, a30); a31 = TOps.Fma(x, v1, a31); a32 = TOps.Fma(x, v2, a32); a33 = TOps.Fma(x, v3, a33);
                }
                TOps.Store(o0, a00); TOps.Store(o0 + w, a01); TOps.Store(o0 + 2 * w, a02); TOps.Store(o0 + 3 * w, a03);
                TOps.Store(o1, a10); TOps.Store(o1 + w, a11); TOps.Store(o1 + 2 * w, a12); TOps.Store(o1 + 3 * w, a13);
                TOps.Store(o2, a20); TOps.Store(o2 + w, a21); TOps.Store(o2 + 2 * w, a22); TOps.Store(o2 + 3 * w, a23);
                TOps.Store(o3, a30); TOps.Store(o3 + w, a31); TOps.Store(o3 + 2 * w, a32); TOps.Store(o3 + 3 * w, a33);
            }
            for (; c0 < dvPad; c0 += w)
            {
                // Head dims that are not a multiple of 4 vectors: one vector column at a time.
                float* o0 = o + (long)r0 * dvPad + c0, o1 = o0 + dvPad, o2 = o1 + dvPad, o3 = o2 + dvPad;
                TV a0 = TOps.Mul(TOps.Load(o0), al0), a1 = TOps.Mul(TOps.Load(o1), al1), a2 = TOps.Mul(TOps.Load(o2), al2), a3 = TOps.Mul(TOps.Load(o3), al3);
                float* v = vPanel + c0;
                for (int j = 0; j < BlockKv; j++, v += dvPad)
                {
                    TV v0 = TOps.Load(v);
                    a0 = TOps.Fma(TOps.Broadcast(p0[j]), v0, a0);
                    a1 = TOps.Fma(TOps.Broadcast(p1[j]), v0, a1);
                    a2 = TOps.Fma(TOps.Broadcast(p2[j]), v0, a2);
                    a3 = TOps.Fma(TOps.Broadcast(p3[j]), v0, a3);
                }
                TOps.Store(o0, a0); TOps.Store(o1, a1); TOps.Store(o2, a2); TOps.Store(o3, a3);
            }
        }
    }

    /// <summary>Like <see cref="AccumulateTile{TV,TOps}"/> but row by row, skipping zero weights (blocks whose values hold NaN/Inf).</summary>
    private static void AccumulateSkippingZeros<TV, TOps>(float* pTile, float* vPanel, float* o, float* alpha, int rowsPadded, int dvPad)
        where TV : unmanaged where TOps : struct, ISimd<TV>
    {
        int w = TOps.Count;
        for (int r = 0; r < rowsPadded; r++)
        {
            float* orow = o + (long)r * dvPad;
            TV al = TOps.Broadcast(alpha[r]);
            for (int c = 0; c < dvPad; c += w) TOps.Store(orow + c, TOps.Mul(TOps.Load(orow + c), al));
            for (int j = 0; j < BlockKv; j++)
            {
                float pj = pTile[(long)r * BlockKv + j];
                if (pj == 0f) continue;
                TV x = TOps.Broadcast(pj);
                float* v = vPanel + (long)j * dvPad;
                for (int c = 0; c < dvPad; c += w) TOps.Store(orow + c, TOps.Fma(x, TOps.Load(v + c), TOps.Load(orow + c)));
            }
        }
    }

    /// <summary>
    /// Online softmax over one block of scores (log2 units): new running max, α = 2^(m_old − m_new), P = 2^(S − m_new)
    /// in place, running sum rescaled. A row whose max is still −∞ uses 0 as its max so −∞ − −∞ never makes NaN.
    /// </summary>
    private static void OnlineSoftmax<TV, TOps>(Scratch sc, int rowsPadded)
        where TV : unmanaged where TOps : struct, ISimd<TV>
    {
        int w = TOps.Count;
        for (int r = 0; r < rowsPadded; r++)
        {
            float* row = sc.S + (long)r * BlockKv;
            TV mx = TOps.Load(row);
            for (int c = w; c < BlockKv; c += w) mx = TOps.Max(mx, TOps.Load(row + c));
            float blockMax = TOps.ReduceMax(mx);
            float oldMax = sc.RowMax[r];
            float newMax = blockMax > oldMax ? blockMax : oldMax;
            float usedMax = float.IsNegativeInfinity(newMax) ? 0f : newMax;
            TV m = TOps.Broadcast(usedMax);
            TV sum = TOps.Zero;
            for (int c = 0; c < BlockKv; c += w)
            {
                TV e = TOps.Exp2(TOps.Sub(TOps.Load(row + c), m));
                TOps.Store(row + c, e);
                sum = TOps.Add(sum, e);
            }
            float alpha = float.Exp2(oldMax - usedMax);
            sc.Alpha[r] = alpha;
            sc.RowSum[r] = (sc.RowSum[r] * alpha) + TOps.ReduceSum(sum);
            sc.RowMax[r] = newMax;
        }
    }

    /// <summary>
    /// Tanh soft-capping on log2-unit scores S = s·log2(e): S' = c·log2(e)·tanh(S·ln2 / c), with
    /// tanh(y) = 1 − 2 / (1 + 2^(2y·log2 e)) so it runs on the same exp2.
    /// </summary>
    private static void Softcap<TV, TOps>(float* s, int rowsPadded, float cap)
        where TV : unmanaged where TOps : struct, ISimd<TV>
    {
        int w = TOps.Count;
        TV outer = TOps.Broadcast(cap * Log2E), inner = TOps.Broadcast(2f / cap), one = TOps.Broadcast(1f), two = TOps.Broadcast(2f);
        for (long i = 0; i < (long)rowsPadded * BlockKv; i += w)
        {
            TV e = TOps.Exp2(TOps.Mul(TOps.Load(s + i), inner));
            TOps.Store(s + i, TOps.Mul(outer, TOps.Sub(one, TOps.Div(two, TOps.Add(one, e)))));
        }
    }

    /// <summary>Copies gathered key tokens out of the packed panels into one K panel and one V panel (zero padded); true when a source value block holds NaN/Inf.</summary>
    private static bool GatherPanel<T>(Problem<T> p, int b, int hk, ReadOnlySpan<int> keys, float* kPanel, float* vPanel) where T : unmanaged
    {
        int d = p.Shape.HeadDim, dvPad = p.ValueDimPadded;
        bool nonFinite = false;
        int first = 0;
        if (typeof(T) == typeof(float) && p.KStrides[3] == 1 && Avx.IsSupported && d % 8 == 0)
        {
            // A key's column in a packed K panel spans D cache lines (one per channel); its row in k spans D / 16. Eight
            // gathered rows at a time, transposed in registers: AnchorAttention at S 32768 (θ 12.5, density 0.12) spent
            // ≈ 15% of its execution gathering columns (session 13).
            float* kHead = (float*)p.K + (b * p.KStrides[0]) + (hk * p.KStrides[2]);
            long ld = p.KStrides[1];
            for (; first + 8 <= keys.Length; first += 8)
            {
                ReadOnlySpan<int> g = keys.Slice(first, 8);
                float* x0 = kHead + (g[0] * ld), x1 = kHead + (g[1] * ld), x2 = kHead + (g[2] * ld), x3 = kHead + (g[3] * ld);
                float* x4 = kHead + (g[4] * ld), x5 = kHead + (g[5] * ld), x6 = kHead + (g[6] * ld), x7 = kHead + (g[7] * ld);
                for (int c = 0; c < d; c += 8) Transpose.Tile8(x0 + c, x1 + c, x2 + c, x3 + c, x4 + c, x5 + c, x6 + c, x7 + c, kPanel + (c * BlockKv) + first, BlockKv);
                for (int jj = first; jj < first + 8; jj++)
                {
                    long panel = p.PanelIndex(b, hk, keys[jj] / BlockKv);
                    new Span<float>(p.PackedV + (((panel * BlockKv) + (keys[jj] % BlockKv)) * dvPad), dvPad).CopyTo(new Span<float>(vPanel + ((long)jj * dvPad), dvPad));
                    nonFinite |= p.ValueBlockNonFinite[panel];
                }
            }
        }
        for (int jj = first; jj < BlockKv; jj++)
        {
            if (jj >= keys.Length)
            {
                for (int c = 0; c < d; c++) kPanel[c * BlockKv + jj] = 0f;
                new Span<float>(vPanel + (long)jj * dvPad, dvPad).Clear();
                continue;
            }
            int j = keys[jj];
            long panel = p.PanelIndex(b, hk, j / BlockKv);
            int within = j % BlockKv;
            float* kSrc = p.PackedK + panel * BlockKv * d + within;
            for (int c = 0; c < d; c++) kPanel[c * BlockKv + jj] = kSrc[c * BlockKv];
            new Span<float>(p.PackedV + (panel * BlockKv + within) * dvPad, dvPad).CopyTo(new Span<float>(vPanel + (long)jj * dvPad, dvPad));
            nonFinite |= p.ValueBlockNonFinite[panel];
        }
        return nonFinite;
    }

    /// <summary>Adds ALiBi and the bias tensor (log2 units) to the scores of gathered keys.</summary>
    private static void AddBias<T>(Problem<T> p, int b, int h, int q0, int rows, ReadOnlySpan<int> keys, float* s) where T : unmanaged
    {
        AttentionShape shape = p.Shape;
        long offset = (long)shape.KeyLength - shape.QueryLength;
        float slope = p.AlibiSlopes?[(b * shape.Heads) + h] ?? 0f;
        for (int r = 0; r < rows; r++)
        {
            float* row = s + (long)r * BlockKv;
            int q = q0 + r;
            for (int c = 0; c < keys.Length; c++)
            {
                if (slope != 0f) row[c] += slope * MathF.Abs(q + offset - keys[c]);
                if (p.Bias is not null) row[c] += p.Bias[b * p.BiasStrides![0] + h * p.BiasStrides[1] + q * p.BiasStrides[2] + keys[c] * p.BiasStrides[3]] * Log2E;
            }
        }
    }

    /// <summary>Adds ALiBi and the bias tensor (log2 units) to a block's scores (keys kv0 + [0, cols)).</summary>
    private static void AddBias<T>(Problem<T> p, int b, int h, int q0, int rows, int kv0, int cols, float* s) where T : unmanaged
    {
        Span<int> keys = stackalloc int[cols];
        for (int c = 0; c < cols; c++) keys[c] = kv0 + c;
        AddBias(p, b, h, q0, rows, keys, s);
    }
}
