"""atheris harness for cache entries (scan --cache): `python fuzz/fuzz_cache.py [libFuzzer options] [CORPUS]`."""

from _harness import main_fingerprints

if __name__ == "__main__":
    main_fingerprints("cache")
