using System.Runtime.InteropServices;
using Attend.Tensors;

namespace Attend.Cuda;

/// <summary>Lets <c>Attention.Forward</c> take device tensors when Attend.Cuda is referenced.</summary>
public static class AttentionCudaExtensions
{
    extension(Attention)
    {
        /// <summary>Fused attention on the GPU; see <see cref="CudaAttention"/>.</summary>
        public static void Forward<T>(DeviceTensor<T> q, DeviceTensor<T> k, DeviceTensor<T> v, DeviceTensor<T> output,
            AttentionOptions? options = null, DeviceTensor<float>? lse = null) where T : unmanaged =>
            CudaAttention.Forward(q, k, v, output, options, lse);
    }
}

/// <summary>
/// Attention on the GPU with the same options as the CPU: <c>Attention.Forward(q, k, v, output, options, lse)</c>
/// with <see cref="DeviceTensor{T}"/> arguments. bf16 and f16 run on tensor cores directly; f32 tensors are
/// rounded to bf16 on the device first (so their error is bf16's), and the output converted back.
/// </summary>
public static unsafe class CudaAttention
{
    /// <summary>
    /// Computes attention on the device: q [B, Sq, H, D], k [B, Skv, Hkv, D], v [B, Skv, Hkv, D] → output
    /// [B, Sq, H, D], optional lse [B, Sq, H]. Supports causal (bottom-right), GQA/MQA, softcap, scale, D ≤ 256
    /// (Dv = D), masks (<see cref="AttentionOptions.Mask"/>: planned on the host, partial blocks evaluate the mask's
    /// <c>ToCuda</c> expression compiled into the kernel) and block plans (<see cref="AttentionOptions.Plan"/> with
    /// a <see cref="Masks.BlockMask"/> and/or a <see cref="Masks.TokenSet"/> of gathered key rows; uploaded once per plan
    /// object), also over a token permutation (gathered and scattered on the device) or with centroid compensation.
    /// ALiBi, bias tensors and predicates are CPU-only for now (NotSupportedException).
    /// </summary>
    public static void Forward<T>(DeviceTensor<T> q, DeviceTensor<T> k, DeviceTensor<T> v, DeviceTensor<T> output,
        AttentionOptions? options = null, DeviceTensor<float>? lse = null) where T : unmanaged =>
        Run(q, k, v, output, options, lse, null);

    /// <summary>
    /// As the other overload, walking a plan already in device memory (built by a GPU selector such as
    /// <see cref="CudaSelectors"/>, or <see cref="DeviceBlockPlan.Upload"/>ed). The plan carries causality;
    /// <paramref name="options"/> must not also hold a plan or a mask.
    /// </summary>
    public static void Forward<T>(DeviceTensor<T> q, DeviceTensor<T> k, DeviceTensor<T> v, DeviceTensor<T> output,
        DeviceBlockPlan plan, AttentionOptions? options = null, DeviceTensor<float>? lse = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(plan);
        if (options?.Plan is not null || options?.Mask is not null)
        {
            throw new ArgumentException("pass either a device plan or options.Plan / options.Mask, not both", nameof(options));
        }
        Run(q, k, v, output, options, lse, plan);
    }

    private static void Run<T>(DeviceTensor<T> q, DeviceTensor<T> k, DeviceTensor<T> v, DeviceTensor<T> output,
        AttentionOptions? options, DeviceTensor<float>? lse, DeviceBlockPlan? givenPlan) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(q);
        ArgumentNullException.ThrowIfNull(k);
        ArgumentNullException.ThrowIfNull(v);
        ArgumentNullException.ThrowIfNull(output);
        options ??= AttentionOptions.Default;
        if (typeof(T) != typeof(float) && typeof(T) != typeof(Half) && typeof(T) != typeof(BFloat16))
        {
            throw new ArgumentException($"element type must be float, Half or BFloat16; got {typeof(T).Name}", nameof(q));
        }
        AttentionShape s = AttentionShape.Of(q.Shape, k.Shape, v.Shape);
        s.RequireOutput(output.Shape, nameof(output));
        if (lse is not null) s.RequireLse(lse.Shape, nameof(lse));
        float scale = s.Validate(options);
        if (s.ValueDim != s.HeadDim) throw new NotSupportedException($"the CUDA kernel needs Dv = D; got D={s.HeadDim}, Dv={s.ValueDim}");
        if (s.HeadDim > 256) throw new NotSupportedException($"the CUDA kernel supports head dims up to 256; got {s.HeadDim}");
        if (options.AlibiSlopes is not null || !options.Bias.IsDefault || options.Predicate is not null)
        {
            throw new NotSupportedException("ALiBi, bias tensors and predicates run on the CPU only for now");
        }
        if (scale == 0) throw new NotSupportedException("the CUDA kernel needs Scale > 0 (0 would make masked scores NaN)");
        if (ReferenceEquals(output.Buffer, q.Buffer) || ReferenceEquals(output.Buffer, k.Buffer) || ReferenceEquals(output.Buffer, v.Buffer))
        {
            throw new ArgumentException("output must not share a buffer with q, k or v", nameof(output));
        }

