using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using Attend.Tensors;

namespace Attend.Decode;

/// <summary>
/// The two products of a decode step over one page of one kv head: scores S = Q·Kᵀ and O = α·O + P·V, for up to a few
/// query rows (the GQA group × query tokens) that share the page.
/// <para>
/// Decode is memory-bound: every cached element is read once and used by only the group's 4–8 rows, so a step is only
/// as fast as its inner loop's cost per stored element, and only if the loads overlap the arithmetic. The wide path
/// reads the page in its storage dtype straight into 512-bit registers (f16 in 3 integer operations, bf16 in 2: no
/// widened copy); keys are stored by channel, so 16 keys' scores accumulate in one register per row with no horizontal
/// sums; while a read is scored, the next read's keys and values are prefetched. Measured steps are in
/// docs/perf/decode.md. f16 pages holding Inf/NaN (the fast widening is exact only for finite halves) are widened into
/// a float scratch first and take the same wide products; a token policy's chosen value rows are gathered into the
/// scratch in their storage dtype; machines without AVX-512, and head dims or page sizes that are not multiples of 16,
/// use portable products on the scratch.
/// </para>
/// </summary>
internal static unsafe class PageKernels
{
    /// <summary>Whether the wide path serves this cache's pages (tests pin another path through the tuning to cover the scratch path).</summary>
    public static bool WideSupported(KvCache cache, KernelTuning tuning) =>
        tuning.EffectivePath == KernelPath.Vector512 && Avx512F.IsSupported && cache.HeadDim % 16 == 0 && cache.ValueDim % 16 == 0
        && cache.PageSize % 16 == 0;

    /// <summary>Scratch of one worker: a widened page (keys by channel, [D, page]; values [page, Dv]) and the page's scores.</summary>
    internal sealed class Scratch(int pageSize, int d, int dv, int rows)
    {
        public readonly float[] K = new float[pageSize * d];
        public readonly float[] V = new float[pageSize * dv];
        public readonly float[] S = new float[rows * pageSize];
        public readonly float[] Alpha = new float[rows];
        public readonly ushort[] VBits = new ushort[pageSize * dv];   // gathered f16/bf16 value rows
    }

    /// <summary>
    /// S[r, j] = Q[r] · K[j] for the page's keys of <paramref name="head"/> (row stride of S: the page size); prefetches
    /// the keys and values of <paramref name="next"/>'s <paramref name="nextHead"/> (the step's next read) meanwhile.
    /// </summary>
    public static void Scores(KvCache cache, KvCache.Page page, int head, float[] queries, Scratch w, int rows, bool wide,
        KvCache.Page? next = null, int nextHead = 0)
    {
        int d = cache.HeadDim, ps = cache.PageSize;
        if (!wide || (cache.Storage == DType.Float16 && page.HasNonFinite))
        {
            page.ReadKeysByChannel(head, w.K);
            WidenedScores(queries, w, rows, page.Count, d, ps, wide);
            return;
        }
        KvCache.PageData data = page.Data;
        // The next read's data, if it is in memory (a file-tier page is loaded when it is read, not here).
        KvCache.PageData? nextData = next is not null && next.IsResident ? next.Data : null;
        int eb = cache.Storage == DType.Float32 ? 4 : 2;
        long offset = (long)head * d * ps;
        ReadOnlySpan<byte> nextKeys = nextData is null ? default : nextData.KF is not null ? MemoryMarshal.AsBytes(nextData.KF.AsSpan()) : MemoryMarshal.AsBytes(nextData.KH.AsSpan());
        ReadOnlySpan<byte> nextValues = nextData is null ? default : nextData.VF is not null ? MemoryMarshal.AsBytes(nextData.VF.AsSpan()) : MemoryMarshal.AsBytes(nextData.VH.AsSpan());
        fixed (float* q = queries, s = w.S)
        fixed (byte* nk = nextKeys, nv = nextValues)
        {
            var ahead = new Ahead(nk == null ? null : nk + (long)nextHead * d * ps * eb, nv == null ? null : nv + (long)nextHead * ps * cache.ValueDim * eb,
                (long)d * ps * eb, (long)ps * cache.ValueDim * eb, d);
            switch (cache.Storage)
            {
                case DType.Float32:
                    fixed (float* k = data.KF) WideScores<F32>(q, k + offset, s, rows, d, ps, ahead);
                    break;
                case DType.Float16:
                    fixed (ushort* k = data.KH) WideScores<F16Finite>(q, k + offset, s, rows, d, ps, ahead);
                    break;
                default:
                    fixed (ushort* k = data.KH) WideScores<BF16>(q, k + offset, s, rows, d, ps, ahead);
                    break;
            }
        }
    }

