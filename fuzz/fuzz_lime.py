"""atheris harness for the lime reader: `python fuzz/fuzz_lime.py [libFuzzer options] [CORPUS]`."""

from _harness import main

if __name__ == "__main__":
    main("lime")
