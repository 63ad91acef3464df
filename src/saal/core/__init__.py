"""What every task, store and process count plugs into: pool state, the pool scan, selection, ranks, seeds."""
