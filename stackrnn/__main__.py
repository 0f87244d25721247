"""The `stackrnn` command (`python -m stackrnn` too): the language-model application,
which needs the `lm` extra; without it, one line says how to install it."""

import sys


def main(argv: list[str] | None = None) -> None:
    try:
        from .lm._cli import main as run
    except ModuleNotFoundError as e:
        if e.name not in ("matplotlib", "optax", "tqdm"):
            raise
        sys.exit(f"stackrnn: {e}")
    run(argv)


if __name__ == "__main__":
    main()
