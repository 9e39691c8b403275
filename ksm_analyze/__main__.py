"""``python -m ksm_analyze``."""

from .cli import main

main()
