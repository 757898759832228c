using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using Attend.Tensors;

namespace Attend.Cpu;

/// <summary>
/// The keys and values of one attention call packed as the CPU executor reads them: per (batch, kv head, block of
/// <see cref="BlockKv"/> keys) a K panel [D][64] (keys transposed, zero past the sequence) and a V panel [64][Dv']
/// (Dv' = Dv rounded up to 16), plus whether each V panel holds a non-finite value. Made once per call, by the
/// executor or, for a sparse call, before selection (<see cref="Sparse.SparseAttention"/>): selectors that score keys
/// read the K panels (<see cref="KeyPanels"/>) instead of packing a copy of their own per head.
/// </summary>
internal sealed unsafe class PackedKv : IDisposable
{
    private const int BlockKv = FlashAttentionCpu.BlockKv;
    private readonly AttentionShape _shape;
    private readonly PinnedScratch _buffer;

    private PackedKv(AttentionShape shape)
    {
        _shape = shape;
        KeyBlocks = (shape.KeyLength + BlockKv - 1) / BlockKv;
        ValueDimPadded = PaddedValueDim(shape.ValueDim);
        long panels = (long)shape.Batch * shape.KvHeads * KeyBlocks;
        long keyFloats = panels * BlockKv * shape.HeadDim;
        _buffer = new PinnedScratch(keyFloats + (panels * BlockKv * ValueDimPadded));
        K = _buffer.Pointer;
        V = _buffer.Pointer + keyFloats;   // keyFloats is a multiple of 64 floats: V stays 64-byte aligned
        ValueBlockNonFinite = (bool*)NativeMemory.AllocZeroed((nuint)panels);
    }

    /// <summary>Packs k [B, Skv, Hkv, D] and v [B, Skv, Hkv, Dv] (shapes already validated as <paramref name="shape"/>'s) on <paramref name="threads"/> threads.</summary>
    public static PackedKv Pack<T>(in TensorView<T> k, in TensorView<T> v, AttentionShape shape, int threads) where T : unmanaged
    {
        var packed = new PackedKv(shape);
        using PinnedView<T> kp = k.Pin();
        using PinnedView<T> vp = v.Pin();
        T* kBase = kp.Pointer, vBase = vp.Pointer;
        long[] kStrides = k.Strides.ToArray(), vStrides = v.Strides.ToArray();
        int panels = shape.Batch * shape.KvHeads * packed.KeyBlocks;
        try
        {
            WorkQueue.Run(panels, threads, () => 0, (i, _) => packed.PackPanel(kBase, kStrides, vBase, vStrides, i));
        }
        catch
        {
            packed.Dispose();
            throw;
        }
        return packed;
    }

    /// <summary>Dv rounded up to 16 floats: whole vectors per V row.</summary>
    public static int PaddedValueDim(int valueDim) => (valueDim + 15) & ~15;

    public int KeyBlocks { get; }
    public int ValueDimPadded { get; }
    public float* K { get; }
    public float* V { get; }
    public bool* ValueBlockNonFinite { get; }

    public long PanelIndex(int b, int hk, int kb) => (((long)b * _shape.KvHeads) + hk) * KeyBlocks + kb;

    /// <summary>The K panels of (batch, kv head) as the selectors' score product reads them.</summary>
    public Sparse.PackedPanels KeyPanels(int b, int hk) => new(K + (PanelIndex(b, hk, 0) * BlockKv * _shape.HeadDim), _shape.KeyLength, _shape.HeadDim, BlockKv);

    /// <summary>Throws unless these panels were packed for K and V of <paramref name="shape"/>'s sizes.</summary>
    public void Require(AttentionShape shape)
    {
        if (shape.Batch != _shape.Batch || shape.KeyLength != _shape.KeyLength || shape.KvHeads != _shape.KvHeads || shape.HeadDim != _shape.HeadDim || shape.ValueDim != _shape.ValueDim)
        {
            throw new ArgumentException($"K and V were packed for {_shape}, not for {shape}");
        }
    }

    public void Dispose()
    {
        NativeMemory.Free(ValueBlockNonFinite);
        _buffer.Dispose();
    }

