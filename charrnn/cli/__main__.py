"""`python -m charrnn.cli` runs the command-line tool, as `python -m charrnn` does."""

from charrnn.cli import main

if __name__ == "__main__":
    main()
