"""Standard vs natural-gradient PNMF (the seed's benchmark); same as ``natgrad bench pnmf``.

Usage: ``python benchmarks/natural_gradient.py [--quick] [--datasets synthetic,digits] ...``
(``--help`` lists the options). Results go to ``benchmarks/results/``.
"""

import sys

from natgrad.models.pnmf_benchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
