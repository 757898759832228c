using System.Globalization;

namespace Attend.Masks;

/// <summary>
/// Parses the mask expressions of the command line:
/// <code>
///   expr    := term ('|' term)*          term := factor ('&amp;' factor)*        factor := '!' factor | '(' expr ')' | call
///   call    := full | causal | window(left[, right]) | sink(n) | prefix(n)
///            | neighborhood([axes], [kernel][, [dilation]][, [causal 0/1]])
/// </code>
/// Example: <c>causal &amp; window(1024) | sink(64)</c> (&amp; binds tighter than |).
/// </summary>
public static class MaskExpression
{
    /// <summary>Parses <paramref name="text"/>.</summary>
    /// <exception cref="FormatException">with the position and what was expected.</exception>
    public static Mask Parse(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        var p = new Parser(text);
        Mask m = p.Or();
        p.SkipSpace();
        if (!p.AtEnd) throw p.Error("end of expression");
        return m;
    }

    private sealed class Parser(string text)
    {
        private int _pos;

        public bool AtEnd => _pos >= text.Length;

        public void SkipSpace()
        {
            while (_pos < text.Length && char.IsWhiteSpace(text[_pos])) _pos++;
        }

        private bool Take(char c)
        {
            SkipSpace();
            if (_pos < text.Length && text[_pos] == c)
            {
                _pos++;
                return true;
            }
            return false;
        }

        private void Expect(char c)
        {
            if (!Take(c)) throw Error($"'{c}'");
        }

        public FormatException Error(string expected) =>
            new($"mask expression: expected {expected} at position {_pos} of \"{text}\"");

        public Mask Or()
        {
            Mask m = And();
            while (Take('|')) m |= And();
            return m;
        }

        private Mask And()
        {
            Mask m = Not();
            while (Take('&')) m &= Not();
            return m;
        }

        private Mask Not()
        {
            if (Take('!')) return !Not();
            if (Take('('))
            {
                Mask inner = Or();
                Expect(')');
                return inner;
            }
            return Call();
        }

        private Mask Call()
        {
            SkipSpace();
            int start = _pos;
            while (_pos < text.Length && (char.IsLetterOrDigit(text[_pos]) || text[_pos] == '_')) _pos++;
            string name = text[start.._pos].ToLowerInvariant();
            if (name.Length == 0) throw Error("a mask name (full, causal, window, sink, prefix, neighborhood)");
            var args = new List<int[]>();
            if (Take('('))
            {
                if (!Take(')'))
                {
                    do args.Add(Argument());
                    while (Take(','));
                    Expect(')');
                }
            }
            int Scalar(int i) => i < args.Count && args[i].Length == 1 ? args[i][0] : throw Error($"a number as argument {i + 1} of {name}");
            try
            {
                return name switch
                {
                    "full" => Mask.Full,
                    "causal" => Mask.Causal,
                    "window" => Mask.SlidingWindow(Scalar(0), args.Count > 1 ? Scalar(1) : 0),
                    "sink" => Mask.Sink(Scalar(0)),
                    "prefix" => Mask.Prefix(Scalar(0)),
                    "block_causal" => Mask.BlockCausal(Scalar(0)),
                    "neighborhood" or "nbh" => args.Count >= 2
                        ? Mask.Neighborhood(args[0], args[1], args.Count > 2 ? args[2] : null, args.Count > 3 ? args[3].Select(x => x != 0).ToArray() : null, args.Count > 4 ? args[4] : null)
                        : throw Error("neighborhood([axes], [kernel][, [dilation]][, [causal]][, [stride]])"),
                    _ => throw Error($"a known mask name, not '{name}'"),
                };
            }
            catch (ArgumentException e)
            {
                throw new FormatException($"mask expression \"{text}\": {e.Message}", e);
            }
        }

        private int[] Argument()
        {
            if (Take('['))
            {
                var list = new List<int>();
                if (!Take(']'))
                {
                    do list.Add(Number());
                    while (Take(','));
                    Expect(']');
                }
                return [.. list];
            }
            return [Number()];
        }

        private int Number()
        {
            SkipSpace();
            int start = _pos;
            if (_pos < text.Length && text[_pos] == '-') _pos++;
            while (_pos < text.Length && char.IsDigit(text[_pos])) _pos++;
            if (!int.TryParse(text.AsSpan(start, _pos - start), NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out int v))
            {
                _pos = start;
                throw Error("an integer");
            }
            return v;
        }
    }
}
