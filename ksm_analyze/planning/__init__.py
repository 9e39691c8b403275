"""Capacity planning on the core table: hosts, placement, VMs-per-host projection."""
