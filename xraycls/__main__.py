"""``python -m xraycls``: the command line (also what ``torchrun -m xraycls`` starts)."""

from xraycls.cli import main

main()
