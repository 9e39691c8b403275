"""atheris harness for the vmrs reader: `python fuzz/fuzz_vmrs.py [libFuzzer options] [CORPUS]`."""

from _harness import main

if __name__ == "__main__":
    main("vmrs")
