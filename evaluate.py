"""Metrics: accuracy, NLL, ECE, prediction disagreement, FLOPs (paper App. F, Sec. 5.2).

Not written yet: this script only says so. The library it will use (models.py, sparsity.py,
neurotrails.py) is complete; `python neurotrails.py --help` shows what can be inspected today.
"""
import sys


def main():
    print("evaluate.py: metrics, checkpoint evaluation and FLOP accounting is not written yet; see the project's open issues.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
