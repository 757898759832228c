using System.Runtime.InteropServices;
using Attend.Masks;
using Attend.Sparse;
using Attend.Tensors;

namespace Attend.Cuda;

/// <summary>
/// Sparse selectors that build their plan on the GPU (kernel <c>select.cu</c>), so that the plan of a long sequence
/// costs a few launches instead of a download of q and k and a CPU pass: <see cref="Plan{T}"/> runs the pooled block
/// estimate of <see cref="PooledBlockSelector"/> — the same blocks as the CPU selector, up to float rounding at the
/// budget's edge (the budget is applied as a threshold, so entries tied at it are all kept).
/// </summary>
public static unsafe class CudaSelectors
{
    private static readonly Lock Gate = new();
    private static DeviceBuffer<float>? _pooledQ, _pooledK;
    private static DeviceBuffer<int>? _counts, _scratch;

    /// <summary>
    /// The plan <paramref name="selector"/> chooses for q [B, Sq, H, D] and k [B, Skv, Hkv, D] (f32, f16 or bf16 on the
    /// device), built on the device: mean-pooled blocks, softmax per query-block row over the visible key blocks, the
    /// selector's <see cref="PooledBlockSelector.Budget"/>, sink and diagonal blocks kept when asked. Causal plans are
    /// bottom-right aligned as the attention kernel's causal mask and mark the diagonal blocks Partial.
    /// </summary>
    public static DeviceBlockPlan Plan<T>(PooledBlockSelector selector, DeviceTensor<T> q, DeviceTensor<T> k, bool causal = true, float? scale = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(selector);
        ArgumentNullException.ThrowIfNull(q);
        ArgumentNullException.ThrowIfNull(k);
        int code = typeof(T) == typeof(float) ? 0 : typeof(T) == typeof(Half) ? 1 : typeof(T) == typeof(BFloat16) ? 2
            : throw new ArgumentException($"element type must be float, Half or BFloat16; got {typeof(T).Name}", nameof(q));
        if (q.Rank != 4) throw new ArgumentException($"q must be [B, Sq, H, D]; got {q.ShapeString()}", nameof(q));
        if (k.Rank != 4) throw new ArgumentException($"k must be [B, Skv, Hkv, D]; got {k.ShapeString()}", nameof(k));
        int batch = q.Shape[0], sq = q.Shape[1], heads = q.Shape[2], d = q.Shape[3], skv = k.Shape[1], kvHeads = k.Shape[2];
        if (k.Shape[0] != batch || k.Shape[3] != d || kvHeads < 1 || heads % kvHeads != 0)
        {
            throw new ArgumentException($"k must be [B={batch}, Skv, Hkv dividing H={heads}, D={d}]; got {k.ShapeString()}", nameof(k));
        }
        if (batch < 1 || sq < 1 || skv < 1 || heads < 1 || d < 1)
        {
            throw new ArgumentException($"q and k need every extent ≥ 1; got q {q.ShapeString()}, k {k.ShapeString()}", nameof(q));
        }
        if (q.Strides[3] != 1 || k.Strides[3] != 1) throw new NotSupportedException("the GPU selector needs the last dimension of q and k contiguous");
        float s = scale ?? 1f / MathF.Sqrt(d);
        if (!float.IsFinite(s) || s < 0) throw new ArgumentException($"scale must be finite and ≥ 0; got {s}", nameof(scale));

        int bs = selector.BlockSize, qBlocks = (sq + bs - 1) / bs, kBlocks = (skv + bs - 1) / bs;
        long rows = (long)batch * heads * qBlocks;
        int selectShared = (kBlocks + d) * sizeof(float);
        CudaDevice device = CudaBackend.Device;
        device.MakeCurrent();
        if (selectShared > device.MaxSharedMemoryPerBlock)
        {
            throw new NotSupportedException($"{kBlocks} key blocks of {bs} keys need {selectShared} bytes of shared memory per row; {device.Name} allows {device.MaxSharedMemoryPerBlock} (use a larger BlockSize)");
        }
        if (rows >= int.MaxValue || rows * kBlocks >= int.MaxValue) throw new NotSupportedException($"{rows} block rows × {kBlocks} key blocks exceed the selector's 32-bit plan indices");
        Dictionary<string, string> defines = Defines<T>();
        (int kind, double value) = selector.Budget.Device;
        var rowStart = DeviceBuffer<int>.Allocate(rows + 1);
        lock (Gate)
        {
            DeviceBuffer<float>.EnsureLength(ref _pooledQ, (long)batch * heads * qBlocks * d);
            DeviceBuffer<float>.EnsureLength(ref _pooledK, (long)batch * kvHeads * kBlocks * d);
            DeviceBuffer<int>.EnsureLength(ref _counts, rows);
            DeviceBuffer<int>.EnsureLength(ref _scratch, rows * kBlocks);
            PoolBlocks(q, _pooledQ!, bs, s);
            PoolBlocks(k, _pooledK!, bs, 1);
            var sp = new SelectParams
            {
                Pq = _pooledQ!.Pointer, Pk = _pooledK!.Pointer, Counts = _counts!.Pointer, Scratch = _scratch!.Pointer,
                Heads = heads, Group = heads / kvHeads, D = d, Block = bs, QBlocks = qBlocks, KBlocks = kBlocks, SeqlenQ = sq, SeqlenK = skv,
                Causal = causal ? 1 : 0, CausalOffset = skv - sq, BudgetKind = kind, Budget = (float)value, KeepSinkDiagonal = selector.KeepSinkAndDiagonal ? 1 : 0,
            };
            void* arg = &sp;
            device.Kernel("select.cu", "select_blocks", defines).Launch((uint)qBlocks, (uint)heads, (uint)batch, 256, selectShared, &arg);

            var scan = new ScanParams { Counts = _counts.Pointer, RowStart = rowStart.Pointer, Rows = (int)rows };
            arg = &scan;
            device.Kernel("select.cu", "scan_counts", defines).Launch(1, 1, 1, 1024, 0, &arg);
            var total = new int[1];
            rowStart.CopyTo(total, rows);   // the one synchronization: the plan's size
            var columns = DeviceBuffer<int>.Allocate(Math.Max(total[0], 1));
            var kinds = DeviceBuffer<byte>.Allocate(Math.Max(total[0], 1));
            var cp = new CompactParams
            {
                Counts = _counts.Pointer, Scratch = _scratch.Pointer, RowStart = rowStart.Pointer, Cols = columns.Pointer, Kinds = kinds.Pointer,
                Heads = heads, Block = bs, QBlocks = qBlocks, KBlocks = kBlocks, SeqlenQ = sq, SeqlenK = skv, Causal = causal ? 1 : 0, CausalOffset = skv - sq,
            };
            arg = &cp;
            device.Kernel("select.cu", "compact_plan", defines).Launch((uint)rows, 1, 1, 128, 0, &arg);
            return new DeviceBlockPlan(new MaskExtent(batch, heads, sq, skv), bs, bs, batch, heads, rowStart, columns, kinds, total[0], causal ? Mask.Causal : null);
        }
    }

