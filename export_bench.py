"""ONNX export and DeepSparse / ONNX Runtime benchmark (paper Sec. 5.4, Table 7, App. J).

Not written yet: this script only says so. The library it will use (models.py, sparsity.py,
neurotrails.py) is complete; `python neurotrails.py --help` shows what can be inspected today.
"""
import sys


def main():
    print("export_bench.py: ONNX export and the DeepSparse / ONNX Runtime benchmark is not written yet; see the project's open issues.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
