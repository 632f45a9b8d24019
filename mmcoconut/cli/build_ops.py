"""`python -m mmcoconut.cli.build_ops [cpu|cuda|all]`: build the injection extensions ahead of time (make install).
all (the default): cpu, and cuda where it can be built."""
import sys

from mmcoconut.kernels.build import cuda_buildable, load_extension


def main(argv=None) -> int:
    which = (sys.argv[1:] if argv is None else argv) or ["all"]
    kinds = ["cpu", "cuda"] if which == ["all"] else which
    rc = 0
    for kind in kinds:
        if which == ["all"] and kind == "cuda" and not cuda_buildable():
            continue
        try:
            mod = load_extension(kind)
            print(f"{kind}: {mod.__file__}")
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