    /// <summary>Means of consecutive blocks of <paramref name="block"/> rows of x [B, S, H, D] (times <paramref name="scale"/>) into [B, H, blocks, D] f32.</summary>
    internal static void PoolBlocks<T>(DeviceTensor<T> x, DeviceBuffer<float> destination, int block, float scale) where T : unmanaged
    {
        int blocks = (x.Shape[1] + block - 1) / block;
        var p = new PoolParams
        {
            Src = x.Buffer.Pointer, Dst = destination.Pointer, SrcBatch = x.Strides[0], SrcRow = x.Strides[1], SrcHead = x.Strides[2],
            Length = x.Shape[1], Heads = x.Shape[2], D = x.Shape[3], Block = block, Blocks = blocks, Scale = scale,
        };
        void* arg = &p;
        CudaBackend.Device.Kernel("select.cu", "pool_blocks", Defines<T>()).Launch((uint)blocks, (uint)x.Shape[2], (uint)x.Shape[0], 256, 0, &arg);
    }

    /// <summary>select.cu's input type for T.</summary>
    internal static Dictionary<string, string> Defines<T>() where T : unmanaged => new()
    {
        ["SRC_T"] = typeof(T) == typeof(float) ? "0" : typeof(T) == typeof(Half) ? "1" : "2",
    };

    [StructLayout(LayoutKind.Sequential)]
    private struct PoolParams
    {
        public ulong Src, Dst;
        public long SrcBatch, SrcRow, SrcHead;
        public int Length, Heads, D, Block, Blocks;
        public float Scale;
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct SelectParams
    {
        public ulong Pq, Pk, Counts, Scratch;
        public int Heads, Group, D, Block, QBlocks, KBlocks, SeqlenQ, SeqlenK, Causal, CausalOffset;
        public int BudgetKind;
        public float Budget;
        public int KeepSinkDiagonal;
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct ScanParams
    {
        public ulong Counts, RowStart;
        public int Rows;
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct CompactParams
    {
        public ulong Counts, Scratch, RowStart, Cols, Kinds;
        public int Heads, Block, QBlocks, KBlocks, SeqlenQ, SeqlenK, Causal, CausalOffset;
    }
}
