"""The hashing engine: stage 1 (prefix hashes), stage 2 (byte comparison), and the
compiled kernels both stages run on where they are built."""