    /// <summary>
    /// Copies the values of <paramref name="tokens"/> (all on <paramref name="page"/>, ascending) into the scratch's
    /// first rows, in the storage dtype when the wide path can read it (f16/bf16 bits: returns true) and as floats
    /// otherwise (false).
    /// </summary>
    public static bool GatherValues(KvCache cache, KvCache.Page page, int head, ReadOnlySpan<int> tokens, Scratch w, bool wide)
    {
        int dv = cache.ValueDim, ps = cache.PageSize, count = tokens.Length;
        KvCache.PageData data = page.Data;
        bool bits = wide && cache.Storage != DType.Float32 && !(cache.Storage == DType.Float16 && page.HasNonFinite);
        for (int j = 0; j < count; j++)
        {
            int v0 = ((head * ps) + (tokens[j] % ps)) * dv;
            if (data.VF is not null) data.VF.AsSpan(v0, dv).CopyTo(w.V.AsSpan(j * dv, dv));
            else data.VH.AsSpan(v0, dv).CopyTo(w.VBits.AsSpan(j * dv, dv));
        }
        if (cache.Storage == DType.Float32 || bits) return bits;
        // f16 holding Inf/NaN, or no wide path: widen exactly.
        ElementConvert.ToSingle(cache.Storage, w.VBits.AsSpan(0, count * dv), w.V);
        return false;
    }

    /// <summary>Values from gathered storage bits in <see cref="Scratch.VBits"/>.</summary>
    public static void GatheredValues(DType storage, Scratch w, Span<float> o, int rows, int count, int dv, int ld)
    {
        fixed (float* p = w.S, a = w.Alpha, op = o)
        fixed (ushort* v = w.VBits)
        {
            if (storage == DType.Float16) WideValues<F16Finite>(p, v, op, a, rows, count, dv, ld);
            else WideValues<BF16>(p, v, op, a, rows, count, dv, ld);
        }
    }

    /// <summary>Scores against the float keys already in <see cref="Scratch.K"/> by channel (gathered tokens, or a page widened exactly).</summary>
    public static void WidenedScores(float[] queries, Scratch w, int rows, int count, int d, int ld, bool wide)
    {
        if (wide)
        {
            fixed (float* q = queries, k = w.K, s = w.S) WideScores<F32>(q, k, s, rows, d, ld, default);
            return;
        }
        // Portable: each score row accumulates q[r, c]·K[c, :] over the channels.
        for (int r = 0; r < rows; r++)
        {
            Span<float> row = w.S.AsSpan(r * ld, count);
            row.Clear();
            for (int c = 0; c < d; c++) Linear.Vectors.Axpy(queries[r * d + c], w.K.AsSpan(c * ld, count), row);
        }
    }

