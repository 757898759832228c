using System.Runtime.InteropServices;
using Attend.Tensors;

namespace Attend.Cuda;

/// <summary>
/// Decoding attention on the GPU (flash-decoding): one query token per sequence against K/V of any length, split
/// over keys across thread blocks with an exact LSE merge, GQA-aware (the group's query heads share every K/V read).
/// </summary>
public static unsafe class CudaDecode
{
    private static DeviceBuffer<float>? _partO, _partLse;
    private static readonly Lock Gate = new();

    /// <summary>
    /// q [B, Hq, D] (the new token of each sequence) against k, v [B, Skv, Hkv, D] → output [B, Hq, D], optional lse
    /// [B, Hq] (natural log). bf16 or f16; Hq / Hkv ≤ 16; D ≤ 256 with rows 16-byte aligned.
    /// </summary>
    public static void Forward<T>(DeviceTensor<T> q, DeviceTensor<T> k, DeviceTensor<T> v, DeviceTensor<T> output, float? scale = null, DeviceTensor<float>? lse = null)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(q);
        ArgumentNullException.ThrowIfNull(k);
        ArgumentNullException.ThrowIfNull(v);
        ArgumentNullException.ThrowIfNull(output);
        if (typeof(T) != typeof(Half) && typeof(T) != typeof(BFloat16)) throw new NotSupportedException($"GPU decoding takes bf16 or f16 tensors; got {typeof(T).Name}");
        if (q.Rank != 3) throw new ArgumentException($"q must be [B, Hq, D]; got rank {q.Rank}", nameof(q));
        if (k.Rank != 4 || v.Rank != 4) throw new ArgumentException($"k and v must be [B, Skv, Hkv, D]; got ranks {k.Rank} and {v.Rank}", nameof(k));
        int b = q.Shape[0], hq = q.Shape[1], d = q.Shape[2], skv = k.Shape[1], hkv = k.Shape[2];
        if (k.Shape[0] != b || k.Shape[3] != d || hkv < 1 || hq % hkv != 0)
        {
            throw new ArgumentException($"k must be [B={b}, Skv, Hkv dividing Hq={hq}, D={d}]; got [{string.Join(", ", k.Shape.ToArray())}]", nameof(k));
        }
        if (!v.Shape.SequenceEqual(k.Shape)) throw new ArgumentException($"v must have k's shape [{string.Join(", ", k.Shape.ToArray())}]; got [{string.Join(", ", v.Shape.ToArray())}]", nameof(v));
        if (!output.Shape.SequenceEqual(q.Shape)) throw new ArgumentException($"output must be [{b}, {hq}, {d}]; got [{string.Join(", ", output.Shape.ToArray())}]", nameof(output));
        if (lse is not null && (lse.Rank != 2 || lse.Shape[0] != b || lse.Shape[1] != hq)) throw new ArgumentException($"lse must be [{b}, {hq}]", nameof(lse));
        if (skv < 1) throw new ArgumentException("k has no keys", nameof(k));
        if (hq / hkv > 16) throw new NotSupportedException($"GPU decoding packs a GQA group into 16 rows; Hq/Hkv = {hq / hkv}");
        if (d > 256 || d % 8 != 0) throw new NotSupportedException($"GPU decoding needs D ≤ 256 and a multiple of 8; got {d}");
        foreach ((string name, long[] st) in new[] { ("q", q.Strides.ToArray()), ("k", k.Strides.ToArray()), ("v", v.Strides.ToArray()), ("output", output.Strides.ToArray()) })
        {
            if (st[^1] != 1 || st[..^1].Any(s => s % 8 != 0)) throw new NotSupportedException($"{name}: GPU decoding needs D contiguous and 16-byte aligned rows");
        }
        float sc = scale ?? 1f / MathF.Sqrt(d);
        if (!(sc > 0) || !float.IsFinite(sc)) throw new ArgumentException($"scale must be finite and > 0; got {sc}", nameof(scale));

