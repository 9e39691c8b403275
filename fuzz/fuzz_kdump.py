"""atheris harness for the kdump reader: `python fuzz/fuzz_kdump.py [libFuzzer options] [CORPUS]`."""

from _harness import main

if __name__ == "__main__":
    main("kdump")
