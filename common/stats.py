"""Statistics over test patients: percentile-bootstrap intervals (resampling patients, the unit a
reader generalises over) and, for two models on the same patients, paired differences."""

import numpy as np
from scipy import stats

RESAMPLES = 10_000


def bootstrap_ci(values, statistic=np.mean, level=0.95, resamples=RESAMPLES, seed=0):
    """(low, high): the percentile bootstrap interval of `statistic` over resampled patients."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    draws = statistic(values[rng.integers(0, len(values), (resamples, len(values)))], axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))


def paired(a, b, resamples=RESAMPLES, seed=0):
    """Model a against model b on the same patients (same order): the mean difference a - b, its
    paired bootstrap 95 % interval (patients resampled, each keeping both of its scores), and the
    two-sided Wilcoxon signed-rank p-value (exact for small samples without ties, as scipy decides;
    None when every difference is 0)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    low, high = bootstrap_ci(d, resamples=resamples, seed=seed)
    p = float(stats.wilcoxon(d).pvalue) if np.any(d != 0) else None
    return {
        "mean_diff": float(d.mean()),
        "ci_low": low,
        "ci_high": high,
        "wilcoxon_p": p,
        "wins": int((d > 0).sum()),
        "losses": int((d < 0).sum()),
        "patients": len(d),
    }
