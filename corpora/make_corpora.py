#!/usr/bin/env python3
"""make_corpora.py -- generate the small synthetic test corpora for charrnn.

Writes three deterministic corpora (each a few hundred KB) into --out:

  markov.txt      characters emitted by a fixed, seeded, sparse order-2 Markov
                  chain over a 20-symbol alphabet; its exact entropy rate is
                  computed here and stored in markov.json, so a model's
                  validation loss can be compared against the true optimum.
  arithmetic.txt  one correct equation per line, e.g. "17+25=42".
  brackets.txt    one balanced, properly nested string over ()[]{} per line.

Standard library only.  All randomness comes from a single random.Random(seed)
and only its random() method is used (the one method Python guarantees to be
reproducible across versions); integers are derived from it explicitly and all
sampling uses integer weights, so output is byte-identical for a given seed.

Usage:  python corpora/make_corpora.py [--seed 1234] [--out DIR]
"""

import argparse
import bisect
import json
import math
import random
import sys
from collections import Counter
from pathlib import Path

# ---------------------------------------------------------------- parameters
MARKOV_ORDER = 2
MARKOV_ALPHABET = "abcdeghiklmnorstu .\n"  # 17 letters, space, period, newline
MARKOV_CHARS = 300_000
MARKOV_MIN_SUCC, MARKOV_MAX_SUCC = 2, 8     # successors per state
MARKOV_MAX_WEIGHT_ROOT = 6                  # integer weights in {1,4,...,36}

ARITH_LINES = 25_000
BRACKET_LINES = 9_000
BRACKET_MAX_HALF = 40                       # lengths 2..80
BRACKET_MAX_DEPTH = 10
BRACKET_PAIRS = ("()", "[]", "{}")


# ------------------------------------------------------------- rng helpers
def randbelow(rng: random.Random, n: int) -> int:
    """Uniform integer in [0, n), using only rng.random()."""
    i = int(rng.random() * n)
    return i if i < n else n - 1  # guard against float rounding up to n


def shuffle(rng: random.Random, items: list) -> None:
    """In-place Fisher-Yates shuffle using only rng.random()."""
    for i in range(len(items) - 1, 0, -1):
        j = randbelow(rng, i + 1)
        items[i], items[j] = items[j], items[i]


def weighted_index(rng: random.Random, cum: list[int]) -> int:
    """Index drawn proportionally to integer weights given as cumulative sums."""
    return bisect.bisect_right(cum, randbelow(rng, cum[-1]))


# ------------------------------------------------------------ markov chain
def build_chain(rng: random.Random) -> dict[str, tuple[str, list[int]]]:
    """Random sparse transition table: state (2-char string) -> (succ chars, int weights).

    Irreducibility of the recurrent part is guaranteed by a "backbone": the
    alphabet is put in a random cyclic order and every state (a, b) may always
    emit nxt[b].  Every state therefore reaches the 20-cycle of states
    (x, nxt[x]), so there is exactly one closed class; the random extra edges
    make it aperiodic in practice (checked by the convergence test below).
    """
    alphabet = list(MARKOV_ALPHABET)
    order = alphabet[:]
    shuffle(rng, order)
    nxt = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}

    chain = {}
    for a in alphabet:
        for b in alphabet:
            k = MARKOV_MIN_SUCC + randbelow(rng, MARKOV_MAX_SUCC - MARKOV_MIN_SUCC + 1)
            others = [c for c in alphabet if c != nxt[b]]
            shuffle(rng, others)
            succ = sorted([nxt[b]] + others[: k - 1], key=alphabet.index)
            weights = [(1 + randbelow(rng, MARKOV_MAX_WEIGHT_ROOT)) ** 2 for _ in succ]
            chain[a + b] = (succ, weights)
    return chain


def stationary(chain, tol: float = 1e-15, max_iter: int = 200_000) -> dict[str, float]:
    """Stationary distribution over states by power iteration (pure Python)."""
    states = list(chain)
    probs = {s: [w / sum(ws) for w in ws] for s, (_, ws) in chain.items()}
    pi = {s: 1.0 / len(states) for s in states}
    for _ in range(max_iter):
        new = dict.fromkeys(states, 0.0)
        for s in states:
            p_s = pi[s]
            if p_s:
                succ, _ = chain[s]
                for c, p in zip(succ, probs[s]):
                    new[s[1:] + c] += p_s * p
        total = math.fsum(new.values())
        new = {s: v / total for s, v in new.items()}
        diff = max(abs(new[s] - pi[s]) for s in states)
        pi = new
        if diff < tol:
            return pi
    raise RuntimeError("power iteration did not converge (periodic chain?)")


def entropy_rate(chain, pi) -> float:
    """H = -sum_s pi(s) sum_c P(c|s) log P(c|s), in nats per character."""
    terms = []
    for s, (_, ws) in chain.items():
        total = sum(ws)
        h_s = -math.fsum(w / total * math.log(w / total) for w in ws)
        terms.append(pi[s] * h_s)
    return math.fsum(terms)


