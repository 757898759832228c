using System.CommandLine;
using Attend.Tensors;

namespace Attend.Cli;

/// <summary>The options shared by <c>attend run</c> and <c>attend verify</c>: inputs and what to compute.</summary>
internal sealed class AttentionArguments
{
    public Option<string> Q { get; } = new("--q") { Description = "queries [B,S,H,D]: FILE.npy or FILE.safetensors:NAME", Required = true };
    public Option<string> K { get; } = new("--k") { Description = "keys [B,Skv,Hkv,D]", Required = true };
    public Option<string> V { get; } = new("--v") { Description = "values [B,Skv,Hkv,Dv]", Required = true };
    public Option<bool> Causal { get; } = new("--causal") { Description = "causal mask, bottom-right aligned" };
    public Option<float?> Scale { get; } = new("--scale") { Description = "score scale (default 1/sqrt(D))" };
    public Option<float> Softcap { get; } = new("--softcap") { Description = "tanh soft-cap of the scores (0: off)" };
    public Option<string?> Mask { get; } = new("--mask") { Description = "mask expression, e.g. \"causal & window(1024) | sink(64)\" (see README)" };
    public Option<string?> Selector { get; } = new("--selector") { Description = "content-based sparse attention: pooled, vertical-slash, flexprefill, xattention, anchor, hierarchical, sale, dhsa [:key=value,...][+centroid|+ear] (see README)" };
    public Option<string?> Linear { get; } = new("--linear") { Description = "linear attention with this feature map: elu, relu, identity, taylor, random:N, wavelet:N, hashing:N (with --causal: chunked causal)" };
    public Option<string?> ValueConv { get; } = new("--value-conv") { Description = "with --linear: SLAB's depthwise convolution of the values, weights [Dv, K] in FILE.npy (K odd unless --causal)" };
    public Option<string?> Hybrid { get; } = new("--hybrid") { Description = "hybrid attention: based:WINDOW, mossformer:CHUNK, scout:WINDOW,SEGMENT, agent:N, infsa[:RHO] (see README)" };
    public Option<string> Device { get; } = new("--device") { Description = "cpu or cuda", DefaultValueFactory = _ => "cpu" };
    public Option<int> Threads { get; } = new("--threads") { Description = "worker threads (0: all cores)" };
    public Option<KernelPath> Path { get; } = new("--path") { Description = "SIMD path: Auto, Scalar, Vector128, Vector256, Vector512" };
    public Option<string?> Json { get; } = new("--json") { Description = "write a JSON summary to this file ('-' for stdout)" };

    public void AddTo(Command command)
    {
        foreach (Option o in new Option[] { Q, K, V, Causal, Scale, Softcap, Mask, Selector, Linear, ValueConv, Hybrid, Device, Threads, Path, Json }) command.Options.Add(o);
    }

    public (Tensor Q, Tensor K, Tensor V) LoadInputs(ParseResult r)
    {
        DeviceName(r);
        Tensor q = TensorFiles.Load(r.GetValue(Q)!, "q");
        Tensor k = TensorFiles.Load(r.GetValue(K)!, "k");
        Tensor v = TensorFiles.Load(r.GetValue(V)!, "v");
        if (k.DType != q.DType || v.DType != q.DType)
        {
            throw new ArgumentException($"q, k and v must share one dtype; got q {q}, k {k}, v {v}");
        }
        return (q, k, v);
    }

    /// <summary>"cpu" or "cuda"; cuda only where the backend is available.</summary>
    public string DeviceName(ParseResult r)
    {
        string device = r.GetValue(Device)!;
        if (device is not ("cpu" or "cuda"))
        {
            throw new ArgumentException($"--device must be cpu or cuda; got '{device}'");
        }
        if (device == "cuda" && !Cuda.CudaBackend.IsAvailable)
        {
            throw new NotSupportedException($"--device cuda: {Cuda.CudaBackend.UnavailableReason}");
        }
        return device;
    }

