"""atheris harness for the snapshot reader: `python fuzz/fuzz_snapshot.py [libFuzzer options] [CORPUS]`."""

from _harness import main

if __name__ == "__main__":
    main("snapshot")
