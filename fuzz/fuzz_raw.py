"""atheris harness for the raw reader: `python fuzz/fuzz_raw.py [libFuzzer options] [CORPUS]`."""

from _harness import main

if __name__ == "__main__":
    main("raw")