    public AttentionOptions Options(ParseResult r) => new()
    {
        Causal = r.GetValue(Causal),
        Scale = r.GetValue(Scale),
        Softcap = r.GetValue(Softcap),
        Mask = r.GetValue(Mask) is { } m ? Masks.MaskExpression.Parse(m) : null,
    };

    /// <summary>The selector named by --selector, or null.</summary>
    public Sparse.ISparsitySelector? ParseSelector(ParseResult r) => r.GetValue(Selector) is { } spec ? Sparse.Selectors.ParseAny(spec) : null;

    public KernelTuning Tuning(ParseResult r) => new() { Threads = r.GetValue(Threads), Path = r.GetValue(Path) };

    /// <summary>The feature map named by --linear, or null.</summary>
    public static Attend.Linear.FeatureMap? ParseFeatureMap(string? name)
    {
        if (name is null) return null;
        string[] parts = name.Split(':');
        int Count() => parts.Length == 2 && int.TryParse(parts[1], System.Globalization.CultureInfo.InvariantCulture, out int n) ? n
            : throw new ArgumentException($"--linear {parts[0]} needs a size, e.g. {parts[0]}:64");
        return parts[0].ToLowerInvariant() switch
        {
            "elu" => Attend.Linear.FeatureMap.EluPlusOne,
            "relu" => Attend.Linear.FeatureMap.Relu,
            "identity" => Attend.Linear.FeatureMap.Identity,
            "taylor" => Attend.Linear.FeatureMap.Taylor,
            "random" => Attend.Linear.FeatureMap.RandomFeatures(Count()),
            "wavelet" => Attend.Linear.FeatureMap.WaveletRandomFeatures(Count()),
            "hashing" => Attend.Linear.FeatureMap.Hashing(Count()),
            _ => throw new ArgumentException($"--linear must be elu, relu, identity, taylor, random:N, wavelet:N or hashing:N; got '{name}'"),
        };
    }

    /// <summary>The linear-attention options of --linear, --causal and --value-conv, or null without --linear.</summary>
    public Linear.LinearOptions? LinearOptions(ParseResult r)
    {
        if (ParseFeatureMap(r.GetValue(Linear)) is not { } map)
        {
            if (r.GetValue(ValueConv) is not null) throw new ArgumentException("--value-conv needs --linear");
            return null;
        }
        Linear.DepthwiseConv? conv = null;
        if (r.GetValue(ValueConv) is { } path)
        {
            Tensor w = TensorFiles.LoadAny(path, "value-conv").ConvertTo(DType.Float32);
            if (w.Shape.Count != 2) throw new ArgumentException($"--value-conv must be a [Dv, K] tensor; got {w}");
            conv = new Linear.DepthwiseConv(w.AsView<float>().ToArray(), (int)w.Shape[1]);
        }
        return new Linear.LinearOptions { FeatureMap = map, Causal = r.GetValue(Causal), ValueConv = conv };
    }

