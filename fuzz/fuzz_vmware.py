"""atheris harness for the vmware reader: `python fuzz/fuzz_vmware.py [libFuzzer options] [CORPUS]`."""

from _harness import main

if __name__ == "__main__":
    main("vmware")
