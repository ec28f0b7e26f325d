"""
Throughput of metrics.py on one core.

$ python bench/bench_metrics.py [--n_texts=3000] [--seed=0] [--source=synthetic|storygen] [--repeat=3]
$ python bench/bench_metrics.py --smoke      # tiny sizes, the same code paths (bench/smoke.py)

Synthesises deterministic TinyStories-like texts (~200 words, with dialogue), or
(--source=storygen) cuts the offline sample stories of storygen.py, joined by
newlines as in a decoded window, into ~1,300-character pieces (about the text
of one 257-token window),
prints texts/s per text metric, the cost of all metrics together per text, and
NGramScorer fit/score throughput in tokens/s for vocab 512 and 4096.
Target: the tokenizer encodes ~12,000 stories/s/core; all text metrics together
should stay within 2x of that, i.e. >= ~5,000 texts/s/core.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import metrics  # noqa: E402
from prebias import metrics_engine  # noqa: E402
from prebias import refscorer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smoke  # noqa: E402

SMOKE = dict(n_texts=40, repeat=1, fit_tokens=20_000, score_seqs=40)

NAMES = ["Lily", "Tom", "Ben", "Mia", "Sam", "Anna", "Max", "Sue", "Tim", "Lucy"]
NOUNS = ["dog", "cat", "ball", "tree", "park", "box", "cake", "bird", "car", "flower", "toy",
         "house", "garden", "boat", "sun", "friend", "mom", "dad", "sister", "brother", "king"]
ADJS = ["big", "little", "happy", "sad", "red", "shiny", "funny", "scary", "kind", "soft",
        "pretty", "angry", "brave", "tired", "good", "bad"]
VERBS = ["saw", "found", "liked", "wanted", "played with", "took", "hugged", "lost", "made",
         "shared", "broke", "loved", "hated", "helped"]
OPEN = ["Once upon a time, there was a", "One day, a", "There was a"]
SAY = ["said", "asked", "shouted", "cried", "whispered"]
LINES = ["I want to play!", "Can I have it?", "This is so much fun.", "I am sorry.",
         "Do not be sad, I will help you.", "Look at that!", "Thank you, you are my best friend.",
         "No, it is mine!", "Let's go to the park.", "I don't like it."]
ENDS = ["They were very happy.", "From that day on, they were best friends.",
        "The end.", "She learned to share.", "He never did that again."]


def make_texts(n: int, seed: int = 0, target_words: int = 250) -> list[str]:
    rng = np.random.default_rng(seed)

    def pick(xs):
        return xs[int(rng.integers(len(xs)))]

    out = []
    for _ in range(n):
        name = pick(NAMES)
        s = [f"{pick(OPEN)} {pick(ADJS)} {pick(NOUNS)} named {name}."]
        words = 12
        while words < target_words:
            r = rng.random()
            if r < 0.35:
                t = f'"{pick(LINES)}" {pick(SAY)} {pick(NAMES)}.'
            elif r < 0.7:
                t = f"{pick(NAMES)} {pick(VERBS)} the {pick(ADJS)} {pick(NOUNS)}."
            else:
                t = (f"The {pick(NOUNS)} was very {pick(ADJS)}, so {pick(['he', 'she', 'they'])} "
                     f"went to the {pick(NOUNS)} with {pick(['his', 'her', 'their'])} {pick(NOUNS)}.")
            s.append(t)
            words += len(t.split())
        s.append(pick(ENDS))
        out.append(" ".join(s))
    return out


def storygen_windows(n: int, seed: int = 0, chars: int = 1300) -> list[str]:
    """n pieces of ~chars characters (cut anywhere, mid-word/mid-quote included)
    of storygen's stories joined by newlines."""
    from prebias.storygen import generate_stories
    rng = np.random.default_rng(seed)
    stories = generate_stories(max(50, int(n * chars / 700) + 10), seed=1337 + seed)
    big = "\n".join(stories)
    out, pos = [], 0
    while len(out) < n:
        L = int(rng.integers(chars - 100, chars + 100))
        if pos + L > len(big):
            pos = int(rng.integers(0, 500))
        out.append(big[pos:pos + L])
        pos += L
    return out


