"""`python -m cpb` is the `cpb` command (what `make demo` runs)."""
from cpb.cli import main

main()