def sample_chain(rng, chain, pi, n: int) -> str:
    """n characters of the chain, with the initial state drawn from pi."""
    states = list(chain)
    # pi is a float distribution; quantise it to integer weights for exact sampling.
    cum, acc = [], 0
    for s in states:
        acc += round(pi[s] * 2**40)
        cum.append(acc)
    state = states[weighted_index(rng, cum)]
    table = {}
    for s, (succ, ws) in chain.items():
        c_cum, acc = [], 0
        for w in ws:
            acc += w
            c_cum.append(acc)
        table[s] = (succ, c_cum)
    out = list(state)
    rand, bisect_right = rng.random, bisect.bisect_right  # hot loop: inlined weighted_index
    for _ in range(n - MARKOV_ORDER):
        succ, c_cum = table[state]
        total = c_cum[-1]
        r = int(rand() * total)
        c = succ[bisect_right(c_cum, r if r < total else total - 1)]
        out.append(c)
        state = state[1:] + c
    return "".join(out)


def empirical_conditional_entropy(text: str, order: int) -> float:
    """Plug-in estimate of H(X_t | previous `order` chars) from counts, in nats."""
    n = len(text) - order
    full_counts = Counter(text[i:i + order + 1] for i in range(n))
    ctx_counts = Counter()
    for full, k in full_counts.items():
        ctx_counts[full[:-1]] += k
    return -math.fsum(k / n * math.log(k / ctx_counts[f[:-1]]) for f, k in full_counts.items())


def make_markov(rng: random.Random, seed: int) -> tuple[str, dict]:
    chain = build_chain(rng)
    pi = stationary(chain)
    h = entropy_rate(chain, pi)
    text = sample_chain(rng, chain, pi, MARKOV_CHARS)
    info = {
        "order": MARKOV_ORDER,
        "alphabet": MARKOV_ALPHABET,
        "entropy_nats_per_char": h,
        "entropy_bits_per_char": h / math.log(2),
        "seed": seed,
        "n_chars": len(text),
        "n_recurrent_states": sum(1 for v in pi.values() if v > 1e-12),
        "empirical_conditional_entropy_nats_per_char": empirical_conditional_entropy(text, MARKOV_ORDER),
    }
    return text, info


# -------------------------------------------------------------- arithmetic
def make_arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(ARITH_LINES):
        r = randbelow(rng, 10)
        if r < 4:                                   # 40%: a+b, 0 <= a, b <= 99
            a, b = randbelow(rng, 100), randbelow(rng, 100)
            lines.append(f"{a}+{b}={a + b}")
        elif r < 8:                                 # 40%: a-b with a >= b
            a, b = randbelow(rng, 100), randbelow(rng, 100)
            a, b = max(a, b), min(a, b)
            lines.append(f"{a}-{b}={a - b}")
        else:                                       # 20%: a*b, 0 <= a, b <= 12
            a, b = randbelow(rng, 13), randbelow(rng, 13)
            lines.append(f"{a}*{b}={a * b}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- brackets
def random_brackets(rng: random.Random, length: int, max_depth: int) -> str:
    """Uniform-ish random walk producing a balanced string of exactly `length` chars."""
    out, stack = [], []
    for pos in range(length):
        remaining = length - pos
        can_open = len(stack) < max_depth and remaining - 1 >= len(stack) + 1
        can_close = bool(stack)
        if can_open and (not can_close or randbelow(rng, 2) == 0):
            pair = BRACKET_PAIRS[randbelow(rng, len(BRACKET_PAIRS))]
            out.append(pair[0])
            stack.append(pair[1])
        else:
            out.append(stack.pop())
    assert not stack
    return "".join(out)


def make_brackets(rng: random.Random) -> str:
    lines = []
    for _ in range(BRACKET_LINES):
        length = 2 * (1 + randbelow(rng, BRACKET_MAX_HALF))
        max_depth = 1 + randbelow(rng, BRACKET_MAX_DEPTH)
        lines.append(random_brackets(rng, length, max_depth))
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------- main
def write(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    path.write_bytes(data)
    print(f"{path.name}: {len(data)} bytes, {len(text)} chars, {text.count(chr(10))} lines",
          file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    # One independent stream per corpus, all derived from --seed, so changing
    # one generator does not perturb the others.
    text, info = make_markov(random.Random(f"{args.seed}/markov"), args.seed)
    write(args.out / "markov.txt", text)
    (args.out / "markov.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    write(args.out / "arithmetic.txt", make_arithmetic(random.Random(f"{args.seed}/arithmetic")))
    write(args.out / "brackets.txt", make_brackets(random.Random(f"{args.seed}/brackets")))

    h = info["entropy_nats_per_char"]
    print(f"markov: true entropy rate {h:.12f} nats/char = "
          f"{info['entropy_bits_per_char']:.12f} bits/char "
          f"(order {MARKOV_ORDER}, {len(MARKOV_ALPHABET)} symbols, "
          f"{info['n_recurrent_states']} recurrent states)")
    emp = info["empirical_conditional_entropy_nats_per_char"]
    print(f"markov: empirical conditional entropy of generated text "
          f"{emp:.6f} nats/char (difference {emp - h:+.6f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
