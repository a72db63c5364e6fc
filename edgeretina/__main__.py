"""`python -m edgeretina` (and `torchrun -m edgeretina train ...`): the same as the `edgeretina` command."""

from edgeretina.cli import main

if __name__ == "__main__":
    main()
