"""Build small dumps of every format from known pages, for tests.

Each module writes one format with ``struct`` from ``(address, bytes)`` pairs, so readers can
be checked against pages the test chose (and corrupted copies of them).
"""
