"""atheris harness for the avml reader: `python fuzz/fuzz_avml.py [libFuzzer options] [CORPUS]`."""

from _harness import main

if __name__ == "__main__":
    main("avml")