    /// <summary>O[r] = α[r]·O[r] + Σ_j P[r, j]·V[j] over the page's values of <paramref name="head"/> (P = S after softmax).</summary>
    public static void Values(KvCache cache, KvCache.Page page, int head, Scratch w, Span<float> o, int rows, bool wide)
    {
        int dv = cache.ValueDim, ps = cache.PageSize, count = page.Count;
        if (!wide || (cache.Storage == DType.Float16 && page.HasNonFinite))
        {
            page.ReadValues(head, w.V);
            WidenedValues(w, o, rows, count, dv, ps, wide);
            return;
        }
        KvCache.PageData data = page.Data;
        long offset = (long)head * ps * dv;
        fixed (float* p = w.S, a = w.Alpha, op = o)
        {
            switch (cache.Storage)
            {
                case DType.Float32:
                    fixed (float* v = data.VF) WideValues<F32>(p, v + offset, op, a, rows, count, dv, ps);
                    break;
                case DType.Float16:
                    fixed (ushort* v = data.VH) WideValues<F16Finite>(p, v + offset, op, a, rows, count, dv, ps);
                    break;
                default:
                    fixed (ushort* v = data.VH) WideValues<BF16>(p, v + offset, op, a, rows, count, dv, ps);
                    break;
            }
        }
    }

    /// <summary>Values from the float rows already in <see cref="Scratch.V"/>.</summary>
    public static void WidenedValues(Scratch w, Span<float> o, int rows, int count, int dv, int ld, bool wide)
    {
        if (!wide)
        {
            ScratchValues(w.S, w.V, o, w.Alpha, rows, count, dv, ld);
            return;
        }
        fixed (float* p = w.S, v = w.V, a = w.Alpha, op = o) WideValues<F32>(p, v, op, a, rows, count, dv, ld);
    }

    /// <summary>The largest of x (a NaN score may or may not win here; it turns its row's weights into NaN in <see cref="Exp2Sum"/> either way).</summary>
    public static float Max(ReadOnlySpan<float> x)
    {
        int i = 0;
        float max = float.NegativeInfinity;
        if (Vector512.IsHardwareAccelerated && x.Length >= 16)
        {
            Vector512<float> acc = Vector512.Create(float.NegativeInfinity);
            for (; i <= x.Length - 16; i += 16) acc = Vector512.MaxNative(acc, Vector512.Create(x.Slice(i, 16)));
            max = Cpu.V512Ops.ReduceMax(acc);
        }
        for (; i < x.Length; i++) max = MathF.Max(max, x[i]);
        return max;
    }

    /// <summary>x ← 2^(x − max) in place (−∞ → 0), vectorized; returns the sum.</summary>
    public static float Exp2Sum(Span<float> x, float max)
    {
        int i = 0;
        float sum = 0;
        if (Vector512.IsHardwareAccelerated)
        {
            Vector512<float> mv = Vector512.Create(max), acc = Vector512<float>.Zero;
            for (; i <= x.Length - 16; i += 16)
            {
                Vector512<float> e = Cpu.V512Ops.Exp2(Vector512.Create((ReadOnlySpan<float>)x.Slice(i, 16)) - mv);
                e.CopyTo(x.Slice(i, 16));
                acc += e;
            }
            sum = Vector512.Sum(acc);
        }
        else if (Vector256.IsHardwareAccelerated)
        {
            Vector256<float> mv = Vector256.Create(max), acc = Vector256<float>.Zero;
            for (; i <= x.Length - 8; i += 8)
            {
                Vector256<float> e = Cpu.V256Ops.Exp2(Vector256.Create((ReadOnlySpan<float>)x.Slice(i, 8)) - mv);
                e.CopyTo(x.Slice(i, 8));
                acc += e;
            }
            sum = Vector256.Sum(acc);
        }
        for (; i < x.Length; i++)
        {
            x[i] = float.Exp2(x[i] - max);
            sum += x[i];
        }
        return sum;
    }

    /// <summary>16 stored elements as floats.</summary>
    private interface IWiden
    {
        static abstract Vector512<float> Load(void* p, nint index);

        /// <summary>What the loaded floats must be multiplied by to be the stored values (applied to sums, not elements).</summary>
        static abstract float Unscale { get; }
    }

    private readonly struct F32 : IWiden
    {
        public static float Unscale => 1f;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static Vector512<float> Load(void* p, nint index) => Vector512.Load((float*)p + index);
    }