def rate(fn, n_items, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return n_items / best, best


def main():
    ap = smoke.parser(__doc__)
    ap.add_argument("--n_texts", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source", choices=["synthetic", "storygen"], default="synthetic")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs (CPU time)")
    ap.add_argument("--no_scorer", action="store_true", help="skip the NGramScorer part")
    ap.add_argument("--fit_tokens", type=int, default=5_000_000, help="NGramScorer: tokens it is fitted on")
    ap.add_argument("--score_seqs", type=int, default=4000, help="NGramScorer: windows of 257 tokens scored")
    a = smoke.parse(ap, SMOKE)
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    except (AttributeError, OSError):
        pass
    texts = make_texts(a.n_texts, a.seed) if a.source == "synthetic" else storygen_windows(a.n_texts, a.seed)
    print(f"{len(texts)} texts, mean {np.mean([len(t) for t in texts]):.0f} chars, "
          f"{np.mean([len(t.split()) for t in texts]):.0f} whitespace words")
    metrics_engine.text_metrics(texts[:200])  # warm caches (as in a long pretokenize run)

    print(f"{'metric':22s} {'texts/s':>10s} {'us/text':>9s}")
    for name in metrics.text_metric_names():
        r, _ = rate(lambda: metrics_engine.text_metrics(texts, [name]), len(texts), a.repeat)
        print(f"{name:22s} {r:10.0f} {1e6 / r:9.1f}")
    r_all, _ = rate(lambda: metrics_engine.text_metrics(texts), len(texts), a.repeat)
    print(f"{'ALL (one call)':22s} {r_all:10.0f} {1e6 / r_all:9.1f}")
    no_v = [n for n in metrics.text_metric_names() if n != "sentiment"]
    r_nov, _ = rate(lambda: metrics_engine.text_metrics(texts, no_v), len(texts), a.repeat)
    print(f"{'ALL but sentiment':22s} {r_nov:10.0f} {1e6 / r_nov:9.1f}")

    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    sia = SentimentIntensityAnalyzer()
    sub = texts[:300]
    r_lib, _ = rate(lambda: [sia.polarity_scores(t) for t in sub], len(sub), repeat=1)
    print(f"{'(vaderSentiment lib)':22s} {r_lib:10.0f} {1e6 / r_lib:9.1f}")
    tok_cost = 1e6 / 12000
    print(f"target: tokenizer ~12000 stories/s = {tok_cost:.0f} us/text; metrics budget "
          f"<= 2x => >= ~5000 texts/s.  all metrics: {1e6 / r_all:.0f} us/text = "
          f"{(1e6 / r_all) / tok_cost:.2f}x tokenizer -> {'OK' if r_all >= 5000 else 'BELOW TARGET'}")

    if a.no_scorer:
        return
    rng = np.random.default_rng(a.seed)
    for V in (512, 4096):
        fit_tok = rng.integers(0, V, a.fit_tokens, dtype=np.int64).astype(np.uint16)
        sc = refscorer.NGramScorer(order=3, vocab_size=V)
        r_fit, t_fit = rate(lambda: sc.fit([fit_tok]), fit_tok.size, repeat=1)
        seqs = [rng.integers(0, V, 257).astype(np.uint16) for _ in range(a.score_seqs)]  # 4000: ~1M tokens
        n_tok = sum(len(s) for s in seqs)
        r_sc, t_sc = rate(lambda: sc.nll_many(seqs), n_tok, repeat=2)
        print(f"NGramScorer V={V:5d} order=3: fit {r_fit / 1e6:6.2f} M tok/s ({t_fit:.2f} s for {a.fit_tokens / 1e6:g}M), "
              f"score {r_sc / 1e6:6.2f} M tok/s ({t_sc:.2f} s for {n_tok / 1e6:.2f}M)")


if __name__ == "__main__":
    main()
