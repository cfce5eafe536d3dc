"""``python -m edmsound.cli`` = the ``edmsound`` command."""
from . import main

if __name__ == "__main__":
    main()
