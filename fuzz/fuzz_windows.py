"""atheris harness for the windows reader: `python fuzz/fuzz_windows.py [libFuzzer options] [CORPUS]`."""

from _harness import main

if __name__ == "__main__":
    main("windows")