    /// <summary>
    /// Finite halves as 2^-112 times their value: sign-extend to 32 bits and shift the 15 magnitude bits under the
    /// float exponent (the sign lands on bit 31; the mask clears the three copies of it shifted to bits 28–30) — the
    /// float exponent is then short of the half's bias difference, 2^112, which the callers apply once to each sum
    /// (<see cref="Unscale"/>) instead of to every element: a multiply per element saved (measured in
    /// docs/perf/decode.md). Half subnormals become float subnormals, which the products take at full speed on the EPYC
    /// (measured) and with an absolute error below 2^-37 of the stored unit per term. Inf/NaN would come out finite:
    /// such pages take the scratch path (<see cref="KvCache.Page.HasNonFinite"/>).
    /// </summary>
    private readonly struct F16Finite : IWiden
    {
        public static float Unscale => 5.192296858534828e33f;   // 2^112

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static Vector512<float> Load(void* p, nint index)
        {
            Vector512<int> h = Avx512F.ConvertToVector512Int32(Vector256.Load((short*)p + index));
            return ((h << 13) & Vector512.Create(unchecked((int)0x8FFFFFFF))).AsSingle();
        }
    }

    private readonly struct BF16 : IWiden
    {
        public static float Unscale => 1f;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static Vector512<float> Load(void* p, nint index) =>
            (Avx512F.ConvertToVector512Int32(Vector256.Load((ushort*)p + index)) << 16).AsSingle();
    }

    /// <summary>The next read's keys and values, prefetched a slice per channel while the current keys are scored.</summary>
    private readonly struct Ahead(byte* keys, byte* values, long keyBytes, long valueBytes, int channels)
    {
        // Slices rounded up to whole lines: the last channel's may reach past the data, which a prefetch may.
        private readonly int _keySlice = (int)((keyBytes + channels - 1) / channels + 63) & ~63;
        private readonly int _valueSlice = (int)((valueBytes + channels - 1) / channels + 63) & ~63;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Channel(int c)
        {
            if (keys == null) return;
            byte* k = keys + (long)c * _keySlice, v = values + (long)c * _valueSlice;
            for (int b = 0; b < _keySlice; b += 64) Sse.Prefetch0(k + b);
            for (int b = 0; b < _valueSlice; b += 64) Sse.Prefetch0(v + b);
        }
    }