    /// <summary>
    /// Runs the hybrid named by <paramref name="spec"/> (based:W, mossformer:C, scout:W,S, agent:N, infsa[:RHO]) on file
    /// tensors in f32; output in the input dtype.
    /// </summary>
    public static Tensor ComputeHybrid(Tensor q, Tensor k, Tensor v, string spec, bool causal, KernelTuning tuning)
    {
        string[] parts = spec.Split(':', 2);
        string[] args = parts.Length == 2 ? parts[1].Split(',') : [];
        double Arg(int i, string what, double? fallback = null) =>
            i < args.Length && double.TryParse(args[i], System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out double x) ? x
            : fallback ?? throw new ArgumentException($"--hybrid {parts[0]} needs {what}, e.g. {Example(parts[0])}");
        int Int(int i, string what) => (int)Arg(i, what);
        Tensor qf = q.ConvertTo(DType.Float32), kf = k.ConvertTo(DType.Float32), vf = v.ConvertTo(DType.Float32);
        TensorView<float> qv = qf.AsView<float>(), kv = kf.AsView<float>(), vv = vf.AsView<float>();
        AttentionShape s = AttentionShape.Of(qv, kv, vv);
        Tensor output = Tensor.Zeros(DType.Float32, s.Batch, s.QueryLength, s.Heads, s.ValueDim);
        TensorView<float> o = output.AsView<float>();
        string name = parts[0].ToLowerInvariant();
        if (causal && name is "agent" or "infsa") throw new ArgumentException($"--hybrid {name} is non-causal; drop --causal");
        if (!causal && name is "based" or "scout") throw new ArgumentException($"--hybrid {name} is causal; add --causal");
        switch (name)
        {
            case "based": Attend.Linear.Hybrids.Based(qv, kv, vv, o, Int(0, "a window"), tuning); break;
            case "mossformer": Attend.Linear.Hybrids.MossFormer(qv, kv, vv, o, Int(0, "a chunk size"), causal, tuning: tuning); break;
            case "scout": Attend.Linear.Hybrids.Scout(qv, kv, vv, o, Int(0, "a window and a segment"), Int(1, "a window and a segment"), tuning: tuning); break;
            case "agent": Attend.Linear.Hybrids.AgentAttention(qv, kv, vv, o, Int(0, "an agent count"), tuning); break;
            case "infsa": Attend.Linear.Hybrids.LinearInfSA(qv, kv, vv, o, Arg(0, "rho", 0.95), tuning); break;
            default: throw new ArgumentException($"--hybrid must be based:W, mossformer:C, scout:W,S, agent:N or infsa[:RHO]; got '{spec}'");
        }
        return q.DType == DType.Float32 ? output : output.ConvertTo(q.DType);
    }

    private static string Example(string name) => name switch
    {
        "based" => "based:64",
        "mossformer" => "mossformer:128",
        "scout" => "scout:256,64",
        "agent" => "agent:49",
        _ => "infsa:0.95",
    };

    /// <summary>Linear attention on the GPU (f32 on the device; maps elu, relu, identity); output in the input dtype.</summary>
    public static Tensor ComputeLinearCuda(Tensor q, Tensor k, Tensor v, Linear.LinearOptions options)
    {
        Tensor qf = q.ConvertTo(DType.Float32), kf = k.ConvertTo(DType.Float32), vf = v.ConvertTo(DType.Float32);
        AttentionShape s = AttentionShape.Of(qf.AsView<float>(), kf.AsView<float>(), vf.AsView<float>());
        using Cuda.DeviceTensor<float> dq = Cuda.DeviceTensor<float>.FromHost(qf.AsView<float>()), dk = Cuda.DeviceTensor<float>.FromHost(kf.AsView<float>());
        using Cuda.DeviceTensor<float> dv = Cuda.DeviceTensor<float>.FromHost(vf.AsView<float>());
        using Cuda.DeviceTensor<float> dO = Cuda.DeviceTensor<float>.Allocate(s.Batch, s.QueryLength, s.Heads, s.ValueDim);
        Cuda.CudaLinear.Forward(dq, dk, dv, dO, options);
        Tensor output = Tensor.FromArray(dO.ToHost(), s.Batch, s.QueryLength, s.Heads, s.ValueDim);
        return q.DType == DType.Float32 ? output : output.ConvertTo(q.DType);
    }

    /// <summary>Linear attention on file tensors (computed in f32; output in the input dtype).</summary>
    public static Tensor ComputeLinear(Tensor q, Tensor k, Tensor v, Linear.LinearOptions options, KernelTuning tuning)
    {
        Tensor qf = q.ConvertTo(DType.Float32), kf = k.ConvertTo(DType.Float32), vf = v.ConvertTo(DType.Float32);
        AttentionShape s = AttentionShape.Of(qf.AsView<float>(), kf.AsView<float>(), vf.AsView<float>());
        Tensor output = Tensor.Zeros(DType.Float32, s.Batch, s.QueryLength, s.Heads, s.ValueDim);
        Attend.Linear.LinearAttention.Forward(qf.AsView<float>(), kf.AsView<float>(), vf.AsView<float>(), output.AsView<float>(), options, tuning);
        return q.DType == DType.Float32 ? output : output.ConvertTo(q.DType);
    }

