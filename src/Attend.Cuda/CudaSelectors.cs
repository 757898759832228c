using System.Runtime.InteropServices;
using Attend.Masks;
using Attend.Sparse;
using Attend.Tensors;

namespace Attend.Cuda;

/// <summary>
/// Sparse selectors that build their plan on the GPU (kernel <c>select.cu</c>), so that the plan of a long sequence
/// costs a few launches instead of a download of q and k and a CPU pass: the pooled block estimate of
/// <see cref="PooledBlockSelector"/> and MInference's vertical-slash estimate of <see cref="VerticalSlashSelector"/> —
/// the CPU selector's choice up to float rounding at the budget's edge (budgets are applied as thresholds found on the
/// device: bisected for the pooled budget, a radix select for vertical-slash's top-k).
/// </summary>
public static unsafe class CudaSelectors
{
    private static readonly Lock Gate = new();
    private static DeviceBuffer<float>? _pooledQ, _pooledK;
    private static DeviceBuffer<int>? _counts, _scratch, _tokenScratch, _vsLists;
    private static DeviceBuffer<float>? _vsScores, _vsNorms, _vsProfiles;

    /// <summary>
    /// The plan <paramref name="selector"/> chooses for q [B, Sq, H, D] and k [B, Skv, Hkv, D] (f32, f16 or bf16 on the
    /// device), built on the device: mean-pooled blocks, softmax per query-block row over the visible key blocks, the
    /// selector's <see cref="PooledBlockSelector.Budget"/>, sink and diagonal blocks kept when asked. Causal plans are
    /// bottom-right aligned as the attention kernel's causal mask and mark the diagonal blocks Partial.
    /// </summary>
    public static DeviceBlockPlan Plan<T>(PooledBlockSelector selector, DeviceTensor<T> q, DeviceTensor<T> k, bool causal = true, float? scale = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(selector);
        (int batch, int sq, int heads, int d, int skv, int kvHeads, float s) = CheckInputs(q, k, scale);
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

            Scan(_counts.Pointer, rowStart.Pointer, (int)rows, defines);
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

    /// <summary>
    /// The plan of any selector that has a GPU version — <see cref="PooledBlockSelector"/> or
    /// <see cref="VerticalSlashSelector"/> — built on the device; other selectors are named as unsupported.
    /// </summary>
    public static DeviceBlockPlan Plan<T>(ISparsitySelector selector, DeviceTensor<T> q, DeviceTensor<T> k, bool causal = true, float? scale = null) where T : unmanaged =>
        selector switch
        {
            PooledBlockSelector pooled => Plan(pooled, q, k, causal, scale),
            VerticalSlashSelector verticalSlash => Plan(verticalSlash, q, k, causal, scale),
            null => throw new ArgumentNullException(nameof(selector)),
            _ => throw new NotSupportedException($"{selector.Name} has no GPU version; the GPU builds plans for the pooled and vertical-slash selectors"),
        };

    /// <summary>
    /// MInference's vertical-slash plan (<see cref="VerticalSlashSelector"/>) for q [B, Sq, H, D] and k [B, Skv, Hkv, D],
    /// built on the device: the last <see cref="VerticalSlashSelector.LastQueries"/> (≤ 64) queries scored against every
    /// key, their softmax summed per column and per diagonal, the top columns as gathered tokens and the blocks the top
    /// diagonals cross as the plan's blocks — the CPU selector's choice up to float rounding at the budget's edge.
    /// </summary>
    public static DeviceBlockPlan Plan<T>(VerticalSlashSelector selector, DeviceTensor<T> q, DeviceTensor<T> k, bool causal = true, float? scale = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(selector);
        (int batch, int sq, int heads, int d, int skv, int kvHeads, float s) = CheckInputs(q, k, scale);
        if (selector.LastQueries > LastQueriesMax)
        {
            throw new NotSupportedException($"the GPU vertical-slash estimate scores at most {LastQueriesMax} last queries; the selector asks for {selector.LastQueries}");
        }
        int bs = selector.BlockSize, qBlocks = (sq + bs - 1) / bs, kBlocks = (skv + bs - 1) / bs;
        int rows = Math.Min(selector.LastQueries, sq), headRows = batch * heads;
        int verticals = Math.Min(skv, Math.Max(selector.Verticals, Math.Min(selector.SinkColumns, skv)));
        int slashes = Math.Min(skv, Math.Max(selector.Slashes, Math.Min(selector.LocalDiagonals, skv)));
        long planRows = (long)headRows * qBlocks;
        if (planRows >= int.MaxValue || planRows * Math.Max(kBlocks, verticals) >= int.MaxValue)
        {
            throw new NotSupportedException($"{planRows} block rows × {kBlocks} key blocks exceed the selector's 32-bit plan indices");
        }
        CudaDevice device = CudaBackend.Device;
        device.MakeCurrent();
        Dictionary<string, string> defines = Defines<T>();
        var rowStart = DeviceBuffer<int>.Allocate(planRows + 1);
        var tokenRowStart = DeviceBuffer<int>.Allocate(planRows + 1);
        lock (Gate)
        {
            DeviceBuffer<float>.EnsureLength(ref _vsScores, (long)headRows * rows * skv);
            int keyGroups = (skv + 255) / 256;
            DeviceBuffer<float>.EnsureLength(ref _vsNorms, (long)headRows * rows * 2 * (keyGroups + 1));
            DeviceBuffer<float>.EnsureLength(ref _vsProfiles, 2L * headRows * skv);
            DeviceBuffer<int>.EnsureLength(ref _vsLists, (long)headRows * (verticals + slashes + 2));
            DeviceBuffer<int>.EnsureLength(ref _counts, planRows * 2);
            DeviceBuffer<int>.EnsureLength(ref _scratch, planRows * kBlocks);
            DeviceBuffer<int>.EnsureLength(ref _tokenScratch, planRows * Math.Max(verticals, 1));
            var sp = new VsScoreParams
            {
                Q = q.Buffer.Pointer, K = k.Buffer.Pointer, Scores = _vsScores!.Pointer, Partials = _vsNorms!.Pointer + ((ulong)headRows * (ulong)rows * 2 * sizeof(float)),
                QBatch = q.Strides[0], QRow = q.Strides[1], QHead = q.Strides[2], KBatch = k.Strides[0], KRow = k.Strides[1], KHead = k.Strides[2],
                Heads = heads, Group = heads / kvHeads, D = d, Rows = rows, First = sq - rows, SeqlenK = skv, Causal = causal ? 1 : 0, CausalOffset = skv - sq, KeyGroups = keyGroups, Scale = s,
            };
            ulong norms = _vsNorms!.Pointer, vertical = _vsProfiles!.Pointer, slash = vertical + ((ulong)headRows * (ulong)skv * sizeof(float));
            ulong columnList = _vsLists!.Pointer, offsetList = columnList + ((ulong)headRows * (ulong)verticals * sizeof(int));
            ulong columnCount = offsetList + ((ulong)headRows * (ulong)slashes * sizeof(int)), offsetCount = columnCount + ((ulong)headRows * sizeof(int));
            void* arg = &sp;
            device.Kernel("select.cu", "vs_scores", defines).Launch((uint)keyGroups, (uint)heads, (uint)batch, 256, 0, &arg);
            void** args = stackalloc void*[6];
            args[0] = &sp;
            args[1] = &norms;
            device.Kernel("select.cu", "vs_norms", defines).Launch((uint)rows, (uint)heads, (uint)batch, 256, 0, args);
            int sinkColumns = selector.SinkColumns, localDiagonals = selector.LocalDiagonals;
            args[2] = &vertical;
            args[3] = &slash;
            args[4] = &sinkColumns;
            args[5] = &localDiagonals;
            device.Kernel("select.cu", "vs_profile", defines).Launch((uint)keyGroups, (uint)heads, (uint)batch, 256, 0, args);
            TopK(vertical, skv, verticals, columnList, verticals, columnCount, headRows, defines);
            TopK(slash, skv, slashes, offsetList, slashes, offsetCount, headRows, defines);

            ulong blockCounts = _counts!.Pointer, tokenCounts = blockCounts + ((ulong)planRows * sizeof(int));
            var pp = new VsPlanParams
            {
                Columns = columnList, ColumnCount = columnCount, Offsets = offsetList, OffsetCount = offsetCount,
                BlockCounts = blockCounts, BlockScratch = _scratch!.Pointer, TokenCounts = tokenCounts, TokenScratch = _tokenScratch!.Pointer,
                Heads = heads, Block = bs, QBlocks = qBlocks, KBlocks = kBlocks, SeqlenQ = sq, SeqlenK = skv, Causal = causal ? 1 : 0, CausalOffset = skv - sq,
                ColumnStride = verticals, OffsetStride = slashes,
            };
            arg = &pp;
            device.Kernel("select.cu", "vs_plan", defines).Launch((uint)qBlocks, (uint)heads, (uint)batch, 256, kBlocks, &arg);
            Scan(blockCounts, rowStart.Pointer, (int)planRows, defines);
            Scan(tokenCounts, tokenRowStart.Pointer, (int)planRows, defines);
            var totals = new int[1];
            rowStart.CopyTo(totals, planRows);
            int blockTotal = totals[0];
            tokenRowStart.CopyTo(totals, planRows);
            int tokenTotal = totals[0];
            var columns = DeviceBuffer<int>.Allocate(Math.Max(blockTotal, 1));
            var kinds = DeviceBuffer<byte>.Allocate(Math.Max(blockTotal, 1));
            var tokens = DeviceBuffer<int>.Allocate(Math.Max(tokenTotal, 1));
            var cp = new CompactParams
            {
                Counts = blockCounts, Scratch = _scratch.Pointer, RowStart = rowStart.Pointer, Cols = columns.Pointer, Kinds = kinds.Pointer,
                Heads = heads, Block = bs, QBlocks = qBlocks, KBlocks = kBlocks, SeqlenQ = sq, SeqlenK = skv, Causal = causal ? 1 : 0, CausalOffset = skv - sq,
            };
            arg = &cp;
            device.Kernel("select.cu", "compact_plan", defines).Launch((uint)planRows, 1, 1, 128, 0, &arg);
            ulong tokenScratch = _tokenScratch.Pointer, tokenStarts = tokenRowStart.Pointer, tokenDestination = tokens.Pointer;
            int stride = verticals;
            args[0] = &tokenCounts;
            args[1] = &tokenScratch;
            args[2] = &stride;
            args[3] = &tokenStarts;
            args[4] = &tokenDestination;
            device.Kernel("select.cu", "compact_rows", defines).Launch((uint)planRows, 1, 1, 128, 0, args);
            Mask? mask = causal ? Mask.Causal : null;
            return new DeviceBlockPlan(new MaskExtent(batch, heads, sq, skv), bs, bs, batch, heads, rowStart, columns, kinds, blockTotal, mask,
                tokenRowStart, tokens, tokenTotal, mask);
        }
    }

    /// <summary>The most last queries the GPU vertical-slash estimate scores (select.cu's LAST_Q).</summary>
    private const int LastQueriesMax = 64;

    /// <summary>
    /// topk_rows: per row of <paramref name="rows"/> × <paramref name="n"/> floats the k largest, their indices ascending
    /// at <paramref name="list"/> + row · <paramref name="listStride"/> and their number in <paramref name="count"/>.
    /// </summary>
    internal static void TopK(ulong values, int n, int k, ulong list, int listStride, ulong count, int rows, Dictionary<string, string> defines)
    {
        void** args = stackalloc void*[6];
        args[0] = &values;
        args[1] = &n;
        args[2] = &k;
        args[3] = &list;
        args[4] = &listStride;
        args[5] = &count;
        CudaBackend.Device.Kernel("select.cu", "topk_rows", defines).Launch((uint)rows, 1, 1, 256, 0, args);
    }

    /// <summary>scan_counts: row starts (an exclusive scan, the total last) of <paramref name="rows"/> counts.</summary>
    private static void Scan(ulong counts, ulong rowStart, int rows, Dictionary<string, string> defines)
    {
        var scan = new ScanParams { Counts = counts, RowStart = rowStart, Rows = rows };
        void* arg = &scan;
        CudaBackend.Device.Kernel("select.cu", "scan_counts", defines).Launch(1, 1, 1, 1024, 0, &arg);
    }

    /// <summary>Checks q [B, Sq, H, D] and k [B, Skv, Hkv, D] on the device and the scale with the CPU selectors' rules.</summary>
    private static (int Batch, int QueryLength, int Heads, int HeadDim, int KeyLength, int KvHeads, float Scale) CheckInputs<T>(
        DeviceTensor<T> q, DeviceTensor<T> k, float? scale) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(q);
        ArgumentNullException.ThrowIfNull(k);
        if (typeof(T) != typeof(float) && typeof(T) != typeof(Half) && typeof(T) != typeof(BFloat16))
        {
            throw new ArgumentException($"element type must be float, Half or BFloat16; got {typeof(T).Name}", nameof(q));
        }
        var checkedShapes = SparsitySelector.CheckShapes(q.Shape, k.Shape, scale);
        if (q.Strides[3] != 1 || k.Strides[3] != 1) throw new NotSupportedException("the GPU selector needs the last dimension of q and k contiguous");
        return checkedShapes;
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

    [StructLayout(LayoutKind.Sequential)]
    private struct VsScoreParams
    {
        public ulong Q, K, Scores, Partials;
        public long QBatch, QRow, QHead, KBatch, KRow, KHead;
        public int Heads, Group, D, Rows, First, SeqlenK, Causal, CausalOffset, KeyGroups;
        public float Scale;
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct VsPlanParams
    {
        public ulong Columns, ColumnCount, Offsets, OffsetCount, BlockCounts, BlockScratch, TokenCounts, TokenScratch;
        public int Heads, Block, QBlocks, KBlocks, SeqlenQ, SeqlenK, Causal, CausalOffset, ColumnStride, OffsetStride;
    }
}