        CudaDevice device = CudaBackend.Device;
        device.MakeCurrent();
        if (options.Plan?.Permutation is { } permutation)
        {
            RunPermuted(q, k, v, output, options, lse, permutation, s);
            return;
        }
        if (options.Plan is { Compensation: Masks.Compensation.Centroid } compensated)
        {
            RunCompensated(q, k, v, output, options, lse, compensated, s, scale);
            return;
        }
        bool bf16 = typeof(T) != typeof(Half);
        using Operand qo = Operand.Prepare(q, bf16);
        using Operand ko = Operand.Prepare(k, bf16);
        using Operand vo = Operand.Prepare(v, bf16);
        using Operand oo = Operand.PrepareOutput(output, bf16);

        FlashConfig config = FlashConfig.For(s.HeadDim);
        if (config.SharedBytes > device.MaxSharedMemoryPerBlock)
        {
            throw new NotSupportedException($"head dim {s.HeadDim} needs {config.SharedBytes} bytes of shared memory; {device.Name} allows {device.MaxSharedMemoryPerBlock}");
        }
        givenPlan?.RequireFits(s);
        Masks.BlockMask? blocks = options.Plan?.Blocks;
        Masks.TokenSet? tokens = options.Plan?.Tokens;
        if (givenPlan is null && blocks is null && tokens is null && options.Mask is not null)
        {
            // Planned on the host with the kernel's query block and 128-key blocks (analytic: O(non-empty blocks)).
            Masks.Mask mask = options.Causal ? Masks.Mask.Causal & options.Mask : options.Mask;
            blocks = Masks.BlockMask.Create(mask, s.Batch, s.Heads, s.QueryLength, s.KeyLength, Math.Max(config.BlockM, 128), 128);
        }
        bool planned = givenPlan is not null || blocks is not null || tokens is not null;
        Dictionary<string, string> defines = config.Defines(bf16, options.Causal && !planned, options.Softcap > 0, config.WgmmaLevel(device.Architecture));
        DeviceBlockPlan? devicePlan = givenPlan;
        // Gathered key rows, from options.Plan's TokenSet (uploaded once per plan) or carried by the device plan.
        (ulong RowStart, ulong Tokens, int Batch, int Heads, int QueryBlocks, int BlockQ, Masks.Mask? Mask)? gathered = null;
        var extent = new Masks.MaskExtent(s.Batch, s.Heads, s.QueryLength, s.KeyLength);
        if (planned)
        {
            // A caller's plan is uploaded once and kept with it; a plan built here from options.Mask is freed after the launch.
            devicePlan ??= blocks is null ? DeviceBlockPlan.Empty(tokens!) : options.Plan is null ? DeviceBlockPlan.Upload(blocks) : DeviceBlockPlan.For(blocks);
            int blockK = blocks is null && tokens is not null ? config.BlockN : devicePlan.BlockK;   // the extent was checked by s.Validate or RequireFits
            if (devicePlan.BlockQ % config.BlockM != 0 || blockK % config.BlockN != 0)
            {
                throw new NotSupportedException($"the CUDA kernel for D={s.HeadDim} needs plan blocks that are multiples of {config.BlockM} queries × {config.BlockN} keys; the plan has {devicePlan.BlockQ}×{(blocks is null && tokens is not null ? "tokens" : devicePlan.BlockK.ToString(System.Globalization.CultureInfo.InvariantCulture))}");
            }
            defines["HAS_PLAN"] = "1";
            defines["MASK_EXPR"] = devicePlan.Mask?.ToCuda(extent) ?? "true";
            if (tokens is not null)
            {
                DeviceTokens t = DeviceTokens.For(options.Plan!);
                gathered = (t.RowStart.Pointer, t.Tokens.Pointer, t.Batch, t.Heads, t.QueryBlocks, t.BlockQ, tokens.Mask);
            }
            else if (givenPlan is { HasTokens: true })
            {
                gathered = (givenPlan.TokenRowStart!.Pointer, givenPlan.Tokens!.Pointer, givenPlan.PlanBatch, givenPlan.PlanHeads, givenPlan.QueryBlocks, givenPlan.BlockQ, givenPlan.TokenMask);
            }
            if (gathered is { } g)
            {
                defines["HAS_TOKENS"] = "1";
                defines["TOKEN_MASK_EXPR"] = g.Mask?.ToCuda(extent) ?? "true";
            }
        }
        CudaKernel kernel = device.Kernel("flash_fwd.cu", "flash_fwd", defines);
        const float log2e = 1.4426950408889634f;
        var p = new FlashParams
        {
            Q = qo.Pointer, K = ko.Pointer, V = vo.Pointer, O = oo.Pointer, Lse = lse?.Buffer.Pointer ?? 0,
            QBatch = qo.Strides[0], QRow = qo.Strides[1], QHead = qo.Strides[2],
            KBatch = ko.Strides[0], KRow = ko.Strides[1], KHead = ko.Strides[2],
            VBatch = vo.Strides[0], VRow = vo.Strides[1], VHead = vo.Strides[2],
            OBatch = oo.Strides[0], ORow = oo.Strides[1], OHead = oo.Strides[2],
            LseBatch = lse?.Strides[0] ?? 0, LseRow = lse?.Strides[1] ?? 0, LseHead = lse?.Strides[2] ?? 0,
            SeqlenQ = s.QueryLength, SeqlenK = s.KeyLength, Heads = s.Heads, Group = s.GroupSize, HeadDim = s.HeadDim,
            CausalOffset = s.KeyLength - s.QueryLength,
            ScaleLog2 = scale * log2e,
            SoftcapPre = options.Softcap > 0 ? scale / options.Softcap : 0,
            SoftcapPost = options.Softcap * log2e,
        };
        if (devicePlan is not null)
        {
            p.PlanRowStart = devicePlan.RowStart.Pointer;
            p.PlanCols = devicePlan.Columns.Pointer;
            p.PlanKinds = devicePlan.Kinds.Pointer;
            p.PlanBatch = devicePlan.PlanBatch;
            p.PlanHeads = devicePlan.PlanHeads;
            p.PlanQBlocks = devicePlan.QueryBlocks;
            p.PlanBlockQ = devicePlan.BlockQ;
            p.PlanExpand = givenPlan is null && blocks is null ? 1 : devicePlan.BlockK / config.BlockN;
        }
        ulong? blockData = Reads(defines, "MASK_EXPR") ? MaskData(devicePlan?.Mask) : null;
        ulong? tokenData = Reads(defines, "TOKEN_MASK_EXPR") ? MaskData(gathered?.Mask) : null;
        if (blockData is not null && tokenData is not null && blockData != tokenData)
        {
            throw new NotSupportedException("the plan's block mask and token mask both read mask data; the kernel holds one");
        }
        p.MaskData = blockData ?? tokenData ?? 0;
        if (gathered is { } gt)
        {
            p.TokenRowStart = gt.RowStart;
            p.Tokens = gt.Tokens;
            p.TokenBatch = gt.Batch;
            p.TokenHeads = gt.Heads;
            p.TokenQBlocks = gt.QueryBlocks;
            p.TokenBlockQ = gt.BlockQ;
        }
        void* arg = &p;
        uint mBlocks = (uint)((s.QueryLength + config.BlockM - 1) / config.BlockM);
        kernel.Launch(mBlocks, (uint)s.Heads, (uint)s.Batch, (uint)(config.Warps * 32), config.SharedBytes, &arg);
        oo.WriteBack(output);
        if (givenPlan is null && (options.Plan is null || blocks is null)) devicePlan?.Dispose();
    }

    /// <summary>
    /// A plan over a <see cref="Masks.TokenPermutation"/> (bucket, hash-sparse, cluster plans), as the CPU's permuted
    /// executor: q, k and v gathered into the permuted order on the device, the plan run there, output and LSE scattered
    /// back (one extra copy of each; the orders are uploaded once per permutation).
    /// </summary>
    private static void RunPermuted<T>(DeviceTensor<T> q, DeviceTensor<T> k, DeviceTensor<T> v, DeviceTensor<T> output,
        AttentionOptions options, DeviceTensor<float>? lse, Masks.TokenPermutation permutation, AttentionShape s) where T : unmanaged
    {
        DeviceOrders orders = Orders.GetValue(permutation, p => new DeviceOrders(p));
        Masks.SparsityPlan inner = Plain.GetValue(options.Plan!, p => new Masks.SparsityPlan(p.Blocks, p.Tokens));
        int code = SourceCode<T>();
        using DeviceTensor<T> qp = DeviceTensor<T>.Allocate(s.Batch, s.QueryLength, s.Heads, s.HeadDim);
        using DeviceTensor<T> kp = DeviceTensor<T>.Allocate(s.Batch, s.KeyLength, s.KvHeads, s.HeadDim);
        using DeviceTensor<T> vp = DeviceTensor<T>.Allocate(s.Batch, s.KeyLength, s.KvHeads, s.ValueDim);
        using DeviceTensor<T> op = DeviceTensor<T>.Allocate(s.Batch, s.QueryLength, s.Heads, s.ValueDim);
        using DeviceTensor<float>? lp = lse is null ? null : DeviceTensor<float>.Allocate(s.Batch, s.QueryLength, s.Heads);
        Convert(q.Buffer.Pointer, code, q.Strides, qp.Buffer.Pointer, code, qp.Strides, q.Shape, s.HeadDim, s.HeadDim, orders.Queries.Pointer, 0);
        Convert(k.Buffer.Pointer, code, k.Strides, kp.Buffer.Pointer, code, kp.Strides, k.Shape, s.HeadDim, s.HeadDim, orders.Keys.Pointer, 0);
        Convert(v.Buffer.Pointer, code, v.Strides, vp.Buffer.Pointer, code, vp.Strides, v.Shape, s.ValueDim, s.ValueDim, orders.Keys.Pointer, 0);
        Run(qp, kp, vp, op, options with { Plan = inner }, lp, null);
        Convert(op.Buffer.Pointer, code, op.Strides, output.Buffer.Pointer, code, output.Strides, op.Shape, s.ValueDim, s.ValueDim, 0, orders.Queries.Pointer);
        if (lse is not null)
        {
            // LSE [B, Sq, H] as [B, Sq, H, 1] f32.
            long[] from = [lp!.Strides[0], lp.Strides[1], lp.Strides[2], 1], to = [lse.Strides[0], lse.Strides[1], lse.Strides[2], 1];
            Convert(lp.Buffer.Pointer, 0, from, lse.Buffer.Pointer, 0, to, [s.Batch, s.QueryLength, s.Heads, 1], 1, 1, 0, orders.Queries.Pointer);
        }
    }

    /// <summary>The device copy of a mask's <c>CudaData</c> (uploaded once per mask), if the compiled expressions read it.</summary>
    private static ulong? MaskData(Masks.Mask? mask)
    {
        if (mask is null) return null;
        DeviceBuffer<int> data = MaskBuffers.GetValue(mask, x =>
        {
            int[] host = x.CudaData ?? throw new NotSupportedException($"the CUDA expression of {x} reads mask data the mask does not provide (a data mask nested in another)");
            DeviceBuffer<int> buffer = DeviceBuffer<int>.Allocate(Math.Max(host.Length, 1));
            buffer.CopyFrom(host);
            return buffer;
        });
        return data.Pointer;
    }

    private static bool Reads(Dictionary<string, string> defines, string expression) =>
        defines.TryGetValue(expression, out string? e) && e.Contains("p.mask_data", StringComparison.Ordinal);

    private static readonly System.Runtime.CompilerServices.ConditionalWeakTable<Masks.Mask, DeviceBuffer<int>> MaskBuffers = new();

    private static readonly System.Runtime.CompilerServices.ConditionalWeakTable<Masks.TokenPermutation, DeviceOrders> Orders = new();
    /// <summary>A plan's blocks and tokens without its permutation or compensation (what the kernel runs).</summary>
    private static readonly System.Runtime.CompilerServices.ConditionalWeakTable<Masks.SparsityPlan, Masks.SparsityPlan> Plain = new();

    /// <summary>
    /// A plan with <see cref="Masks.Compensation.Centroid"/>, as the CPU executor: the plan runs (its LSE kept even when
    /// the caller asks for none), then <c>centroid_compensate</c> (select.cu) merges one centroid per skipped block a
    /// row sees whole. Plans without an element mask or with the causal mask (what selectors build).
    /// </summary>
    private static void RunCompensated<T>(DeviceTensor<T> q, DeviceTensor<T> k, DeviceTensor<T> v, DeviceTensor<T> output,
        AttentionOptions options, DeviceTensor<float>? lse, Masks.SparsityPlan plan, AttentionShape s, float scale) where T : unmanaged
    {
        Masks.BlockMask blocks = plan.Blocks!;
        if (blocks.Mask is not null && !ReferenceEquals(blocks.Mask, Masks.Mask.Causal))
        {
            throw new NotSupportedException($"centroid compensation on the GPU takes plans without an element mask or with the causal mask; this plan's mask is {blocks.Mask}");
        }
        if (plan.Tokens?.Mask is { } tm && !ReferenceEquals(tm, Masks.Mask.Causal))
        {
            throw new NotSupportedException($"centroid compensation on the GPU takes token plans without an element mask or with the causal mask; got {tm}");
        }
        int keyBlocks = blocks.KeyBlocks;
        if (keyBlocks > CudaBackend.Device.MaxSharedMemoryPerBlock) throw new NotSupportedException($"{keyBlocks} key blocks exceed the compensation kernel's shared memory");
        // Temporaries live in workspaces kept between calls: an allocation and free per call (cuMemFree synchronizes)
        // cost ≈ 0.4 ms per call at S 4096 — more than the compensation itself.
        lock (CompensationGate)
        {
            long rowsQ = (long)s.Batch * s.QueryLength * s.Heads, centroids = (long)s.Batch * keyBlocks * s.KvHeads;
            DeviceBuffer<float>.EnsureLength(ref _lseWorkspace, rowsQ);
            DeviceBuffer<float>.EnsureLength(ref _centroidLseWorkspace, rowsQ);
            DeviceBuffer<float>.EnsureLength(ref _keyMeans, centroids * s.HeadDim);
            DeviceBuffer<float>.EnsureLength(ref _valueMeans, centroids * s.ValueDim);
            DeviceBuffer<T>.EnsureLength(ref CompensationWorkspace<T>.Keys, centroids * s.HeadDim);
            DeviceBuffer<T>.EnsureLength(ref CompensationWorkspace<T>.Values, centroids * s.ValueDim);
            DeviceBuffer<T>.EnsureLength(ref CompensationWorkspace<T>.Output, rowsQ * s.ValueDim);
            int[] lseShape = [s.Batch, s.QueryLength, s.Heads];
            long[] lseStrides = TensorView<float>.ContiguousStrides(lseShape);
            using DeviceTensor<float> ownLse = DeviceTensor<float>.View(_lseWorkspace!, lseShape, lseStrides);
            using DeviceTensor<float> centroidLse = DeviceTensor<float>.View(_centroidLseWorkspace!, lseShape, lseStrides);
            DeviceTensor<float> lseUsed = lse ?? ownLse;
            Run(q, k, v, output, options with { Plan = Plain.GetValue(plan, p => new Masks.SparsityPlan(p.Blocks, p.Tokens)) }, lseUsed, null);
            DeviceBuffer<float> keyMeans = _keyMeans!, valueMeans = _valueMeans!;
            CudaSelectors.PoolBlocks(k, keyMeans, blocks.BlockK, 1);
            CudaSelectors.PoolBlocks(v, valueMeans, blocks.BlockK, 1);
            DeviceBlockPlan rows = DeviceBlockPlan.For(blocks);
            DeviceTokens? tokens = plan.Tokens is null ? null : DeviceTokens.For(plan);

            // The centroids as keys and values [B, key blocks, Hkv, D] in T, attended on the tensor cores by the rows'
            // lists of full-size skipped blocks their query block's first row sees whole.
            DeviceBlockPlan centroidPlan = CentroidPlans.GetValue(plan, p => CentroidPlan(p, s));
            int code = SourceCode<T>();
            long[] pooledStrides = [(long)s.KvHeads * keyBlocks * s.HeadDim, s.HeadDim, (long)keyBlocks * s.HeadDim, 1];
            int[] centroidShape = [s.Batch, keyBlocks, s.KvHeads, s.HeadDim];
            int[] centroidValueShape = [s.Batch, keyBlocks, s.KvHeads, s.ValueDim];
            using DeviceTensor<T> centroidKeys = DeviceTensor<T>.View(CompensationWorkspace<T>.Keys!, centroidShape, TensorView<T>.ContiguousStrides(centroidShape));
            using DeviceTensor<T> centroidValues = DeviceTensor<T>.View(CompensationWorkspace<T>.Values!, centroidValueShape, TensorView<T>.ContiguousStrides(centroidValueShape));
            Convert(keyMeans.Pointer, 0, pooledStrides, centroidKeys.Buffer.Pointer, code, centroidKeys.Strides, [s.Batch, keyBlocks, s.KvHeads], s.HeadDim, s.HeadDim);
            Convert(valueMeans.Pointer, 0, pooledStrides, centroidValues.Buffer.Pointer, code, centroidValues.Strides, [s.Batch, keyBlocks, s.KvHeads], s.ValueDim, s.ValueDim);
            int[] outShape = [s.Batch, s.QueryLength, s.Heads, s.ValueDim];
            using DeviceTensor<T> centroidOut = DeviceTensor<T>.View(CompensationWorkspace<T>.Output!, outShape, TensorView<T>.ContiguousStrides(outShape));
            Run(q, centroidKeys, centroidValues, centroidOut, new AttentionOptions { Scale = scale }, centroidLse, centroidPlan);

            var p = new CompensateParams
            {
                Oc = centroidOut.Buffer.Pointer, LseC = centroidLse.Buffer.Pointer,
                OcBatch = centroidOut.Strides[0], OcRow = centroidOut.Strides[1], OcHead = centroidOut.Strides[2],
                LsecBatch = centroidLse.Strides[0], LsecRow = centroidLse.Strides[1], LsecHead = centroidLse.Strides[2],
                Q = q.Buffer.Pointer, O = output.Buffer.Pointer, Lse = lseUsed.Buffer.Pointer, KeyMeans = keyMeans.Pointer, ValueMeans = valueMeans.Pointer,
                RowStart = rows.RowStart.Pointer, Cols = rows.Columns.Pointer, TokenRowStart = tokens?.RowStart.Pointer ?? 0, Tokens = tokens?.Tokens.Pointer ?? 0,
                QBatch = q.Strides[0], QRow = q.Strides[1], QHead = q.Strides[2], OBatch = output.Strides[0], ORow = output.Strides[1], OHead = output.Strides[2],
                LseBatch = lseUsed.Strides[0], LseRow = lseUsed.Strides[1], LseHead = lseUsed.Strides[2],
                Heads = s.Heads, Group = s.GroupSize, D = s.HeadDim, Dv = s.ValueDim, SeqlenQ = s.QueryLength, SeqlenK = s.KeyLength,
                BlockQ = blocks.BlockQ, BlockK = blocks.BlockK, KeyBlocks = keyBlocks, Causal = blocks.Mask is null ? 0 : 1, CausalOffset = s.KeyLength - s.QueryLength,
                PlanBatch = rows.PlanBatch, PlanHeads = rows.PlanHeads, PlanQBlocks = rows.QueryBlocks,
                TokenBatch = tokens?.Batch ?? 1, TokenHeads = tokens?.Heads ?? 1, TokenQBlocks = tokens?.QueryBlocks ?? 1, Scale = scale,
            };
            void* arg = &p;
            CudaBackend.Device.Kernel("select.cu", "centroid_compensate", CudaSelectors.Defines<T>()).Launch((uint)blocks.QueryBlocks, (uint)s.Heads, (uint)s.Batch, 256, keyBlocks, &arg);
        }
    }

    private static readonly Lock CompensationGate = new();
    private static DeviceBuffer<float>? _lseWorkspace, _centroidLseWorkspace, _keyMeans, _valueMeans;

    /// <summary>The compensation's T-typed temporaries (centroid keys and values, the centroid pass's output).</summary>
    private static class CompensationWorkspace<T> where T : unmanaged
    {
        public static DeviceBuffer<T>? Keys, Values, Output;
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct CompensateParams
    {
        public ulong Q, O, Lse, KeyMeans, ValueMeans, RowStart, Cols, TokenRowStart, Tokens;
        public long QBatch, QRow, QHead, OBatch, ORow, OHead, LseBatch, LseRow, LseHead;
        public int Heads, Group, D, Dv, SeqlenQ, SeqlenK, BlockQ, BlockK, KeyBlocks, Causal, CausalOffset;
        public int PlanBatch, PlanHeads, PlanQBlocks, TokenBatch, TokenHeads, TokenQBlocks;
        public float Scale;
        public ulong Oc, LseC;
        public long OcBatch, OcRow, OcHead, LsecBatch, LsecRow, LsecHead;
    }

    private static readonly System.Runtime.CompilerServices.ConditionalWeakTable<Masks.SparsityPlan, DeviceBlockPlan> CentroidPlans = new();

    /// <summary>
    /// The centroid pass's plan: per (batch, head, query block) of <paramref name="plan"/>, as gathered "tokens" over the
    /// key-block centroids, the full-size key blocks it skips (neither visited nor holding a gathered token) that the
    /// query block's first row sees whole — so every row of the block sees them whole; centroid_compensate adds the few
    /// a later row sees beyond those and a short last block.
    /// </summary>
    private static DeviceBlockPlan CentroidPlan(Masks.SparsityPlan plan, AttentionShape s)
    {
        Masks.BlockMask blocks = plan.Blocks!;
        Masks.TokenSet? tokens = plan.Tokens;
        int batch = tokens is null ? blocks.PlanBatch : Math.Max(blocks.PlanBatch, tokens.PlanBatch);
        int heads = tokens is null ? blocks.PlanHeads : Math.Max(blocks.PlanHeads, tokens.PlanHeads);
        int bq = blocks.BlockQ, bk = blocks.BlockK, keyBlocks = blocks.KeyBlocks, queryBlocks = blocks.QueryBlocks;
        bool causal = blocks.Mask is not null;
        long offset = (long)s.KeyLength - s.QueryLength;
        var rowStart = new int[((long)batch * heads * queryBlocks) + 1];
        var list = new List<int>();
        var visited = new bool[keyBlocks];
        int r = 0;
        for (int b = 0; b < batch; b++)
            for (int h = 0; h < heads; h++)
                for (int qb = 0; qb < queryBlocks; qb++)
                {
                    rowStart[r++] = list.Count;
                    Array.Clear(visited);
                    foreach (int kb in blocks.Row(b, h, qb, out _)) visited[kb] = true;
                    if (tokens is not null)
                    {
                        foreach (int t in tokens.Row(b, h, qb)) visited[t / bk] = true;
                    }
                    long keys = (long)qb * bq + offset + 1;   // keys the first row sees
                    int whole = !causal ? keyBlocks : (int)Math.Clamp((keys / bk) + (keys >= s.KeyLength ? 1 : 0), 0, keyBlocks);
                    for (int j = 0; j < whole; j++)
                    {
                        if (!visited[j] && Math.Min(s.KeyLength, (long)(j + 1) * bk) - ((long)j * bk) == bk) list.Add(j);
                    }
                }
        rowStart[r] = list.Count;
        return DeviceBlockPlan.TokensOnly(new Masks.MaskExtent(s.Batch, s.Heads, s.QueryLength, keyBlocks), bq, 128, batch, heads, rowStart, [.. list]);
    }

    /// <summary>A permutation's query and key orders on the device ([B·H·Sq] and [B·Hkv·Skv] source rows).</summary>
    private sealed class DeviceOrders
    {
        public DeviceOrders(Masks.TokenPermutation p)
        {
            var queries = new int[(long)p.Batch * p.Heads * p.QueryLength];
            for (int b = 0; b < p.Batch; b++)
                for (int h = 0; h < p.Heads; h++) p.QueryOrder(b, h).CopyTo(queries.AsSpan(((b * p.Heads) + h) * p.QueryLength));
            var keys = new int[(long)p.Batch * p.KvHeads * p.KeyLength];
            for (int b = 0; b < p.Batch; b++)
                for (int h = 0; h < p.KvHeads; h++) p.KeyOrder(b, h).CopyTo(keys.AsSpan(((b * p.KvHeads) + h) * p.KeyLength));
            Queries = DeviceBuffer<int>.Allocate(queries.Length);
            Queries.CopyFrom(queries);
            Keys = DeviceBuffer<int>.Allocate(keys.Length);
            Keys.CopyFrom(keys);
        }

        public DeviceBuffer<int> Queries { get; }
        public DeviceBuffer<int> Keys { get; }
    }

    /// <summary>
    /// A token plan's gathered key rows on the device, uploaded once per plan object: per (batch, head, query block)
    /// the listed keys whose block the plan's block rows do not visit (tokens inside visited blocks belong to those
    /// blocks, as <see cref="Masks.SparsityPlan.Allows"/> defines).
    /// </summary>
    private sealed class DeviceTokens : IDisposable
    {
        private static readonly System.Runtime.CompilerServices.ConditionalWeakTable<Masks.SparsityPlan, DeviceTokens> Cache = new();

        private DeviceTokens(Masks.SparsityPlan plan)
        {
            Masks.TokenSet tokens = plan.Tokens!;
            Masks.BlockMask? blocks = plan.Blocks;
            Batch = blocks is null ? tokens.PlanBatch : Math.Max(tokens.PlanBatch, blocks.PlanBatch);
            Heads = blocks is null ? tokens.PlanHeads : Math.Max(tokens.PlanHeads, blocks.PlanHeads);
            QueryBlocks = tokens.QueryBlocks;
            BlockQ = tokens.BlockQ;
            var rowStart = new int[(Batch * Heads * QueryBlocks) + 1];
            var list = new List<int>();
            int r = 0;
            for (int b = 0; b < Batch; b++)
                for (int h = 0; h < Heads; h++)
                    for (int qb = 0; qb < QueryBlocks; qb++)
                    {
                        rowStart[r++] = list.Count;
                        ReadOnlySpan<int> visited = blocks is null ? [] : blocks.Row(b, h, qb, out _);
                        foreach (int t in tokens.Row(b, h, qb))
                        {
                            if (blocks is null || visited.BinarySearch(t / blocks.BlockK) < 0) list.Add(t);
                        }
                    }
            rowStart[r] = list.Count;
            RowStart = DeviceBuffer<int>.Allocate(rowStart.Length);
            RowStart.CopyFrom(rowStart);
            Tokens = DeviceBuffer<int>.Allocate(Math.Max(list.Count, 1));
            if (list.Count > 0) Tokens.CopyFrom([.. list]);
        }

        public DeviceBuffer<int> RowStart { get; }
        public DeviceBuffer<int> Tokens { get; }
        public int Batch { get; }
        public int Heads { get; }
        public int QueryBlocks { get; }
        public int BlockQ { get; }

        public static DeviceTokens For(Masks.SparsityPlan plan) => Cache.GetValue(plan, p => new DeviceTokens(p));

        public void Dispose()
        {
            RowStart.Dispose();
            Tokens.Dispose();
        }
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct FlashParams
    {
        public ulong Q, K, V, O, Lse;
        public long QBatch, QRow, QHead, KBatch, KRow, KHead, VBatch, VRow, VHead, OBatch, ORow, OHead, LseBatch, LseRow, LseHead;
        public int SeqlenQ, SeqlenK, Heads, Group, HeadDim, CausalOffset;
        public float ScaleLog2, SoftcapPre, SoftcapPost;
        public ulong PlanRowStart, PlanCols, PlanKinds;
        public int PlanBatch, PlanHeads, PlanQBlocks, PlanBlockQ, PlanExpand;
        public ulong TokenRowStart, Tokens;
        public int TokenBatch, TokenHeads, TokenQBlocks, TokenBlockQ;
        public ulong MaskData;
    }

    /// <summary>A kernel operand: the caller's tensor when its layout fits, else a converted packed copy.</summary>
    private sealed class Operand : IDisposable
    {
        private DeviceBuffer<ushort>? _temp;
        private int[] _shape = [];

        public ulong Pointer { get; private set; }

        public long[] Strides { get; private set; } = [];

        /// <summary>True when the kernel reads/writes the caller's memory directly.</summary>
        public bool Direct => _temp is null;

        public static Operand Prepare<T>(DeviceTensor<T> t, bool bf16) where T : unmanaged
        {
            var op = new Operand { _shape = t.Shape.ToArray() };
            if (Fits(t, bf16))
            {
                op.Pointer = t.Buffer.Pointer;
                op.Strides = t.Strides.ToArray();
                return op;
            }
            op.AllocatePacked(t.Shape);
            Convert(t.Buffer.Pointer, SourceCode<T>(), t.Strides, op.Pointer, bf16 ? 2 : 1, op.Strides, t.Shape, t.Shape[3], op.PaddedDim);
            return op;
        }

        public static Operand PrepareOutput<T>(DeviceTensor<T> t, bool bf16) where T : unmanaged
        {
            var op = new Operand { _shape = t.Shape.ToArray() };
            if (Fits(t, bf16))
            {
                op.Pointer = t.Buffer.Pointer;
                op.Strides = t.Strides.ToArray();
            }
            else
            {
                op.AllocatePacked(t.Shape);
                op._bf16 = bf16;
            }
            return op;
        }

        private bool _bf16;

        public void WriteBack<T>(DeviceTensor<T> output) where T : unmanaged
        {
            if (Direct) return;
            Convert(Pointer, _bf16 ? 2 : 1, Strides, output.Buffer.Pointer, SourceCode<T>(), output.Strides, output.Shape, output.Shape[3], output.Shape[3]);
        }

        private int PaddedDim => (_shape[3] + 7) / 8 * 8;

        private void AllocatePacked(ReadOnlySpan<int> shape)
        {
            int dp = (shape[3] + 7) / 8 * 8;
            _temp = DeviceBuffer<ushort>.Allocate((long)shape[0] * shape[1] * shape[2] * dp);
            Pointer = _temp.Pointer;
            Strides = [(long)shape[1] * shape[2] * dp, (long)shape[2] * dp, dp, 1];
        }

        private static bool Fits<T>(DeviceTensor<T> t, bool bf16) where T : unmanaged
        {
            bool typeFits = bf16 ? typeof(T) == typeof(BFloat16) : typeof(T) == typeof(Half);
            ReadOnlySpan<long> st = t.Strides;
            return typeFits && st[3] == 1 && t.Shape[3] % 8 == 0 && st[0] % 8 == 0 && st[1] % 8 == 0 && st[2] % 8 == 0;
        }

        public void Dispose() => _temp?.Dispose();
    }

    private static int SourceCode<T>() => typeof(T) == typeof(float) ? 0 : typeof(T) == typeof(Half) ? 1 : 2;

    [StructLayout(LayoutKind.Sequential)]
    private struct ConvertParams
    {
        public ulong Src, Dst;
        public long S0, S1, S2, S3, D0, D1, D2, D3;
        public int B, S, H, SrcDim, DstDim;
        public ulong SrcRows, DstRows;
    }

    /// <summary>Converts/copies [B, S, H, D]; <paramref name="srcRows"/> / <paramref name="dstRows"/> (device pointers, 0 for none) gather or scatter rows per (b, h).</summary>
    private static void Convert(ulong src, int srcType, ReadOnlySpan<long> srcStrides, ulong dst, int dstType, ReadOnlySpan<long> dstStrides,
        ReadOnlySpan<int> shape, int srcDim, int dstDim, ulong srcRows = 0, ulong dstRows = 0)
    {
        CudaKernel kernel = CudaBackend.Device.Kernel("convert.cu", "convert4d", new Dictionary<string, string>
        {
            ["SRC_T"] = srcType.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["DST_T"] = dstType.ToString(System.Globalization.CultureInfo.InvariantCulture),
        });
        var p = new ConvertParams
        {
            Src = src, Dst = dst,
            S0 = srcStrides[0], S1 = srcStrides[1], S2 = srcStrides[2], S3 = srcStrides[3],
            D0 = dstStrides[0], D1 = dstStrides[1], D2 = dstStrides[2], D3 = dstStrides[3],
            B = shape[0], S = shape[1], H = shape[2], SrcDim = srcDim, DstDim = dstDim, SrcRows = srcRows, DstRows = dstRows,
        };
        long total = (long)shape[0] * shape[1] * shape[2] * dstDim;
        uint blocks = (uint)Math.Clamp((total + 255) / 256, 1, 65535);
        void* arg = &p;
        kernel.Launch(blocks, 1, 1, 256, 0, &arg);
    }
}