    /// <summary>Converts and packs the keys and values of one block of one (batch, kv head).</summary>
    private void PackPanel<T>(T* kBase, long[] kStrides, T* vBase, long[] vStrides, int index) where T : unmanaged
    {
        AttentionShape s = _shape;
        int kb = index % KeyBlocks;
        int hk = (index / KeyBlocks) % s.KvHeads;
        int b = index / (KeyBlocks * s.KvHeads);
        long panel = PanelIndex(b, hk, kb);
        float* kPanel = K + panel * BlockKv * s.HeadDim;
        float* vPanel = V + panel * BlockKv * ValueDimPadded;
        int kv0 = kb * BlockKv;
        if (typeof(T) == typeof(float) && kStrides[3] == 1 && vStrides[3] == 1)
        {
            ValueBlockNonFinite[panel] = PackSinglePanel(s, (float*)kBase + (b * kStrides[0]) + (hk * kStrides[2]), kStrides[1],
                (float*)vBase + (b * vStrides[0]) + (hk * vStrides[2]), vStrides[1], kv0, kPanel, vPanel, ValueDimPadded);
            return;
        }
        bool nonFinite = false;
        for (int jj = 0; jj < BlockKv; jj++)
        {
            int j = kv0 + jj;
            float* vRow = vPanel + (long)jj * ValueDimPadded;
            if (j >= s.KeyLength)
            {
                for (int d = 0; d < s.HeadDim; d++) kPanel[d * BlockKv + jj] = 0f;
                new Span<float>(vRow, ValueDimPadded).Clear();
                continue;
            }
            T* kRow = kBase + b * kStrides[0] + j * kStrides[1] + hk * kStrides[2];
            long kd = kStrides[3];
            for (int d = 0; d < s.HeadDim; d++) kPanel[d * BlockKv + jj] = ElementConvert.ToSingle(kRow[d * kd]);
            T* vSrc = vBase + b * vStrides[0] + j * vStrides[1] + hk * vStrides[2];
            long vd = vStrides[3];
            for (int d = 0; d < s.ValueDim; d++)
            {
                float x = ElementConvert.ToSingle(vSrc[d * vd]);
                nonFinite |= !float.IsFinite(x);
                vRow[d] = x;
            }
            for (int d = s.ValueDim; d < ValueDimPadded; d++) vRow[d] = 0f;
        }
        ValueBlockNonFinite[panel] = nonFinite;
    }

    /// <summary>
    /// <see cref="PackPanel"/> for float rows with unit element stride (the common case): keys transposed eight
    /// rows at a time by 8 × 8 register tiles (<see cref="Transpose.Tile8(float*, long, float*, long)"/>; session 11 used AVX2 gathers, which the
    /// selectors' panels measured 2× slower), values copied as spans and checked for NaN/Inf by vectors. Packing
    /// S 8192, 4 kv heads, D 64 element by element took 7–9 ms on the 2-core EPYC (a fresh buffer's page faults
    /// included); with gathers into the reused buffer 3.5–4.6 ms (docs/perf/sparse.md, session 11).
    /// Returns whether the block's values hold a non-finite entry.
    /// </summary>
    private static bool PackSinglePanel(AttentionShape s, float* k, long kRowStride, float* v, long vRowStride, int kv0,
        float* kPanel, float* vPanel, int valueDimPadded)
    {
        int d = s.HeadDim, rows = Math.Min(BlockKv, s.KeyLength - kv0);
        float* k0 = k + (kv0 * kRowStride);
        if (Avx.IsSupported && rows == BlockKv)
        {
            // Eight rows at a time: whole 8-channel tiles transposed in registers, the remaining channels one by one.
            int tiled = d / 8 * 8;
            for (int g = 0; g < BlockKv; g += 8)
            {
                float* groupRows = k0 + (g * kRowStride);
                for (int c = 0; c < tiled; c += 8) Transpose.Tile8(groupRows + c, kRowStride, kPanel + (c * BlockKv) + g, BlockKv);
                for (int jj = 0; jj < 8; jj++)
                    for (int c = tiled; c < d; c++) kPanel[(c * BlockKv) + g + jj] = groupRows[(jj * kRowStride) + c];
            }
        }
        else
        {
            for (int jj = 0; jj < BlockKv; jj++)
            {
                float* row = k0 + (jj * kRowStride);
                for (int c = 0; c < d; c++) kPanel[(c * BlockKv) + jj] = jj < rows ? row[c] : 0f;
            }
        }
        bool nonFinite = false;
        int dv = s.ValueDim;
        for (int jj = 0; jj < BlockKv; jj++)
        {
            var target = new Span<float>(vPanel + ((long)jj * valueDimPadded), valueDimPadded);
            if (jj >= rows)
            {
                target.Clear();
                continue;
            }
            var source = new ReadOnlySpan<float>(v + ((kv0 + jj) * vRowStride), dv);
            source.CopyTo(target);
            target[dv..].Clear();
            nonFinite |= !AllFinite(source);
        }
        return nonFinite;
    }

    private static bool AllFinite(ReadOnlySpan<float> x)
    {
        // x − x is 0 for finite x and NaN for NaN or ±Inf; one NaN in the running sum of those differences persists.
        var sum = Vector256<float>.Zero;
        int i = 0;
        for (; i <= x.Length - 8; i += 8)
        {
            var e = Vector256.Create(x.Slice(i, 8));
            sum += e - e;
        }
        float rest = 0;
        for (; i < x.Length; i++) rest += x[i] - x[i];
        return float.IsFinite(Vector256.Sum(sum) + rest);
    }
}
