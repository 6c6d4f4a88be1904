"""Language modelling: multi-head LLaMA pretraining on C4 (paper Sec. 4.2, App. C, E.2).

Not written yet: this script only says so. The library it will use (models.py, sparsity.py,
neurotrails.py) is complete; `python neurotrails.py --help` shows what can be inspected today.
"""
import sys


def main():
    print("train_lm.py: the LLaMA / C4 training loop with soft-magnitude DST is not written yet; see the project's open issues.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
