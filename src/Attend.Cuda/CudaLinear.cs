using System.Runtime.InteropServices;
using Attend.Linear;

namespace Attend.Cuda;

/// <summary>
/// Linear attention on the GPU (kernel <c>linear.cu</c>): the same computation as <see cref="LinearAttention"/> on
/// the CPU — non-causal, or causal in chunks with an optional per-head decay, normalized or not — for the feature maps
/// with F = D (elu+1, ReLU, identity), f32 tensors, D and Dv ≤ 128, GQA. One thread block per (32 value columns, head,
/// batch) keeps its slice of the state in shared memory.
/// </summary>
public static unsafe class CudaLinear
{
    /// <summary>q [B, S, H, D], k [B, Skv, Hkv, D], v [B, Skv, Hkv, Dv] → output [B, S, H, Dv], all f32 on the device.</summary>
    public static void Forward(DeviceTensor<float> q, DeviceTensor<float> k, DeviceTensor<float> v, DeviceTensor<float> output, LinearOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(q);
        ArgumentNullException.ThrowIfNull(k);
        ArgumentNullException.ThrowIfNull(v);
        ArgumentNullException.ThrowIfNull(output);
        options ??= new LinearOptions();
        AttentionShape s = AttentionShape.Of(q.Shape, k.Shape, v.Shape);
        s.RequireOutput(output.Shape, nameof(output));
        LinearAttention.Validate(s, options, KernelTuning.Default);
        int map = ReferenceEquals(options.FeatureMap, FeatureMap.EluPlusOne) ? 0
            : ReferenceEquals(options.FeatureMap, FeatureMap.Relu) ? 1
            : ReferenceEquals(options.FeatureMap, FeatureMap.Identity) ? 2
            : throw new NotSupportedException($"GPU linear attention runs the maps with F = D (elu+1, relu, identity); got {options.FeatureMap}");
        if (options.ValueConv is not null) throw new NotSupportedException("SLAB's value convolution runs on the CPU only for now");
        if (s.HeadDim > 128 || s.ValueDim > 128) throw new NotSupportedException($"GPU linear attention supports D and Dv up to 128; got D={s.HeadDim}, Dv={s.ValueDim}");
        foreach ((string name, long[] st) in new[] { ("q", q.Strides.ToArray()), ("k", k.Strides.ToArray()), ("v", v.Strides.ToArray()), ("output", output.Strides.ToArray()) })
        {
            if (st[^1] != 1) throw new NotSupportedException($"{name}: GPU linear attention needs the last dimension contiguous");
        }
        if (ReferenceEquals(output.Buffer, q.Buffer) || ReferenceEquals(output.Buffer, k.Buffer) || ReferenceEquals(output.Buffer, v.Buffer))
        {
            throw new ArgumentException("output must not share a buffer with q, k or v", nameof(output));
        }

        CudaDevice device = CudaBackend.Device;
        device.MakeCurrent();
        int dMax = s.HeadDim <= 64 ? 64 : 128;
        const int chunk = 32, slice = 32;
        var defines = new Dictionary<string, string>
        {
            ["MAP"] = map.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["D_MAX"] = dMax.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["CHUNK"] = "32",
            ["VSLICE"] = "32",
        };
        CudaKernel kernel = device.Kernel("linear.cu", "linear_attention", defines);
        int shared = SharedBytes(dMax, chunk, slice);
        using DeviceBuffer<float>? decay = options.Decay is { } g ? DeviceBuffer<float>.Allocate(g.Count) : null;
        decay?.CopyFrom([.. options.Decay!]);
        var p = new LinearParams
        {
            Q = q.Buffer.Pointer, K = k.Buffer.Pointer, V = v.Buffer.Pointer, O = output.Buffer.Pointer, Decay = decay?.Pointer ?? 0,
            QBatch = q.Strides[0], QRow = q.Strides[1], QHead = q.Strides[2],
            KBatch = k.Strides[0], KRow = k.Strides[1], KHead = k.Strides[2],
            VBatch = v.Strides[0], VRow = v.Strides[1], VHead = v.Strides[2],
            OBatch = output.Strides[0], ORow = output.Strides[1], OHead = output.Strides[2],
            SeqlenQ = s.QueryLength, SeqlenK = s.KeyLength, Heads = s.Heads, Group = s.GroupSize, D = s.HeadDim, Dv = s.ValueDim,
            Causal = options.Causal ? 1 : 0, Normalize = options.Normalize ? 1 : 0,
        };
        void* arg = &p;
        kernel.Launch((uint)((s.ValueDim + slice - 1) / slice), (uint)s.Heads, (uint)s.Batch, 256, shared, &arg);
        device.Synchronize();   // the decay buffer is freed on return
    }

    /// <summary>Shared memory of one block: state, normalizer, φQ, φK (rows padded by one float), V, the chunk's A, its
    /// normalizers and the decay powers.</summary>
    internal static int SharedBytes(int dMax, int chunk, int slice) =>
        ((dMax * slice) + dMax + (2 * chunk * (dMax + 1)) + (chunk * slice) + (chunk * chunk) + chunk + chunk + 1) * sizeof(float);

    [StructLayout(LayoutKind.Sequential)]
    private struct LinearParams
    {
        public ulong Q, K, V, O, Decay;
        public long QBatch, QRow, QHead, KBatch, KRow, KHead, VBatch, VRow, VHead, OBatch, ORow, OHead;
        public int SeqlenQ, SeqlenK, Heads, Group, D, Dv, Causal, Normalize;
    }
}