    /// <summary>Runs attention on file tensors of any supported dtype; returns output (input dtype) and LSE [B, Sq, H].</summary>
    public static (Tensor Output, Tensor Lse) Compute(Tensor q, Tensor k, Tensor v, AttentionOptions options, KernelTuning tuning, string device = "cpu",
        Sparse.ISparsitySelector? selector = null) => q.DType switch
    {
        DType.Float32 => Compute<float>(q, k, v, options, tuning, device, selector),
        DType.Float16 => Compute<Half>(q, k, v, options, tuning, device, selector),
        DType.BFloat16 => Compute<BFloat16>(q, k, v, options, tuning, device, selector),
        _ => throw new ArgumentException($"unsupported dtype {DTypes.Name(q.DType)}"),
    };

    private static (Tensor, Tensor) Compute<T>(Tensor q, Tensor k, Tensor v, AttentionOptions options, KernelTuning tuning, string device, Sparse.ISparsitySelector? selector) where T : unmanaged
    {
        AttentionShape s = AttentionShape.Of(q.AsView<T>(), k.AsView<T>(), v.AsView<T>());
        Tensor output = Tensor.Zeros(q.DType, s.Batch, s.QueryLength, s.Heads, s.ValueDim);
        Tensor lse = Tensor.Zeros(DType.Float32, s.Batch, s.QueryLength, s.Heads);
        if (selector is not null && device == "cpu")
        {
            Sparse.SparseAttention.Forward(selector, q.AsView<T>(), k.AsView<T>(), v.AsView<T>(), output.AsView<T>(), options, lse.AsView<float>(), tuning);
        }
        else if (device == "cuda")
        {
            using var dq = Cuda.DeviceTensor<T>.FromHost(q.AsView<T>());
            using var dk = Cuda.DeviceTensor<T>.FromHost(k.AsView<T>());
            using var dv = Cuda.DeviceTensor<T>.FromHost(v.AsView<T>());
            using var dO = Cuda.DeviceTensor<T>.Allocate(s.Batch, s.QueryLength, s.Heads, s.ValueDim);
            using var dl = Cuda.DeviceTensor<float>.Allocate(s.Batch, s.QueryLength, s.Heads);
            if (selector is null)
            {
                Cuda.CudaAttention.Forward(dq, dk, dv, dO, options, dl);
            }
            else if (Cuda.CudaSelectors.HasGpuVersion(selector))
            {
                // The plan is built on the device and never leaves it.
                using Cuda.DeviceBlockPlan plan = Cuda.CudaSelectors.Plan(selector, dq, dk, options.Causal, options.Scale);
                Cuda.CudaAttention.Forward(dq, dk, dv, dO, plan, options with { Causal = false }, dl);
            }
            else
            {
                // Selectors without a GPU version plan on the host; the plan runs on the GPU.
                Masks.SparsityPlan plan = selector is Sparse.IValueAwareSelector valueAware
                    ? valueAware.Plan(q.AsView<T>(), k.AsView<T>(), v.AsView<T>(), options.Causal, options.Scale, tuning)
                    : selector.Plan(q.AsView<T>(), k.AsView<T>(), options.Causal, options.Scale);
                Cuda.CudaAttention.Forward(dq, dk, dv, dO, options with { Causal = false, Plan = plan }, dl);
            }
            dO.Buffer.CopyTo(output.Array<T>());
            dl.Buffer.CopyTo(lse.Array<float>());
        }
        else
        {
            Attention.Forward(q.AsView<T>(), k.AsView<T>(), v.AsView<T>(), output.AsView<T>(), options, lse.AsView<float>(), tuning);
        }
        return (output, lse);
    }
}
