"""Per-example gradient statistics: `GradStats` sums and the backends that compute them."""

from adaptive_batch.stats._fast import fast_stats_report
from adaptive_batch.stats._grad_stats import GradStats
from adaptive_batch.stats._per_example_stats import per_example_stats

__all__ = ["GradStats", "fast_stats_report", "per_example_stats"]
