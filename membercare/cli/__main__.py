"""``python -m membercare.cli``."""

from membercare.cli import main

if __name__ == "__main__":
    main()
