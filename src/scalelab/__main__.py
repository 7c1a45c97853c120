"""`python -m scalelab` is the `scalelab` command."""

from scalelab.cli import main

if __name__ == "__main__":
    main()
