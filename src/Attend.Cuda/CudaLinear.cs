using System.Runtime.InteropServices;
using Attend.Linear;

namespace Attend.Cuda;

/// <summary>
/// Linear attention on the GPU (kernel <c>linear.cu</c>): the same computation as <see cref="LinearAttention"/> on
/// the CPU — non-causal, or causal in chunks with an optional per-head decay, normalized or not — for the feature maps
/// with F = D (elu+1, ReLU, identity), f32 tensors, D and Dv ≤ 128, GQA. Chunk-parallel: per-chunk states, a scan of
/// them over the chunks, then every chunk's output at once (see linear.cu); the state buffer is kept between calls.
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
        var defines = new Dictionary<string, string>
        {
            ["MAP"] = map.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["D_MAX"] = dMax.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["CHUNK"] = Chunk.ToString(System.Globalization.CultureInfo.InvariantCulture),
        };
        CudaKernel states = device.Kernel("linear.cu", "linear_chunk_state", defines);
        CudaKernel scan = device.Kernel("linear.cu", "linear_state_scan", defines);
        CudaKernel outputs = device.Kernel("linear.cu", "linear_chunk_output", defines);
        int keyChunks = (s.KeyLength + Chunk - 1) / Chunk, queryChunks = (s.QueryLength + Chunk - 1) / Chunk;
        long stateFloats = (long)s.Batch * s.Heads * keyChunks * s.HeadDim * (s.ValueDim + 1);
        lock (Gate)
        {
            // Buffers kept between calls (grown when needed): no allocation, upload-free reuse of the decay and no
            // synchronization per call — the copies below are ordered after earlier launches on the default stream.
            if (_state is null || _state.Length < stateFloats)
            {
                _state?.Dispose();
                _state = DeviceBuffer<float>.Allocate(stateFloats);
            }
            if (options.Decay is { } g)
            {
                if (_decay is null || _decay.Length < g.Count)
                {
                    _decay?.Dispose();
                    _decay = DeviceBuffer<float>.Allocate(g.Count);
                }
                _decay.CopyFrom([.. g]);
            }
            var p = new ChunkParams
            {
                Q = q.Buffer.Pointer, K = k.Buffer.Pointer, V = v.Buffer.Pointer, O = output.Buffer.Pointer, Decay = options.Decay is null ? 0 : _decay!.Pointer,
                State = _state.Pointer,
                QBatch = q.Strides[0], QRow = q.Strides[1], QHead = q.Strides[2],
                KBatch = k.Strides[0], KRow = k.Strides[1], KHead = k.Strides[2],
                VBatch = v.Strides[0], VRow = v.Strides[1], VHead = v.Strides[2],
                OBatch = output.Strides[0], ORow = output.Strides[1], OHead = output.Strides[2],
                SeqlenQ = s.QueryLength, SeqlenK = s.KeyLength, Heads = s.Heads, Group = s.GroupSize, D = s.HeadDim, Dv = s.ValueDim,
                Chunks = keyChunks, Causal = options.Causal ? 1 : 0, Normalize = options.Normalize ? 1 : 0,
            };
            void* arg = &p;
            states.Launch((uint)keyChunks, (uint)s.Heads, (uint)s.Batch, 256, StateSharedBytes(dMax), &arg);
            int elements = s.HeadDim * (s.ValueDim + 1);
            scan.Launch((uint)((elements + 255) / 256), (uint)s.Heads, (uint)s.Batch, 256, 0, &arg);
            outputs.Launch((uint)queryChunks, (uint)s.Heads, (uint)s.Batch, 256, OutputSharedBytes(dMax), &arg);
        }
    }

    /// <summary>Tokens per chunk.</summary>
    internal const int Chunk = 32;

    private static DeviceBuffer<float>? _state, _decay;
    private static readonly Lock Gate = new();

    /// <summary>Shared memory of a chunk-state block: φK (rows padded by one float) and [V | 1].</summary>
    internal static int StateSharedBytes(int dMax) => ((Chunk * (dMax + 1)) + (Chunk * (dMax + 1))) * sizeof(float);

    /// <summary>Shared memory of a chunk-output block: φQ, φK, [V | 1], the chunk's A, its normalizers and the state it starts from.</summary>
    internal static int OutputSharedBytes(int dMax) =>
        ((2 * Chunk * (dMax + 1)) + (Chunk * (dMax + 1)) + (Chunk * Chunk) + Chunk + (dMax * (dMax + 1))) * sizeof(float);

    [StructLayout(LayoutKind.Sequential)]
    private struct ChunkParams
    {
        public ulong Q, K, V, O, Decay, State;
        public long QBatch, QRow, QHead, KBatch, KRow, KHead, VBatch, VRow, VHead, OBatch, ORow, OHead;
        public int SeqlenQ, SeqlenK, Heads, Group, D, Dv, Chunks, Causal, Normalize;
    }
}