    /// <summary>
    /// Scores of 4 query rows against 64 keys per pass over the channels (keys by channel, [D, ld]): for each channel
    /// the 64 keys are 4 registers, each row's query element one broadcast, and the 16 accumulators hold 4 rows × 64
    /// keys — no horizontal sums. Page sizes that are not multiples of 64 end with passes over 16 keys. All ld keys are
    /// scored; columns past the page's count are ignored by the callers.
    /// </summary>
    private static void WideScores<W>(float* q, void* k, float* s, int rows, int d, int ld, Ahead ahead) where W : IWiden
    {
        for (int r0 = 0; r0 < rows; r0 += 4)
        {
            int n = Math.Min(4, rows - r0);
            float* q0 = q + r0 * d, q1 = q0 + (n > 1 ? d : 0), q2 = q0 + (n > 2 ? 2 * d : 0), q3 = q0 + (n > 3 ? 3 * d : 0);
            int j0 = 0;
            for (; j0 + 64 <= ld; j0 += 64)
            {
                Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default, b0 = default, b1 = default, b2 = default, b3 = default;
                Vector512<float> c0 = default, c1 = default, c2 = default, c3 = default, e0 = default, e1 = default, e2 = default, e3 = default;
                bool prefetch = r0 == 0 && j0 == 0;
                for (int c = 0; c < d; c++)
                {
                    if (prefetch) ahead.Channel(c);
                    nint row = (nint)c * ld + j0;
                    Vector512<float> x0 = W.Load(k, row), x1 = W.Load(k, row + 16), x2 = W.Load(k, row + 32), x3 = W.Load(k, row + 48);
                    Vector512<float> w = Vector512.Create(q0[c]);
                    a0 = Vector512.FusedMultiplyAdd(w, x0, a0); a1 = Vector512.FusedMultiplyAdd(w, x1, a1);
                    a2 = Vector512.FusedMultiplyAdd(w, x2, a2); a3 = Vector512.FusedMultiplyAdd(w, x3, a3);
                    w = Vector512.Create(q1[c]);
                    b0 = Vector512.FusedMultiplyAdd(w, x0, b0); b1 = Vector512.FusedMultiplyAdd(w, x1, b1);
                    b2 = Vector512.FusedMultiplyAdd(w, x2, b2); b3 = Vector512.FusedMultiplyAdd(w, x3, b3);
                    w = Vector512.Create(q2[c]);
                    c0 = Vector512.FusedMultiplyAdd(w, x0, c0); c1 = Vector512.FusedMultiplyAdd(w, x1, c1);
                    c2 = Vector512.FusedMultiplyAdd(w, x2, c2); c3 = Vector512.FusedMultiplyAdd(w, x3, c3);
                    w = Vector512.Create(q3[c]);
                    e0 = Vector512.FusedMultiplyAdd(w, x0, e0); e1 = Vector512.FusedMultiplyAdd(w, x1, e1);
                    e2 = Vector512.FusedMultiplyAdd(w, x2, e2); e3 = Vector512.FusedMultiplyAdd(w, x3, e3);
                }
                float* s0 = s + r0 * ld + j0;
                StoreRow<W>(s0, a0, a1, a2, a3);
                if (n > 1) StoreRow<W>(s0 + ld, b0, b1, b2, b3);
                if (n > 2) StoreRow<W>(s0 + 2 * ld, c0, c1, c2, c3);
                if (n > 3) StoreRow<W>(s0 + 3 * ld, e0, e1, e2, e3);
            }
            for (; j0 < ld; j0 += 16)
            {
                Vector512<float> a = default, b = default, c2 = default, e = default;
                for (int c = 0; c < d; c++)
                {
                    Vector512<float> x = W.Load(k, (nint)c * ld + j0);
                    a = Vector512.FusedMultiplyAdd(Vector512.Create(q0[c]), x, a);
                    b = Vector512.FusedMultiplyAdd(Vector512.Create(q1[c]), x, b);
                    c2 = Vector512.FusedMultiplyAdd(Vector512.Create(q2[c]), x, c2);
                    e = Vector512.FusedMultiplyAdd(Vector512.Create(q3[c]), x, e);
                }
                float* s0 = s + r0 * ld + j0;
                (a * W.Unscale).Store(s0);
                if (n > 1) (b * W.Unscale).Store(s0 + ld);
                if (n > 2) (c2 * W.Unscale).Store(s0 + 2 * ld);
                if (n > 3) (e * W.Unscale).Store(s0 + 3 * ld);
            }
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StoreRow<W>(float* s, Vector512<float> x0, Vector512<float> x1, Vector512<float> x2, Vector512<float> x3) where W : IWiden
    {
        (x0 * W.Unscale).Store(s);
        (x1 * W.Unscale).Store(s + 16);
        (x2 * W.Unscale).Store(s + 32);
        (x3 * W.Unscale).Store(s + 48);
    }

    /// <summary>
    /// Values for 4 rows, 64 output columns per pass held in 16 registers over the whole page (value dims that are not
    /// multiples of 64 end with passes over 16 columns): each value vector is widened once per 4 rows, each weight
    /// broadcast from memory. On the EPYC, 64 columns per pass beat 32 (half the broadcasts per FMA).
    /// </summary>
    private static void WideValues<W>(float* p, void* v, float* o, float* alpha, int rows, int count, int dv, int ld) where W : IWiden
    {
        for (int r0 = 0; r0 < rows; r0 += 4)
        {
            int n = Math.Min(4, rows - r0);
            float* p0 = p + r0 * ld, p1 = p0 + (n > 1 ? ld : 0), p2 = p0 + (n > 2 ? 2 * ld : 0), p3 = p0 + (n > 3 ? 3 * ld : 0);
            float* o0 = o + r0 * dv, o1 = o0 + (n > 1 ? dv : 0), o2 = o0 + (n > 2 ? 2 * dv : 0), o3 = o0 + (n > 3 ? 3 * dv : 0);
            // The accumulators hold the sums in the loaded floats' unit (see IWiden.Unscale).
            float down = 1f / W.Unscale;
            Vector512<float> al0 = Vector512.Create(alpha[r0] * down), al1 = Vector512.Create(n > 1 ? alpha[r0 + 1] * down : 0f);
            Vector512<float> al2 = Vector512.Create(n > 2 ? alpha[r0 + 2] * down : 0f), al3 = Vector512.Create(n > 3 ? alpha[r0 + 3] * down : 0f);
            int c = 0;
            for (; c + 64 <= dv; c += 64)
            {
                Vector512<float> a0 = Vector512.Load(o0 + c) * al0, a1 = Vector512.Load(o0 + c + 16) * al0, a2 = Vector512.Load(o0 + c + 32) * al0, a3 = Vector512.Load(o0 + c + 48) * al0;
                Vector512<float> b0 = Vector512.Load(o1 + c) * al1, b1 = Vector512.Load(o1 + c + 16) * al1, b2 = Vector512.Load(o1 + c + 32) * al1, b3 = Vector512.Load(o1 + c + 48) * al1;
                Vector512<float> c0 = Vector512.Load(o2 + c) * al2, c1 = Vector512.Load(o2 + c + 16) * al2, c2 = Vector512.Load(o2 + c + 32) * al2, c3 = Vector512.Load(o2 + c + 48) * al2;
                Vector512<float> e0 = Vector512.Load(o3 + c) * al3, e1 = Vector512.Load(o3 + c + 16) * al3, e2 = Vector512.Load(o3 + c + 32) * al3, e3 = Vector512.Load(o3 + c + 48) * al3;
                for (int j = 0; j < count; j++)
                {
                    nint row = (nint)j * dv + c;
                    Vector512<float> x0 = W.Load(v, row), x1 = W.Load(v, row + 16), x2 = W.Load(v, row + 32), x3 = W.Load(v, row + 48);
                    Vector512<float> w = Vector512.Create(p0[j]);
                    a0 = Vector512.FusedMultiplyAdd(w, x0, a0); a1 = Vector512.FusedMultiplyAdd(w, x1, a1);
                    a2 = Vector512.FusedMultiplyAdd(w, x2, a2); a3 = Vector512.FusedMultiplyAdd(w, x3, a3);
                    w = Vector512.Create(p1[j]);
                    b0 = Vector512.FusedMultiplyAdd(w, x0, b0); b1 = Vector512.FusedMultiplyAdd(w, x1, b1);
                    b2 = Vector512.FusedMultiplyAdd(w, x2, b2); b3 = Vector512.FusedMultiplyAdd(w, x3, b3);
                    w = Vector512.Create(p2[j]);
                    c0 = Vector512.FusedMultiplyAdd(w, x0, c0); c1 = Vector512.FusedMultiplyAdd(w, x1, c1);
                    c2 = Vector512.FusedMultiplyAdd(w, x2, c2); c3 = Vector512.FusedMultiplyAdd(w, x3, c3);
                    w = Vector512.Create(p3[j]);
                    e0 = Vector512.FusedMultiplyAdd(w, x0, e0); e1 = Vector512.FusedMultiplyAdd(w, x1, e1);
                    e2 = Vector512.FusedMultiplyAdd(w, x2, e2); e3 = Vector512.FusedMultiplyAdd(w, x3, e3);
                }
                // Rows past n alias row r0 (computed on its outputs with weight 0 for the old sums): stored first so
                // row r0's result wins.
                StoreRow<W>(o3 + c, e0, e1, e2, e3);
                StoreRow<W>(o2 + c, c0, c1, c2, c3);
                StoreRow<W>(o1 + c, b0, b1, b2, b3);
                StoreRow<W>(o0 + c, a0, a1, a2, a3);
            }
            for (; c < dv; c += 16)
            {
                Vector512<float> a = Vector512.Load(o0 + c) * al0, b = Vector512.Load(o1 + c) * al1;
                Vector512<float> c2 = Vector512.Load(o2 + c) * al2, e = Vector512.Load(o3 + c) * al3;
                for (int j = 0; j < count; j++)
                {
                    Vector512<float> x = W.Load(v, (nint)j * dv + c);
                    a = Vector512.FusedMultiplyAdd(Vector512.Create(p0[j]), x, a);
                    b = Vector512.FusedMultiplyAdd(Vector512.Create(p1[j]), x, b);
                    c2 = Vector512.FusedMultiplyAdd(Vector512.Create(p2[j]), x, c2);
                    e = Vector512.FusedMultiplyAdd(Vector512.Create(p3[j]), x, e);
                }
                (e * W.Unscale).Store(o3 + c);
                (c2 * W.Unscale).Store(o2 + c);
                (b * W.Unscale).Store(o1 + c);
                (a * W.Unscale).Store(o0 + c);
            }
        }
    }

    /// <summary>O[r] = α[r]·O[r] + Σ_j P[r, j]·V[j], with the output chunk of 4 rows held in registers over the page.</summary>
    private static void ScratchValues(float[] p, float[] v, Span<float> o, float[] alpha, int rows, int count, int dv, int ld)
    {
        fixed (float* pp = p, vp = v, op = o)
        {
            for (int r0 = 0; r0 < rows; r0 += 4)
            {
                int n = Math.Min(4, rows - r0);
                float* p0 = pp + r0 * ld, p1 = p0 + (n > 1 ? ld : 0), p2 = p0 + (n > 2 ? 2 * ld : 0), p3 = p0 + (n > 3 ? 3 * ld : 0);
                float* o0 = op + r0 * dv, o1 = o0 + (n > 1 ? dv : 0), o2 = o0 + (n > 2 ? 2 * dv : 0), o3 = o0 + (n > 3 ? 3 * dv : 0);
                float al0 = alpha[r0], al1 = n > 1 ? alpha[r0 + 1] : 0f, al2 = n > 2 ? alpha[r0 + 2] : 0f, al3 = n > 3 ? alpha[r0 + 3] : 0f;
                int c = 0;
                for (; c <= dv - 8; c += 8)
                {
                    var a0 = Vector256.Load(o0 + c) * al0;
                    var a1 = Vector256.Load(o1 + c) * al1;
                    var a2 = Vector256.Load(o2 + c) * al2;
                    var a3 = Vector256.Load(o3 + c) * al3;
                    for (int j = 0; j < count; j++)
                    {
                        var vv = Vector256.Load(vp + (long)j * dv + c);
                        a0 = Vector256.FusedMultiplyAdd(Vector256.Create(p0[j]), vv, a0);
                        a1 = Vector256.FusedMultiplyAdd(Vector256.Create(p1[j]), vv, a1);
                        a2 = Vector256.FusedMultiplyAdd(Vector256.Create(p2[j]), vv, a2);
                        a3 = Vector256.FusedMultiplyAdd(Vector256.Create(p3[j]), vv, a3);
                    }
                    a0.Store(o0 + c);
                    if (n > 1) a1.Store(o1 + c);
                    if (n > 2) a2.Store(o2 + c);
                    if (n > 3) a3.Store(o3 + c);
                }
                for (; c < dv; c++)
                {
                    float b0 = o0[c] * al0, b1 = o1[c] * al1, b2 = o2[c] * al2, b3 = o3[c] * al3;
                    for (int j = 0; j < count; j++)
                    {
                        float x = vp[(long)j * dv + c];
                        b0 += p0[j] * x;
                        b1 += p1[j] * x;
                        b2 += p2[j] * x;
                        b3 += p3[j] * x;
                    }
                    o0[c] = b0;
                    if (n > 1) o1[c] = b1;
                    if (n > 2) o2[c] = b2;
                    if (n > 3) o3[c] = b3;
                }
            }
        }
    }
}
