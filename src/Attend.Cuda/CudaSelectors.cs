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
    private static DeviceBuffer<float>? _vsScores, _vsNorms, _vsProfiles, _mass, _estimate, _saleScales;
    private static DeviceBuffer<ushort>? _saleQ, _saleK;

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
        CudaDevice device = CudaBackend.Device;
        int selectShared = CheckPlanSize(device, rows, kBlocks, bs, d);
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
            return SelectAndCompact(sp, batch, selectShared, rowStart, defines);
        }
    }

    /// <summary>
    /// select_blocks (the budget per query-block row, from pooled scores or a precomputed mass), then the rows' starts
    /// and the CSR columns with their kinds: the plan. Called under <see cref="Gate"/> (it uses the shared scratch).
    /// </summary>
    private static DeviceBlockPlan SelectAndCompact(SelectParams sp, int batch, int selectShared, DeviceBuffer<int> rowStart, Dictionary<string, string> defines)
    {
        CudaDevice device = CudaBackend.Device;
        long rows = (long)batch * sp.Heads * sp.QBlocks;
        void* arg = &sp;
        device.Kernel("select.cu", "select_blocks", defines).Launch((uint)sp.QBlocks, (uint)sp.Heads, (uint)batch, 256, selectShared, &arg);
        Scan(sp.Counts, rowStart.Pointer, (int)rows, defines);
        var total = new int[1];
        rowStart.CopyTo(total, rows);   // the one synchronization: the plan's size
        var columns = DeviceBuffer<int>.Allocate(Math.Max(total[0], 1));
        var kinds = DeviceBuffer<byte>.Allocate(Math.Max(total[0], 1));
        var cp = new CompactParams
        {
            Counts = sp.Counts, Scratch = sp.Scratch, RowStart = rowStart.Pointer, Cols = columns.Pointer, Kinds = kinds.Pointer,
            Heads = sp.Heads, Block = sp.Block, QBlocks = sp.QBlocks, KBlocks = sp.KBlocks, SeqlenQ = sp.SeqlenQ, SeqlenK = sp.SeqlenK, Causal = sp.Causal, CausalOffset = sp.CausalOffset,
        };
        arg = &cp;
        device.Kernel("select.cu", "compact_plan", defines).Launch((uint)rows, 1, 1, 128, 0, &arg);
        return new DeviceBlockPlan(new MaskExtent(batch, sp.Heads, sp.SeqlenQ, sp.SeqlenK), sp.Block, sp.Block, batch, sp.Heads, rowStart, columns, kinds, total[0],
            sp.Causal != 0 ? Mask.Causal : null);
    }

    /// <summary>
    /// XAttention's plan (<see cref="XAttentionSelector"/>) for q [B, Sq, H, D] and k [B, Skv, Hkv, D], built on the
    /// device: antidiagonal scores of stride s as products of regrouped rows on the tensor cores (estimate.cu), their
    /// softmax per query group summed per (query block, key block), then per query-block row the fewest key blocks
    /// holding <see cref="XAttentionSelector.Threshold"/> of the mass plus the first and the diagonal block — the CPU
    /// selector's choice up to rounding at the threshold's edge (f32 inputs are rounded to bf16 operands; the CPU
    /// estimates in f32). Needs BlockSize / Stride in {8, 16, 32, 64} and D a multiple of 8.
    /// </summary>
    public static DeviceBlockPlan Plan<T>(XAttentionSelector selector, DeviceTensor<T> q, DeviceTensor<T> k, bool causal = true, float? scale = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(selector);
        (int batch, int sq, int heads, int d, int skv, int kvHeads, float s) = CheckInputs(q, k, scale);
        int bs = selector.BlockSize, stride = selector.Stride, groupCols = bs / stride;
        if (bs % stride != 0 || groupCols is not (8 or 16 or 32 or 64))
        {
            throw new NotSupportedException($"the GPU xattention estimate needs BlockSize / Stride in 8, 16, 32 or 64; got BlockSize={bs}, Stride={stride}");
        }
        if (d % 8 != 0 || q.Strides[0] % 8 != 0 || q.Strides[1] % 8 != 0 || q.Strides[2] % 8 != 0 || k.Strides[0] % 8 != 0 || k.Strides[1] % 8 != 0 || k.Strides[2] % 8 != 0)
        {
            throw new NotSupportedException($"the GPU xattention estimate reads q and k in 8-element vectors: D and the strides must be multiples of 8; got D={d}, q strides [{q.Strides[0]}, {q.Strides[1]}, {q.Strides[2]}], k strides [{k.Strides[0]}, {k.Strides[1]}, {k.Strides[2]}]");
        }
        int qBlocks = (sq + bs - 1) / bs, kBlocks = (skv + bs - 1) / bs, qGroups = (sq + stride - 1) / stride, kGroups = (skv + stride - 1) / stride;
        long rows = (long)batch * heads * qBlocks;
        CudaDevice device = CudaBackend.Device;
        int selectShared = CheckPlanSize(device, rows, kBlocks, bs, 0);
        Dictionary<string, string> defines = Defines<T>();
        Dictionary<string, string> estimateDefines = new(defines) { ["GROUP_COLS"] = groupCols.ToString(System.Globalization.CultureInfo.InvariantCulture) };
        // The scratch of per-(row, key block) log-sum-exps, bounded by running the heads in chunks.
        long perHead = (long)batch * qGroups * kBlocks;
        int launchHeads = HeadsPerLaunch(perHead, heads);
        var rowStart = DeviceBuffer<int>.Allocate(rows + 1);
        lock (Gate)
        {
            DeviceBuffer<float>.EnsureLength(ref _mass, rows * kBlocks);
            DeviceBuffer<float>.EnsureLength(ref _estimate, perHead * launchHeads);
            DeviceBuffer<int>.EnsureLength(ref _counts, rows);
            DeviceBuffer<int>.EnsureLength(ref _scratch, rows * kBlocks);
            var ap = new EstimateParams
            {
                Q = q.Buffer.Pointer, K = k.Buffer.Pointer, BlockLse = _estimate!.Pointer, Mass = _mass!.Pointer,
                QBatch = q.Strides[0], QRow = q.Strides[1], QHead = q.Strides[2], KBatch = k.Strides[0], KRow = k.Strides[1], KHead = k.Strides[2],
                Heads = heads, Group = heads / kvHeads, D = d, Stride = stride, SeqlenQ = sq, SeqlenK = skv, Causal = causal ? 1 : 0, CausalOffset = skv - sq,
                QGroups = qGroups, KGroups = kGroups, Block = bs, QBlocks = qBlocks, KBlocks = kBlocks, Scale = s / stride,
            };
            CudaKernel estimate = device.Kernel("estimate.cu", "antidiagonal_lse", estimateDefines);
            for (int h0 = 0; h0 < heads; h0 += launchHeads)
            {
                ap.Head0 = h0;
                void* a = &ap;
                estimate.Launch((uint)Math.Min(launchHeads, heads - h0), (uint)((qGroups + EstimateRows - 1) / EstimateRows), (uint)batch, EstimateThreads, 0, &a);
            }
            var sp = new SelectParams
            {
                Counts = _counts!.Pointer, Scratch = _scratch!.Pointer, Mass = _mass.Pointer,
                Heads = heads, Group = heads / kvHeads, D = 0, Block = bs, QBlocks = qBlocks, KBlocks = kBlocks, SeqlenQ = sq, SeqlenK = skv,
                Causal = causal ? 1 : 0, CausalOffset = skv - sq, BudgetKind = 1, Budget = (float)selector.Threshold, KeepSinkDiagonal = 1,
            };
            return SelectAndCompact(sp, batch, selectShared, rowStart, defines);
        }
    }

    /// <summary>
    /// SALE's plan (<see cref="SaleSelector"/>) for q [B, Sq, H, D] and k [B, Skv, Hkv, D], built on the device: keys
    /// smoothed by their mean, q (every <see cref="SaleSelector.RowStride"/>-th row of each block) and k quantized per
    /// token to <see cref="SaleSelector.Bits"/> bits, the integer products on the tensor cores (int8, exact), each
    /// sampled row's largest estimate per key block, and per query block the blocks whose relative score
    /// max(block max − row max) reaches ln(<see cref="SaleSelector.Threshold"/>) — the CPU selector's choice up to the
    /// rounding of the keys' mean (summed in f32 here, f64 there) at the quantization's edges. Needs D a multiple of 8
    /// up to 256 (block sizes 64, 128 and 256 are whole 64-key tiles).
    /// </summary>
    public static DeviceBlockPlan Plan<T>(SaleSelector selector, DeviceTensor<T> q, DeviceTensor<T> k, bool causal = true, float? scale = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(selector);
        (int batch, int sq, int heads, int d, int skv, int kvHeads, float s) = CheckInputs(q, k, scale);
        int bs = selector.BlockSize, rowStride = selector.RowStride;
        if (d % 8 != 0 || d > 256) throw new NotSupportedException($"the GPU sale estimate needs D a multiple of 8 up to 256; got D={d}");
        int qBlocks = (sq + bs - 1) / bs, kBlocks = (skv + bs - 1) / bs;
        int rowsPerBlock = ((bs - 1) / rowStride) + 1, lastRows = ((sq - ((qBlocks - 1) * bs) - 1) / rowStride) + 1;
        int sampled = ((qBlocks - 1) * rowsPerBlock) + lastRows;
        long rows = (long)batch * heads * qBlocks;
        CudaDevice device = CudaBackend.Device;
        int selectShared = CheckPlanSize(device, rows, kBlocks, bs, 0);
        Dictionary<string, string> defines = Defines<T>();
        // The quantized rows are int8, in rows of dPad bytes (whole 16-byte units), staged as 16-bit units by the estimate.
        int dPad = (d + 15) / 16 * 16;
        Dictionary<string, string> integerDefines = new() { ["SRC_T"] = "2", ["INT8_OPS"] = "1" };
        long perHead = (long)batch * sampled * kBlocks;
        int launchHeads = HeadsPerLaunch(perHead, heads);
        int levels = selector.Bits == 4 ? 7 : 127;
        var rowStart = DeviceBuffer<int>.Allocate(rows + 1);
        lock (Gate)
        {
            long qScales = (long)batch * heads * sampled, kScales = (long)batch * kvHeads * skv, sums = (long)batch * kvHeads * d;
            DeviceBuffer<ushort>.EnsureLength(ref _saleQ, (long)batch * sampled * heads * dPad / 2);
            DeviceBuffer<ushort>.EnsureLength(ref _saleK, (long)batch * skv * kvHeads * dPad / 2);
            DeviceBuffer<float>.EnsureLength(ref _saleScales, qScales + kScales + sums);
            DeviceBuffer<float>.EnsureLength(ref _mass, rows * kBlocks);
            DeviceBuffer<float>.EnsureLength(ref _estimate, perHead * launchHeads);
            DeviceBuffer<int>.EnsureLength(ref _counts, rows);
            DeviceBuffer<int>.EnsureLength(ref _scratch, rows * kBlocks);
            ulong qScale = _saleScales!.Pointer, kScale = qScale + ((ulong)qScales * sizeof(float)), keySums = kScale + ((ulong)kScales * sizeof(float));
            _saleScales.Clear();   // the key sums accumulate atomically

            var kp = new QuantizeParams
            {
                Src = k.Buffer.Pointer, Dst = _saleK!.Pointer, Scales = kScale, Sums = keySums,
                SrcBatch = k.Strides[0], SrcRow = k.Strides[1], SrcHead = k.Strides[2], DstBatch = (long)skv * kvHeads * dPad, DstRow = (long)kvHeads * dPad, DstHead = dPad,
                Rows = skv, Heads = kvHeads, D = d, Levels = levels, Length = skv, Scale = 1, DPad = dPad,
            };
            void* arg = &kp;
            device.Kernel("estimate.cu", "key_sums", defines).Launch((uint)((skv + 255) / 256), (uint)kvHeads, (uint)batch, 256, 0, &arg);
            device.Kernel("estimate.cu", "quantize_rows", defines).Launch((uint)((skv + QuantizeRowsPerBlock - 1) / QuantizeRowsPerBlock), (uint)kvHeads, (uint)batch, 256, 0, &arg);
            var qp = new QuantizeParams
            {
                Src = q.Buffer.Pointer, Dst = _saleQ!.Pointer, Scales = qScale, Sums = 0,
                SrcBatch = q.Strides[0], SrcRow = q.Strides[1], SrcHead = q.Strides[2], DstBatch = (long)sampled * heads * dPad, DstRow = (long)heads * dPad, DstHead = dPad,
                Rows = sampled, Heads = heads, D = d, Levels = levels, Length = sq,
                Sampled = 1, Block = bs, QBlocks = qBlocks, RowStride = rowStride, RowsPerBlock = rowsPerBlock, Scale = s, DPad = dPad,
            };
            arg = &qp;
            device.Kernel("estimate.cu", "quantize_rows", defines).Launch((uint)((sampled + QuantizeRowsPerBlock - 1) / QuantizeRowsPerBlock), (uint)heads, (uint)batch, 256, 0, &arg);

            var ep = new EstimateParams
            {
                Q = _saleQ.Pointer, K = _saleK.Pointer, BlockLse = _estimate!.Pointer, Mass = _mass!.Pointer,
                QBatch = qp.DstBatch / 2, QRow = qp.DstRow / 2, QHead = qp.DstHead / 2, KBatch = kp.DstBatch / 2, KRow = kp.DstRow / 2, KHead = kp.DstHead / 2,
                Heads = heads, Group = heads / kvHeads, D = dPad / 2, Stride = 1, SeqlenQ = sq, SeqlenK = skv, Causal = causal ? 1 : 0, CausalOffset = skv - sq,
                QGroups = sampled, KGroups = skv, Block = bs, QBlocks = qBlocks, KBlocks = kBlocks, Scale = 1,
                QScales = qScale, KScales = kScale, RowStride = rowStride, RowsPerBlock = rowsPerBlock,
            };
            CudaKernel estimate = device.Kernel("estimate.cu", "scaled_block_max", integerDefines);
            CudaKernel relative = device.Kernel("estimate.cu", "sale_relative", integerDefines);
            for (int h0 = 0; h0 < heads; h0 += launchHeads)
            {
                ep.Head0 = h0;
                uint chunk = (uint)Math.Min(launchHeads, heads - h0);
                void* a = &ep;
                estimate.Launch(chunk, (uint)((sampled + EstimateRows - 1) / EstimateRows), (uint)batch, EstimateThreads, 0, &a);
                relative.Launch((uint)qBlocks, chunk, (uint)batch, 256, 0, &a);
            }
            var sp = new SelectParams
            {
                Counts = _counts!.Pointer, Scratch = _scratch!.Pointer, Mass = _mass.Pointer,
                Heads = heads, Group = heads / kvHeads, D = 0, Block = bs, QBlocks = qBlocks, KBlocks = kBlocks, SeqlenQ = sq, SeqlenK = skv,
                Causal = causal ? 1 : 0, CausalOffset = skv - sq, BudgetKind = 2,
                Budget = selector.Threshold > 0 ? (float)Math.Log(selector.Threshold) : float.NegativeInfinity, KeepSinkDiagonal = selector.KeepSinkAndDiagonal ? 1 : 0,
            };
            return SelectAndCompact(sp, batch, selectShared, rowStart, defines);
        }
    }

    /// <summary>Rows quantize_rows handles per thread block: 8 warps × QUANT_ROWS (estimate.cu).</summary>
    private const int QuantizeRowsPerBlock = 8 * 4;

    /// <summary>estimate.cu's rows per thread block (EST_ROWS) and threads (THREADS).</summary>
    private const int EstimateRows = 128, EstimateThreads = 256;

    /// <summary>Floats of the estimates' per-(row, key block) scratch (256 MiB): heads run in chunks that fit.</summary>
    private const long EstimateScratchElements = 64L << 20;

    /// <summary>Heads per launch of an estimate whose scratch takes <paramref name="perHead"/> floats a head.</summary>
    private static int HeadsPerLaunch(long perHead, int heads) => (int)Math.Clamp(EstimateScratchElements / Math.Max(perHead, 1), 1, heads);

    /// <summary>
    /// Makes the device current and checks that select_blocks can hold a row of <paramref name="kBlocks"/> values (and
    /// <paramref name="extraFloats"/>) in shared memory and that the plan's indices fit in 32 bits; returns the bytes.
    /// </summary>
    private static int CheckPlanSize(CudaDevice device, long rows, int kBlocks, int blockSize, int extraFloats)
    {
        device.MakeCurrent();
        int selectShared = (kBlocks + extraFloats) * sizeof(float);
        if (selectShared > device.MaxSharedMemoryPerBlock)
        {
            throw new NotSupportedException($"{kBlocks} key blocks of {blockSize} keys need {selectShared} bytes of shared memory per row; {device.Name} allows {device.MaxSharedMemoryPerBlock} (use a larger BlockSize)");
        }
        if (rows >= int.MaxValue || rows * kBlocks >= int.MaxValue) throw new NotSupportedException($"{rows} block rows × {kBlocks} key blocks exceed the selector's 32-bit plan indices");
        return selectShared;
    }

    /// <summary>Whether <see cref="Plan{T}(ISparsitySelector, DeviceTensor{T}, DeviceTensor{T}, bool, float?)"/> builds this selector's plan on the device.</summary>
    public static bool HasGpuVersion(ISparsitySelector selector) => selector is PooledBlockSelector or VerticalSlashSelector or XAttentionSelector or SaleSelector;

    /// <summary>
    /// The plan of any selector that has a GPU version — <see cref="PooledBlockSelector"/>,
    /// <see cref="VerticalSlashSelector"/>, <see cref="XAttentionSelector"/> or <see cref="SaleSelector"/> — built on the
    /// device; other selectors are named as unsupported.
    /// </summary>
    public static DeviceBlockPlan Plan<T>(ISparsitySelector selector, DeviceTensor<T> q, DeviceTensor<T> k, bool causal = true, float? scale = null) where T : unmanaged =>
        selector switch
        {
            PooledBlockSelector pooled => Plan(pooled, q, k, causal, scale),
            VerticalSlashSelector verticalSlash => Plan(verticalSlash, q, k, causal, scale),
            XAttentionSelector xattention => Plan(xattention, q, k, causal, scale),
            SaleSelector sale => Plan(sale, q, k, causal, scale),
            null => throw new ArgumentNullException(nameof(selector)),
            _ => throw new NotSupportedException($"{selector.Name} has no GPU version; the GPU builds plans for the pooled, vertical-slash, xattention and sale selectors"),
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
        public ulong Mass;
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct EstimateParams
    {
        public ulong Q, K, BlockLse, Mass;
        public long QBatch, QRow, QHead, KBatch, KRow, KHead;
        public int Heads, Group, D, Stride, Head0;
        public int SeqlenQ, SeqlenK, Causal, CausalOffset;
        public int QGroups, KGroups, Block, QBlocks, KBlocks;
        public float Scale;
        public ulong QScales, KScales;
        public int RowStride, RowsPerBlock;
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct QuantizeParams
    {
        public ulong Src, Dst, Scales, Sums;
        public long SrcBatch, SrcRow, SrcHead, DstBatch, DstRow, DstHead;
        public int Rows, Heads, D, Levels, Length;
        public int Sampled, Block, QBlocks, RowStride, RowsPerBlock;
        public float Scale;
        public int DPad;
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
