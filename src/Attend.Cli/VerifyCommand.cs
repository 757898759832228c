using System.CommandLine;
using System.Text.Json.Nodes;
using Attend.Reference;
using Attend.Tensors;

namespace Attend.Cli;

/// <summary><c>attend verify</c>: the kernel's result against the float64 reference, with the tolerance verdict.</summary>
internal static class VerifyCommand
{
    public static Command Create()
    {
        var args = new AttentionArguments();
        var command = new Command("verify", "compare attention on file inputs with the float64 reference (O(S^2) time)");
        args.AddTo(command);
        command.SetAction(r =>
        {
            if (r.GetValue(args.Selector) is not null)
            {
                throw new ArgumentException("--selector: verify checks exact kernels against float64; a selector's error vs dense is reported by attend bench --suite sparse --inputs DIR");
            }
            if (r.GetValue(args.Linear) is not null || r.GetValue(args.Hybrid) is not null || r.GetValue(args.ValueConv) is not null)
            {
                throw new ArgumentException("--linear/--hybrid/--value-conv: verify checks softmax attention against float64; linear attention and the hybrids are checked against their float64 forms (LinearReference) by the test suite");
            }
            (Tensor q, Tensor k, Tensor v) = args.LoadInputs(r);
            AttentionOptions options = args.Options(r);
            (Tensor o, Tensor l) = AttentionArguments.Compute(q, k, v, options, args.Tuning(r), args.DeviceName(r));
            double[] actual = o.ConvertTo(DType.Float64).Array<double>();
            // The GPU computes f32 inputs in bf16: judge it against bf16-rounded inputs and the bf16 naive bound.
            bool roundedToBf16 = q.DType == DType.Float32 && args.DeviceName(r) == "cuda";
            if (roundedToBf16)
            {
                (q, k, v) = (q.ConvertTo(DType.BFloat16), k.ConvertTo(DType.BFloat16), v.ConvertTo(DType.BFloat16));
            }
            Verdict verdict = q.DType switch
            {
                DType.Float32 => Judge<float>(q, k, v, actual, l, options),
                DType.Float16 => Judge<Half>(q, k, v, actual, l, options),
                _ => Judge<BFloat16>(q, k, v, actual, l, options),
            };
            string? json = r.GetValue(args.Json);
            if (json != "-")
            {
                Console.WriteLine($"max abs error      {verdict.MaxError:E3}");
                Console.WriteLine($"relative L2 error  {verdict.RelativeL2:E3}");
                Console.WriteLine($"LSE max abs error  {verdict.LseError:E3}");
                Console.WriteLine($"naive {DTypes.Name(q.DType),-4} error   {verdict.NaiveError:E3}  (tolerance 2x naive + 1e-6 = {verdict.Tolerance:E3})");
                Console.WriteLine(verdict.Pass ? "PASS" : "FAIL");
            }
            JsonOutput.Write(json, new JsonObject
            {
                ["command"] = "verify",
                ["dtype"] = DTypes.Name(q.DType),
                ["maxAbsError"] = JsonOutput.Number(verdict.MaxError),
                ["relativeL2Error"] = JsonOutput.Number(verdict.RelativeL2),
                ["lseMaxAbsError"] = JsonOutput.Number(verdict.LseError),
                ["naiveMaxAbsError"] = JsonOutput.Number(verdict.NaiveError),
                ["tolerance"] = JsonOutput.Number(verdict.Tolerance),
                ["pass"] = verdict.Pass,
            });
            return verdict.Pass ? 0 : 1;
        });
        return command;
    }

    private sealed record Verdict(double MaxError, double RelativeL2, double LseError, double NaiveError)
    {
        public double Tolerance => 2 * NaiveError + 1e-6;
        public bool Pass => MaxError <= Tolerance;
    }

    private static Verdict Judge<T>(Tensor q, Tensor k, Tensor v, double[] actual, Tensor l, AttentionOptions options) where T : unmanaged
    {
        ReferenceResult expected = AttentionReference.Forward(q.AsView<T>(), k.AsView<T>(), v.AsView<T>(), options);
        T[] naive = NaiveAttention.Forward(q.AsView<T>(), k.AsView<T>(), v.AsView<T>(), options);
        float[] lse = l.Array<float>();
        double maxError = 0, naiveError = 0, diff2 = 0, ref2 = 0, lseError = 0;
        for (long i = 0; i < actual.LongLength; i++)
        {
            double e = expected.Output[i], a = actual[i];
            maxError = Math.Max(maxError, Math.Abs(a - e));
            naiveError = Math.Max(naiveError, Math.Abs(ElementConvert.ToDouble(naive[i]) - e));
            diff2 += (a - e) * (a - e);
            ref2 += e * e;
        }
        for (long i = 0; i < lse.LongLength; i++)
        {
            if (double.IsNegativeInfinity(expected.Lse[i]) && float.IsNegativeInfinity(lse[i])) continue;
            lseError = Math.Max(lseError, Math.Abs(lse[i] - expected.Lse[i]));
        }
        return new Verdict(maxError, ref2 > 0 ? Math.Sqrt(diff2 / ref2) : Math.Sqrt(diff2), lseError, naiveError);
    }
}
