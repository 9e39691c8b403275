"""atheris harness for the firecracker_diff reader: `python fuzz/fuzz_firecracker_diff.py [libFuzzer options] [CORPUS]`."""

from _harness import main

if __name__ == "__main__":
    main("firecracker_diff")
