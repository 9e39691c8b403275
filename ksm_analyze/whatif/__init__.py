"""What-ifs a planner asks after the KSM number, each from the same inputs: compression of
what KSM leaves (zram/zswap), merging only whole 2 MiB pages, NUMA nodes merged apart
(``merge_across_nodes=0``), pages that differ in a few bytes, and the prefix length."""
