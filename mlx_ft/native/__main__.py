"""``python -m mlx_ft.native [--rebuild]``: build the MLX backend's CPU kernels now (they are
otherwise built on first use) and say where they are, or why they cannot be built."""

import sys

from . import BuildError, build, load


def main(argv: list[str]) -> int:
    unknown = [a for a in argv if a != "--rebuild"]
    if unknown:
        print(f"error: unknown argument {unknown[0]!r} (usage: python -m mlx_ft.native "
              "[--rebuild])", file=sys.stderr)
        return 2
    try:
        path = build(force="--rebuild" in argv)
        load(path)
    except BuildError as e:
        print(f"mlx_ft.native: cannot build the CPU kernels: {e}", file=sys.stderr)
        return 1
    print(f"mlx_ft.native: CPU kernels ready: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
