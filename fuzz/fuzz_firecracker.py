"""atheris harness for the firecracker reader: `python fuzz/fuzz_firecracker.py [libFuzzer options] [CORPUS]`."""

from _harness import main

if __name__ == "__main__":
    main("firecracker")
