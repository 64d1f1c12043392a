"""`python -m mugcp_bench`: the command line."""

from mugcp_bench.commands.cli import main

main()
