"""Paired permutation test between two runs scored on the same items (as the VLM3D challenge ranks).

Under the null hypothesis the two runs are exchangeable within each pair, so each paired
difference ``d_i = a_i - b_i`` may flip its sign. The statistic is the mean difference; the
p-value counts sign-flipped means at least as extreme as the observed one. With ``2^N`` at most
``n_permutations`` every sign pattern is enumerated (p = count / 2^N, exact, as scipy does);
otherwise ``n_permutations`` random patterns are drawn and p = (count + 1) / (n + 1), which is
never 0 and valid as a Monte-Carlo p-value.

``groups``: the report of each pair, where a report has several (repeats share its labels and text, so they
are not independent): a permutation then swaps whole reports, and the enumeration is over 2^groups.
"""

from __future__ import annotations

import numpy as np

ALTERNATIVES = ("two-sided", "greater", "less")
_CHUNK = 1024  # sign patterns per block: memory O(_CHUNK * N) floats


def _sign_blocks(n: int, n_permutations: int, rng: np.random.Generator):
    """Yield (k, N) blocks of +-1 signs: all 2^N patterns if few enough, else random ones."""
    if 2 ** n <= n_permutations:
        codes = np.arange(2 ** n)
        for start in range(0, codes.size, _CHUNK):
            bits = (codes[start:start + _CHUNK, None] >> np.arange(n)) & 1  # (k, N)
            yield 1.0 - 2.0 * bits
        return
    for start in range(0, n_permutations, _CHUNK):
        k = min(_CHUNK, n_permutations - start)
        yield rng.choice((-1.0, 1.0), size=(k, n))


def _group_codes(groups, n: int) -> tuple[np.ndarray, int]:
    """(code of each item, number of units): one unit per item without groups, per group with them."""
    if groups is None:
        return np.arange(n), n
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"{groups.shape[0] if groups.ndim else 0} groups for {n} pairs")
    _, codes = np.unique(groups, return_inverse=True)
    return codes.ravel(), int(codes.max()) + 1


def paired_permutation_test(a, b, n_permutations: int = 10_000, seed: int = 0,
                            alternative: str = "two-sided", groups=None) -> dict[str, float | bool]:
    """a (N,), b (N,) per-item scores of two runs -> {'diff': mean(a - b), 'p_value', 'exact'}.

    exact: True when all 2^N sign patterns were enumerated (N <= log2(n_permutations)); N counts groups where
    ``groups`` (N,) is given.
    alternative: 'greater' tests mean(a - b) > 0, 'less' < 0, 'two-sided' either (|mean|).
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"expected two non-empty (N,) arrays of one shape, got {a.shape} and {b.shape}")
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores contain NaN or inf")
    d = a - b
    observed = np.ones(d.size) @ d / d.size  # computed as the permuted ones are
    # Patterns equal to the observed up to rounding count as "as extreme" (scipy does the same).
    tol = 1e-12 * np.abs(d).mean()
    codes, units = _group_codes(groups, d.size)
    exact = 2 ** units <= n_permutations
    count = total = 0
    for signs in _sign_blocks(units, n_permutations, np.random.default_rng(seed)):
        stats = signs[:, codes] @ d / d.size  # (k,) mean difference of each sign pattern
        if alternative == "greater":
            count += int((stats >= observed - tol).sum())
        elif alternative == "less":
            count += int((stats <= observed + tol).sum())
        else:
            count += int((np.abs(stats) >= abs(observed) - tol).sum())
        total += stats.size
    p = count / total if exact else (count + 1) / (total + 1)
    return {"diff": float(observed), "p_value": float(min(p, 1.0)), "exact": exact}


def paired_swap_test(statistic, a, b, n_permutations: int = 2_000, seed: int = 0,
                     groups=None) -> dict[str, float | bool]:
    """A paired permutation test for any statistic of two paired runs (e.g. a macro AUROC difference).

    ``a``, ``b`` (N, ...): the two runs' rows, row i of each from the same item (same report and seed);
    ``statistic(a, b)`` -> float. Under the null the runs are exchangeable within each pair, so each
    permutation swaps a random subset of rows between ``a`` and ``b``; the two-sided p-value counts
    permuted statistics with |s| >= |observed|. All 2^N swap patterns where that is at most
    ``n_permutations``, else random ones with p = (count + 1) / (n + 1). A statistic that is not finite
    on a permutation (an AUROC with one class) leaves that permutation out, counted in ``dropped``.
    :func:`paired_permutation_test` is the special case ``mean(a - b)``, computed without the loop.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"expected two non-empty arrays of one shape, got {a.shape} and {b.shape}")
    observed = float(statistic(a, b))
    codes, units = _group_codes(groups, a.shape[0])
    exact = 2 ** units <= n_permutations
    rng = np.random.default_rng(seed)
    count = total = dropped = 0
    tol = 1e-12 * max(abs(observed), 1e-12)
    for swaps in _sign_blocks(units, n_permutations, rng):
        for row in swaps[:, codes] < 0:  # (N,) True where the pair is swapped
            mask = row.reshape(-1, *([1] * (a.ndim - 1)))
            s = float(statistic(np.where(mask, b, a), np.where(mask, a, b)))
            if not np.isfinite(s):
                dropped += 1
                continue
            count += abs(s) >= abs(observed) - tol
            total += 1
    if not total or not np.isfinite(observed):
        return {"diff": observed, "p_value": float("nan"), "exact": exact, "dropped": dropped}
    p = count / total if exact else (count + 1) / (total + 1)
    return {"diff": observed, "p_value": float(min(p, 1.0)), "exact": exact, "dropped": dropped}
