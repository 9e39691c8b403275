"""Live processes: capture snapshots from /proc, and compare predictions with the running kernel."""
