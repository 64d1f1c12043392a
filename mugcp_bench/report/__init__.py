"""From the store to tables and plots: tidy results, statistics, comparisons, rendering. No torch."""