        CudaDevice device = CudaBackend.Device;
        device.MakeCurrent();
        FlashConfig config = FlashConfig.For(d);
        int tile = 16 * config.Warps;
        // One wave of two blocks per SM (fewer if shared memory allows fewer), each a whole number of tiles.
        // Measured on the H100 (32/8 heads, D 128, bf16, 131072 keys; device call 4 of session 2): 4 blocks per SM
        // (1.3 waves) 2.61 TB/s, a full wave of 3 per SM 2.80, of 2 per SM 2.89, of 6 per SM 2.57.
        int shared = (16 + 4 * tile) * config.HeadDim * 2;
        int perSm = Math.Clamp(device.SharedMemoryPerMultiprocessor / (shared + 1024), 1, 2);
        // Tuning experiments: ATTEND_CUDA_DECODE_BLOCKS=N sets the blocks per SM the split count aims at.
        if (int.TryParse(Environment.GetEnvironmentVariable("ATTEND_CUDA_DECODE_BLOCKS"), System.Globalization.CultureInfo.InvariantCulture, out int forced) && forced > 0) perSm = forced;
        int splitsWanted = Math.Max(1, device.Multiprocessors * perSm / (hkv * b));
        int tilesTotal = (skv + tile - 1) / tile;
        int splitTiles = Math.Max(1, (tilesTotal + splitsWanted - 1) / splitsWanted);
        int splitLen = splitTiles * tile, splits = (skv + splitLen - 1) / splitLen;
        bool bf16 = typeof(T) == typeof(BFloat16);
        Dictionary<string, string> defines = config.Defines(bf16, false, false);
        CudaKernel decode = device.Kernel("flash_fwd.cu", "flash_decode", defines);
        CudaKernel merge = device.Kernel("flash_fwd.cu", "decode_merge", defines);
        lock (Gate)
        {
            long partials = (long)b * hq * splits;
            if (_partO is null || _partO.Length < partials * config.HeadDim)
            {
                _partO?.Dispose();
                _partLse?.Dispose();
                _partO = DeviceBuffer<float>.Allocate(partials * config.HeadDim);
                _partLse = DeviceBuffer<float>.Allocate(partials);
            }
            var p = new DecodeParams
            {
                Q = q.Buffer.Pointer, K = k.Buffer.Pointer, V = v.Buffer.Pointer, O = output.Buffer.Pointer, Lse = lse?.Buffer.Pointer ?? 0,
                PartO = _partO.Pointer, PartLse = _partLse!.Pointer,
                QBatch = q.Strides[0], QHead = q.Strides[1],
                KBatch = k.Strides[0], KRow = k.Strides[1], KHead = k.Strides[2],
                VBatch = v.Strides[0], VRow = v.Strides[1], VHead = v.Strides[2],
                OBatch = output.Strides[0], OHead = output.Strides[1],
                LseBatch = lse?.Strides[0] ?? 0, LseHead = lse?.Strides[1] ?? 0,
                SeqlenK = skv, Heads = hq, Group = hq / hkv, HeadDim = d, SplitLen = splitLen, Splits = splits,
                ScaleLog2 = sc * 1.4426950408889634f,
            };
            void* arg = &p;
            decode.Launch((uint)splits, (uint)hkv, (uint)b, (uint)(config.Warps * 32), shared, &arg);
            merge.Launch((uint)hq, (uint)b, 1, (uint)Math.Min(256, (d + 31) / 32 * 32), 0, &arg);
        }
    }

    /// <summary>K+V bytes one decode step reads (what its bandwidth is measured against).</summary>
    public static long BytesRead(int batch, int keyLength, int kvHeads, int headDim, int elementBytes = 2) => 2L * batch * keyLength * kvHeads * headDim * elementBytes;

    /// <summary>flash_decode's parameters (flash_fwd.cu); the page fields stay 0 for a contiguous cache.</summary>
    [StructLayout(LayoutKind.Sequential)]
    internal struct DecodeParams
    {
        public ulong Q, K, V, O, Lse, PartO, PartLse;
        public long QBatch, QHead, KBatch, KRow, KHead, VBatch, VRow, VHead, OBatch, OHead, LseBatch, LseHead;
        public int SeqlenK, Heads, Group, HeadDim, SplitLen, Splits;
        public float ScaleLog2;
        public ulong PageTable, PageList, PageCount;
        public long PageStride;
        public int TableStride, ListStride, PagesPerSplit;
        public ulong Lengths, BatchSeq, PageLse;
    }
}
