"""atheris harness for the cloud_hypervisor reader: `python fuzz/fuzz_cloud_hypervisor.py [libFuzzer options] [CORPUS]`."""

from _harness import main

if __name__ == "__main__":
    main("cloud_hypervisor")
