"""Vision training: WRN-28-10 / ResNet-50 on CIFAR-100, Tiny-ImageNet, ImageNet (paper Sec. 4.1, App. E).

Not written yet: this script only says so. The library it will use (models.py, sparsity.py,
neurotrails.py) is complete; `python neurotrails.py --help` shows what can be inspected today.
"""
import sys


def main():
    print("train_vision.py: the vision training loop (single, TreeNet, full ensemble, NeuroTrails, static, pruning, SET) is not written yet; see the project's open issues.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
